"""Decoder-only language model (GPT-style), linen; its NNX twin is :mod:`flax_attention.nnx.lm`.

``Embed(V, E)·√E -> Dropout -> num_layers pre-norm blocks -> final norm ->
logits = h Wᵀ`` (tied: ``W`` is the embedding, Press & Wolf 2017), each block
``x + Dropout(Attn(Norm(x)))`` then ``x + Dropout(FFN(Norm(x)))`` (pre-norm,
Xiong et al. 2020). The norm is RMSNorm (Zhang & Sennrich 2019) or LayerNorm;
attention is :class:`~flax_attention.linen.multihead.MultiHeadAttention` with
RoPE (Su et al. 2021) by default, grouped kv heads and an optional causal
sliding window; the feed-forward layer is
:class:`~flax_attention.linen.layers.PositionwiseFeedForward`.

Parameter tree (the names of the pre-LN
:class:`~flax_attention.linen.layers.TransformerEncoderLayer`, so a
``norm="layer"`` LM's blocks line up with a Transformer encoder's)::

    embedding/embedding [V, E]
    layers_{i}/self_attention_norm/scale (+bias with norm="layer")
    layers_{i}/self_attention/{query,key,value,out}/kernel (+bias with use_bias)
    layers_{i}/ffn_norm/...   layers_{i}/ffn/{wi,wo}/{kernel,bias}
    final_norm/...            logits/kernel [E, V]   (only with tie_embeddings=False)

Packed rows: ``segment_ids [B, T]`` (``0`` = padding) restrict attention to
earlier tokens of the same document and ``positions [B, T]`` (restarting at 0
per document) place them for RoPE, so a packed row computes exactly what the
documents would alone. Decoding (``decode=True``, apply with
``mutable=['cache']``) uses each attention layer's flax-layout KV cache
(``"cache"`` collection, see :func:`init_cache`): prefill right-padded prompts
with their ``lengths [B]``, then feed one token per call; positions come from
each example's own fill level.

Stable API (imported by the trainer): :class:`LMConfig`, :class:`LanguageModel`
(``__call__`` and ``hidden``), :func:`init_cache`, :func:`check_tokens`. Sampled
generation (greedy / temperature / top-k / top-p, one jitted loop):
:func:`flax_attention.linen.generation.generate`; the NNX twin:
:class:`flax_attention.nnx.lm.LanguageModel`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attention.functional import lm_inputs
from flax_attention.linen.layers import ACTIVATIONS, PositionwiseFeedForward
from flax_attention.linen.multihead import MultiHeadAttention
from flax_attention.linen.partitioning import logical

Array = jnp.ndarray
NORMS = ("rms", "layer")
POSITIONS = ("rope", "alibi", "none")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Hyper-parameters of :class:`LanguageModel` (every field is a ``train.py`` flag: no ``None``).

    Attributes:
      vocab_size: ``V``.
      max_length: longest row, and longest prompt + generation (the cache length).
      d_model: ``E``, the model width.
      num_heads: ``N``, query heads.
      num_kv_heads: ``K`` (``0`` = ``N``; grouped-query attention).
      num_layers: decoder blocks.
      d_ff: ``F``, the feed-forward hidden size.
      dropout_rate: embedding and residual dropout.
      attention_dropout_rate: dropout on attention weights.
      norm: ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm), pre-norm.
      norm_epsilon: epsilon of every norm.
      relative_position: ``"rope"``, ``"alibi"`` or ``"none"`` (no position signal).
      rope_base: RoPE frequency base.
      window: causal sliding window ``w`` (a query sees itself and ``w`` predecessors); ``0`` = full.
      tie_embeddings: logits use the embedding matrix transposed; else a separate ``logits`` Dense.
      activation: feed-forward activation, ``"gelu"``, ``"relu"`` or ``"silu"``.
      use_bias: biases in the attention projections.
      dtype: computation dtype name (``"float32"``, ``"bfloat16"``); logits are float32 always.
      attention_implementation: ``""`` (auto) or a name accepted by
        :func:`~flax_attention.scaled_dot_product_attention`.
      pad_id: the padding token id (the trainer's SentencePiece model uses 0).
      bos_id: the begin-of-document token id (SentencePiece: 1).
      eos_id: the end-of-document token id, where generation stops (SentencePiece: 2).
    """

    vocab_size: int = 8000
    max_length: int = 256
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int = 0
    num_layers: int = 4
    d_ff: int = 1024
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    norm: str = "rms"
    norm_epsilon: float = 1e-6
    relative_position: str = "rope"
    rope_base: float = 10000.0
    window: int = 0
    tie_embeddings: bool = True
    activation: str = "gelu"
    use_bias: bool = False
    dtype: str = "float32"
    attention_implementation: str = ""
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        problems = []
        if min(self.vocab_size, self.max_length, self.d_model, self.num_heads, self.num_layers, self.d_ff) < 1:
            problems.append("vocab_size, max_length, d_model, num_heads, num_layers and d_ff must be >= 1")
        elif self.d_model % self.num_heads:
            problems.append(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        elif self.relative_position == "rope" and (self.d_model // self.num_heads) % 2:
            problems.append(f"relative_position='rope' needs an even head dim, got {self.d_model // self.num_heads}")
        if self.num_kv_heads < 0 or (self.num_heads > 0 and self.num_heads % (self.num_kv_heads or self.num_heads)):
            problems.append(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} (0 = num_heads)")
        if self.norm not in NORMS:
            problems.append(f"norm={self.norm!r} must be one of {NORMS}")
        if self.relative_position not in POSITIONS:
            problems.append(f"relative_position={self.relative_position!r} must be one of {POSITIONS}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation={self.activation!r} must be one of {sorted(ACTIVATIONS)}")
        if self.window < 0:
            problems.append(f"window={self.window} must be >= 0 (0 = full causal attention)")
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                problems.append(f"{name}={getattr(self, name)} must be in [0, vocab_size={self.vocab_size})")
        try:
            jnp.dtype(self.dtype)
        except TypeError:
            problems.append(f"dtype={self.dtype!r} is not a dtype name (e.g. 'float32', 'bfloat16')")
        if problems:
            raise ValueError("LMConfig: " + "; ".join(problems) + ".")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def kv_heads(self) -> int:
        """``K``, with ``0`` resolved to ``N``."""
        return self.num_kv_heads or self.num_heads

    def replace(self, **changes) -> "LMConfig":
        return dataclasses.replace(self, **changes)


def check_tokens(tokens, config: LMConfig, what: str = "tokens") -> None:
    """Raises a one-line ValueError for a non-integer ``[B, T]`` array, ``T > max_length`` or (when
    concrete) ids outside ``[0, vocab_size)``; traced ids are not checked (the model makes their rows NaN)."""
    lm_inputs.check_tokens(tokens, config.vocab_size, config.max_length, what)


def _norm(config: LMConfig, name: str) -> nn.Module:
    cls = nn.RMSNorm if config.norm == "rms" else nn.LayerNorm
    return cls(epsilon=config.norm_epsilon, dtype=config.compute_dtype, name=name)


class DecoderBlock(nn.Module):
    """One pre-norm block: causal self-attention then feed-forward, each residual."""

    config: LMConfig

    @nn.compact
    def __call__(self, x: Array, *, mask: Optional[Array], positions: Optional[Array], deterministic: bool,
                 decode: bool, lengths: Optional[Array]) -> Array:
        """``x [B, T, E] -> [B, T, E]``; ``mask`` broadcastable to ``[B, N, T, T]`` (decode: ``[B, N, T, L]``)."""
        c = self.config
        drop = nn.Dropout(c.dropout_rate)
        attention = MultiHeadAttention(
            num_heads=c.num_heads, num_kv_heads=c.kv_heads, dropout_rate=c.attention_dropout_rate,
            use_bias=c.use_bias, dtype=c.compute_dtype, window=c.window or None,
            implementation=c.attention_implementation or None,
            relative_position=None if c.relative_position == "none" else c.relative_position,
            rope_base=c.rope_base, name="self_attention")
        h = attention(_norm(c, "self_attention_norm")(x), mask=mask, is_causal=True,
                      deterministic=deterministic, decode=decode, positions=positions, lengths=lengths)
        x = x + drop(h, deterministic=deterministic)
        ffn = PositionwiseFeedForward(c.d_ff, activation=ACTIVATIONS[c.activation], dtype=c.compute_dtype,
                                      name="ffn")
        return x + drop(ffn(_norm(c, "ffn_norm")(x)), deterministic=deterministic)


class LanguageModel(nn.Module):
    """Decoder-only Transformer LM; see the module docstring.

    ``model.init(rng, tokens)`` creates the parameters; ``model.init(rng,
    tokens_of_cache_length, decode=True)["cache"]`` (or :func:`init_cache`)
    the decoding cache.
    """

    config: LMConfig

    def setup(self):
        c = self.config
        self.embedding = nn.Embed(
            c.vocab_size, c.d_model, dtype=c.compute_dtype, name="embedding",
            embedding_init=logical(nn.initializers.normal(stddev=c.d_model**-0.5), ("vocab", "embed")))
        self.layers = [DecoderBlock(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.final_norm = _norm(c, "final_norm")
        self.dropout = nn.Dropout(c.dropout_rate)
        if not c.tie_embeddings:
            self.output = nn.Dense(c.vocab_size, use_bias=False, name="logits",
                                   kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "vocab")))

    def hidden(self, tokens: Array, *, positions: Optional[Array] = None, segment_ids: Optional[Array] = None,
               train: bool = False, decode: bool = False, lengths: Optional[Array] = None) -> Array:
        """Final-normed hidden states ``[B, T, E]`` (``config.dtype``); arguments as :meth:`__call__`."""
        c = self.config
        check_tokens(tokens, c)
        b, t = tokens.shape
        mask, lengths = lm_inputs.call_mask((b, t), decode, positions, segment_ids, lengths)  # + causal in attention
        # Out-of-vocabulary ids that could not be checked (traced) give NaN rows, never a silent clamp.
        valid = lm_inputs.valid_tokens(tokens, c.vocab_size)
        x = self.embedding(tokens) * jnp.asarray(c.d_model**0.5, c.compute_dtype)
        x = jnp.where(valid[..., None], x, jnp.nan).astype(c.compute_dtype)
        x = self.dropout(x, deterministic=not train)
        for layer in self.layers:
            x = layer(x, mask=mask, positions=positions, deterministic=not train,
                      decode=decode, lengths=lengths)
        return self.final_norm(x)

    def __call__(self, tokens: Array, *, positions: Optional[Array] = None, segment_ids: Optional[Array] = None,
                 train: bool = False, decode: bool = False, lengths: Optional[Array] = None,
                 logits_at: Optional[Array] = None) -> Array:
        """Next-token logits.

        Args:
          tokens: int ``[B, T]``, ids in ``[0, V)``, ``T <= max_length``.
          positions: int ``[B, T]`` RoPE/ALiBi positions (packed rows: restarting at 0 per
            document); default ``arange(T)``. Not with ``decode``.
          segment_ids: int ``[B, T]`` document ids of a packed row, ``0`` = padding: a token
            attends only to earlier tokens of its own document. Not with ``decode``.
          train: enables dropout (needs a ``"dropout"`` RNG).
          decode: cached decoding (``mutable=['cache']``): ``tokens`` are the next ``T``
            positions of each example.
          lengths: int ``[B]``. With ``decode``: real tokens per example of a right-padded
            prefill (each cache advances by its own). Without: positions ``>= lengths`` are
            padding (segment 0).
          logits_at: int ``[B]``: only the logits at this position of each row, ``[B, 1, V]``
            (a prefill needs each prompt's last one; the vocabulary projection of every
            other row is skipped).

        Returns:
          float32 logits ``[B, T, V]`` (``[B, 1, V]`` with ``logits_at``); rows of padding
          (and, with ``decode``, past ``lengths``) are meaningless. Under ``jit`` (ids cannot raise) an id outside ``[0, V)`` makes its
          whole row NaN, never a silently clamped lookup.
        """
        h = self.hidden(tokens, positions=positions, segment_ids=segment_ids, train=train, decode=decode,
                        lengths=lengths)
        h = lm_inputs.rows_at(h, logits_at)
        if self.config.tie_embeddings:  # float32 logits: h Eᵀ (Press & Wolf 2017)
            return jnp.einsum("bte,ve->btv", h.astype(jnp.float32),
                              jnp.asarray(self.embedding.embedding, jnp.float32))
        return self.output(h.astype(jnp.float32)).astype(jnp.float32)


def init_cache(model: LanguageModel, batch_size: int, max_length: Optional[int] = None):
    """An empty decoding cache (zeros, index 0) for ``batch_size`` rows of ``max_length`` tokens.

    Args:
      model: a :class:`LanguageModel`.
      batch_size: ``B``.
      max_length: cache length ``L`` (prompt + generated tokens); default ``config.max_length``.

    Returns:
      The ``"cache"`` collection: every ``layers_{i}/self_attention`` holds flax's
      ``cached_key``/``cached_value [B, L, K, H]`` and scalar ``cache_index``; a decode call
      with ``lengths`` adds the per-example ``cache_lengths [B]``.
    """
    max_length = model.config.max_length if max_length is None else int(max_length)
    if batch_size < 1 or not 1 <= max_length <= model.config.max_length:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1 and max_length ({max_length}) in "
                         f"[1, LMConfig.max_length={model.config.max_length}].")
    tokens = jnp.zeros((batch_size, max_length), jnp.int32)
    # Only shapes are needed (every cache entry starts at zero), so trace, don't run.
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
