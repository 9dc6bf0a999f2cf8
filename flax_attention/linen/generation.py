"""Sampled generation from a decoder-only language model with its KV cache.

:func:`generate` prefills the (right-padded, ragged) prompts into the cache in
one call, then runs one decode step per new token inside ``lax.while_loop``
(one per phase of at least 64 tokens, each over a cache just long enough for
it: ``_phase_lengths``): one compile for the whole generation, no retrace per
token, and the loop ends as soon as every row has emitted EOS. The sibling of
:mod:`flax_attention.linen.decoding` (greedy/beam search of the encoder-decoder
Transformer); the token choice is :func:`flax_attention.functional.sampling.sample_logits`
(greedy when ``temperature == 0``, else temperature / top-k / top-p sampling).

The model is any linen causal LM with this package's decoding protocol, e.g.
:class:`flax_attention.models.lm.LanguageModel`: ``model.apply(variables,
tokens [B, T], decode=True, lengths=[B], logits_at=[B] | None, mutable=['cache'])``
returns float32 logits ``[B, T, V]`` (``[B, 1, V]``, row ``b`` at position
``logits_at[b]``, when given) and advances each row's cache by its own length (flax's
``"cache"`` collection in its layout, allocated by ``model.init(rng, tokens [B, L],
decode=True)``; :func:`generate` lengthens ``cached_key``/``cached_value`` between
phases), and ``model.config`` has ``vocab_size``, ``max_length``,
``eos_id`` and ``pad_id``. (This module takes it as an argument rather than
importing it: imports run models -> linen.)

Outputs are the new tokens only, ``[B, max_new_tokens]``: EOS included, then
``pad_id``. Nothing is banned: the tokens come from the model's own distribution.
Index arithmetic is int32, so it also runs under ``jax.enable_x64``.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from flax_attention.functional.sampling import check_sampling, sample_logits

Array = jnp.ndarray


def generate(model, params, prompts: ArrayLike, lengths: Optional[ArrayLike] = None, *, key: Optional[jax.Array] = None,
             max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0,
             eos_id: Optional[int] = None, stop_at_eos: bool = True, pad_id: Optional[int] = None,
             return_logits: bool = False):
    """Continues each prompt by up to ``max_new_tokens`` tokens (one jitted call).

    Every argument is checked before any work; the sampling settings and
    ``max_new_tokens`` are static (each new value compiles once).

    Args:
      model: the linen LM (static: hashed by its config); see the module docstring.
      params: its ``"params"`` collection.
      prompts: int ``[B, T]``, right-padded; ids in ``[0, V)``.
      lengths: int ``[B]`` real prompt tokens per row, in ``[1, T]``; default ``T``.
        Each row continues from its own last token (per-example cache positions).
      key: PRNG key; required unless ``temperature == 0``. Step ``i`` uses
        ``fold_in(key, i)``, so a fixed key reproduces the output.
      max_new_tokens: ``N >= 0``; ``T + N`` must fit ``model.config.max_length``.
      temperature: ``>= 0``; ``0`` is exactly greedy (argmax).
      top_k: ``None`` or an int ``>= 1``. top_p: in ``(0, 1]``.
      eos_id: stop token (default ``model.config.eos_id``); a row stops after emitting it.
      stop_at_eos: ``False`` always generates ``N`` tokens (benchmarks).
      pad_id: fills a row after its EOS (default ``model.config.pad_id``).
      return_logits: also return the model's raw float32 logits of every step.

    Returns:
      int32 ``[B, N]`` new tokens (EOS included, ``pad_id`` after it); with
      ``return_logits`` also ``[B, N, V]`` float32, where row ``b`` step ``i`` holds the
      logits that chose token ``i`` (zeros once the loop stopped).

    Raises:
      ValueError: a bad sampling argument, a prompt longer than ``max_length - N``
        (or than ``max_length``), ids outside the vocabulary, lengths outside ``[1, T]``.
    """
    config = model.config
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    prompts = jnp.asarray(prompts)
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer) or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be an integer array [B, T] with T >= 1, got {prompts.dtype} {prompts.shape}.")
    b, t = prompts.shape
    if t > config.max_length:
        raise ValueError(f"prompt length T={t} exceeds the model's max_length={config.max_length}; "
                         "truncate the prompt (keep its last tokens).")
    if t + max_new_tokens > config.max_length:
        raise ValueError(f"prompt length T={t} + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"max_length={config.max_length}; lower max_new_tokens to {config.max_length - t} "
                         "or shorten the prompt.")
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths)
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be int [B={b}], got {lengths.dtype} {lengths.shape}.")
    if not isinstance(prompts, jax.core.Tracer) and not isinstance(lengths, jax.core.Tracer):
        arr, n = np.asarray(prompts), np.asarray(lengths)
        if np.any((n < 1) | (n > t)):
            raise ValueError(f"lengths must be in [1, T={t}] (each prompt needs a token, e.g. BOS), "
                             f"got {n.tolist()}.")
        real = np.arange(t)[None, :] < n[:, None]
        bad = arr[real & ((arr < 0) | (arr >= config.vocab_size))]
        if bad.size:
            raise ValueError(f"prompt id {int(bad[0])} is outside the vocabulary [0, {config.vocab_size}); "
                             "encode prompts with the model's own tokenizer.")
    if temperature > 0 and key is None:
        raise ValueError(f"temperature={temperature} samples: pass key=jax.random.key(seed) "
                         "(or temperature=0 for greedy).")
    eos = config.eos_id if eos_id is None else int(eos_id)
    pad = config.pad_id if pad_id is None else int(pad_id)
    if max_new_tokens == 0:
        out = jnp.zeros((b, 0), jnp.int32)
        return (out, jnp.zeros((b, 0, config.vocab_size), jnp.float32)) if return_logits else out
    key = jax.random.key(0) if key is None else key  # unused by greedy decoding
    # EOS and PAD are traced (-1 never matches a token): changing them does not recompile.
    return _generate(model, params, prompts, lengths.astype(jnp.int32), key, jnp.int32(eos if stop_at_eos else -1),
                     jnp.int32(pad), max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                     top_k=None if top_k is None else int(top_k), top_p=float(top_p), return_logits=return_logits,
                     phases=_phase_lengths(t, int(max_new_tokens)))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "return_logits", "phases"))
def _generate(model, params, prompts, lengths, key, eos_id, pad_id, *, max_new_tokens, temperature, top_k, top_p,
              return_logits, phases):
    b, t = prompts.shape
    n = max_new_tokens
    # The cache starts with the prompt's T slots and grows by whole phases (cache
    # lengths `phases`, see _phase_lengths); rows with a shorter prompt continue from their own length.
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((b, t), jnp.int32),
                                               decode=True))["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def run(cache, tokens, count, at=None):
        logits, mutated = model.apply({"params": params, "cache": cache}, tokens, decode=True, lengths=count,
                                      logits_at=at, mutable=["cache"])
        return logits.astype(jnp.float32), mutated["cache"]

    def choose(logits, i, done):
        tok = sample_logits(jax.random.fold_in(key, i), logits, temperature=temperature, top_k=top_k, top_p=top_p)
        tok = jnp.where(done, pad_id, tok).astype(jnp.int32)
        return tok, done | (tok == eos_id)

    # Prefill: every row's logits at its own last prompt token choose new token 0.
    logits, cache = run(cache, prompts, lengths, at=lengths - 1)
    last = logits[:, 0]  # [B, V]
    tok, done = choose(last, 0, jnp.zeros((b,), bool))
    out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)
    seen = jnp.zeros((b, n, last.shape[-1]) if return_logits else (0,), jnp.float32)
    if return_logits:
        seen = seen.at[:, 0].set(last)

    def body(state):
        i, cache, out, prev, done, seen = state
        logits, cache = run(cache, prev[:, None], None)  # one token per row, at each row's own position
        tok, done = choose(logits[:, 0], i, done)
        zero = jnp.zeros_like(i)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (zero, i))
        if return_logits:
            seen = jax.lax.dynamic_update_slice(seen, logits[:, :1], (zero, i, zero))
        return i + 1, cache, out, tok, done, seen

    def running(end):  # the loop condition of a phase that ends before step `end`
        return lambda state: (state[0] < end) & ~jnp.all(state[4])

    state = (jnp.int32(1), cache, out, tok, done, seen)
    for length in phases:
        # Step i writes slot lengths + i - 1 <= T + i - 1, so a cache of `length` slots serves i <= length - T.
        state = state[:1] + (_grow(state[1], length),) + state[2:]
        state = jax.lax.while_loop(running(min(n, length - t + 1)), body, state)
    _, _, out, _, _, seen = state
    return (out, seen) if return_logits else out


# Each decode step reads every slot of the cache, filled or not, so a cache of
# T + N slots from the start makes early steps read up to N empty ones (an eager
# loop, e.g. PyTorch's, slices the filled prefix instead). The loop therefore
# runs in phases of at least _PHASE new tokens, each over a cache just long
# enough for it (zero slots appended between phases: one copy per phase), and at
# most _MAX_PHASES of them, as each phase compiles its own copy of the step.
_PHASE, _MAX_PHASES = 64, 8


def _phase_lengths(t: int, n: int) -> tuple:
    """Cache lengths of the decode phases for a ``T``-token prompt and ``N`` new tokens (steps 1 .. N - 1)."""
    step = max(_PHASE, -(-(n - 1) // _MAX_PHASES))
    return tuple(min(t + n - 1, t + j) for j in range(step, n - 1 + step, step))


def _grow(cache, length: int):
    """The ``"cache"`` collection with every ``cached_key``/``cached_value [B, L, K, H]`` zero-padded to ``length`` slots."""
    def pad(path, x):
        if getattr(path[-1], "key", None) not in ("cached_key", "cached_value") or x.shape[1] == length:
            return x
        return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return jax.tree_util.tree_map_with_path(pad, cache)
