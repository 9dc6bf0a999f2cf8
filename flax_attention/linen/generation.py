"""Sampled generation from a decoder-only language model with its KV cache.

:func:`generate` prefills the (right-padded, ragged) prompts into the cache in
one call, then runs one decode step per new token inside a single
``lax.while_loop``: one compile for the whole generation, no retrace per token,
and the loop ends as soon as every row has emitted EOS. The sibling of
:mod:`flax_attention.linen.decoding` (greedy/beam search of the encoder-decoder
Transformer); the token choice is :func:`flax_attention.functional.sampling.sample_logits`
(greedy when ``temperature == 0``, else temperature / top-k / top-p sampling).

The model is any linen causal LM with this package's decoding protocol, e.g.
:class:`flax_attention.models.lm.LanguageModel`: ``model.apply(variables,
tokens [B, T], decode=True, lengths=[B], mutable=['cache'])`` returns float32
logits ``[B, T, V]`` and advances each row's cache by its own length (flax's
``"cache"`` collection, allocated by ``model.init(rng, tokens [B, L],
decode=True)``), and ``model.config`` has ``vocab_size``, ``max_length``,
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
                     top_k=None if top_k is None else int(top_k), top_p=float(top_p), return_logits=return_logits)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "return_logits"))
def _generate(model, params, prompts, lengths, key, eos_id, pad_id, *, max_new_tokens, temperature, top_k, top_p,
              return_logits):
    b, t = prompts.shape
    n = max_new_tokens
    # The cache holds the padded prompt and every new token: T + N slots (rows with a
    # shorter prompt continue from their own length and use fewer).
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((b, t + n), jnp.int32),
                                               decode=True))["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def run(cache, tokens, count):
        logits, mutated = model.apply({"params": params, "cache": cache}, tokens, decode=True, lengths=count,
                                      mutable=["cache"])
        return logits.astype(jnp.float32), mutated["cache"]

    def choose(logits, i, done):
        tok = sample_logits(jax.random.fold_in(key, i), logits, temperature=temperature, top_k=top_k, top_p=top_p)
        tok = jnp.where(done, pad_id, tok).astype(jnp.int32)
        return tok, done | (tok == eos_id)

    # Prefill: every row's logits at its own last prompt token choose new token 0.
    logits, cache = run(cache, prompts, lengths)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
    tok, done = choose(last, 0, jnp.zeros((b,), bool))
    out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)
    seen = jnp.zeros((b, n, last.shape[-1]) if return_logits else (0,), jnp.float32)
    if return_logits:
        seen = seen.at[:, 0].set(last)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, cache, out, prev, done, seen = state
        logits, cache = run(cache, prev[:, None], None)  # one token per row, at each row's own position
        tok, done = choose(logits[:, 0], i, done)
        zero = jnp.zeros_like(i)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (zero, i))
        if return_logits:
            seen = jax.lax.dynamic_update_slice(seen, logits[:, :1], (zero, i, zero))
        return i + 1, cache, out, tok, done, seen

    state = (jnp.int32(1), cache, out, tok, done, seen)
    _, _, out, _, _, seen = jax.lax.while_loop(cond, body, state)
    return (out, seen) if return_logits else out
