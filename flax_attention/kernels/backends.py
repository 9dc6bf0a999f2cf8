"""Fused attention kernels behind ``scaled_dot_product_attention(implementation=...)``.

Well-kept kernels are called, not re-implemented:

* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU).
* ``"pallas_triton"``: JAX's Pallas Triton flash kernel
  ``jax.experimental.pallas.ops.gpu.attention.mha`` (GPU).
* ``"pallas_tpu"``: JAX's Pallas TPU flash kernel
  ``jax.experimental.pallas.ops.tpu.flash_attention`` (TPU).
* ``"tokamax_triton"``/``"tokamax_mosaic"``: ``tokamax.dot_product_attention``
  (optional package, ``pip install flax_attention[gpu]``).

``"pallas_triton:interpret"`` and ``"pallas_tpu:interpret"`` run the Pallas
kernels in JAX's interpret mode on any platform (slow; for tests).

Each adapter keeps the package's guarantees where the kernel lacks them:
grouped kv heads are repeated for kernels that need ``N == K``; head dims are
zero-padded where a kernel needs ``H == D`` (zeros change no logit, and the
padded output columns are cut); bottom-right causal alignment is re-expressed
as top-left or as a mask; a query row with nothing to attend to is shown one
harmless visible key (so the kernel never divides by zero) and its output is
then replaced by zeros with ``jnp.where``, which also makes its gradient zero.
Which calls each kernel accepts is decided in
:mod:`flax_attention.kernels.backend_select`; this module assumes they were checked.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.kernels import backend_select
from flax_attention.core.masks import causal_mask, combine_masks, sliding_window_mask

Array = jnp.ndarray

# Finite "minus infinity" for kernel biases: far below any logit, yet adding a
# float32 logit to it cannot overflow to -inf.
_NEG = -0.5 * float(np.finfo(np.float32).max)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _flatten(x: Array) -> Array:
    """``[..., L, heads, dim] -> [B, L, heads, dim]``."""
    return x.reshape((-1,) + x.shape[-3:])


def _pad_last(x: Array, size: int) -> Array:
    return x if x.shape[-1] == size else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _same_heads_and_dims(query, key, value):
    """Repeats kv heads to ``N`` and zero-pads ``H``/``D`` to one head dim, for kernels that need both."""
    g = query.shape[-2] // key.shape[-2]
    if g > 1:
        key, value = jnp.repeat(key, g, axis=-2), jnp.repeat(value, g, axis=-2)
    hd = max(query.shape[-1], value.shape[-1])
    return _pad_last(query, hd), _pad_last(key, hd), _pad_last(value, hd)


def _keep_mask(t, s, mask, bias_keep, is_causal, alignment, window, native_causal):
    """Everything that hides keys, as one boolean mask broadcastable to ``[..., N, T, S]`` (or ``None``)."""
    keep = combine_masks(mask, bias_keep)
    if is_causal and not native_causal:
        keep = combine_masks(keep, causal_mask(t, s, alignment=alignment))
    if window is not None:
        keep = combine_masks(keep, sliding_window_mask(t, s, window=window, alignment=alignment))
    return keep


def _revive(keep: Optional[Array]):
    """``(keep', alive)``: dead rows get key 0 visible in ``keep'``; ``alive`` is ``[..., N|1, T|1]``."""
    if keep is None:
        return None, None
    alive = jnp.any(keep, axis=-1)
    first = jnp.arange(keep.shape[-1]) == 0
    return keep | (~alive[..., None] & first), alive


def _zero_dead(out: Array, alive: Optional[Array]) -> Array:
    """Zeros output rows ``[..., T, N, D]`` whose query saw no key (``alive`` is ``[..., N, T]``-broadcastable)."""
    if alive is None:
        return out
    alive = alive.reshape((1,) * max(0, 2 - alive.ndim) + alive.shape)  # a [T] mask gets a heads axis
    alive = jnp.swapaxes(alive, -1, -2)[..., None]  # [..., T, N, 1]
    return jnp.where(alive, out, jnp.zeros((), out.dtype))


def _flat_mask(keep: Array, batch: tuple, n: int, t: int, s: int) -> Array:
    """A mask broadcastable to ``[*batch, N, T, S]`` as a rank-4 ``[B|1, N|1, T|1, S|1]`` array."""
    keep = keep.reshape((1,) * (len(batch) + 3 - keep.ndim) + keep.shape)
    lead = keep.shape[:-3]
    if all(d == 1 for d in lead):
        return keep.reshape((1,) + keep.shape[-3:])
    return jnp.broadcast_to(keep, batch + keep.shape[-3:]).reshape((-1,) + keep.shape[-3:])


def _masked_kernel(fn, query, key, value, mask, bias_keep, is_causal, alignment, window):
    """Calls ``fn(q, k, v, mask, is_causal)`` on rank-4 arrays for kernels taking a boolean mask."""
    batch, t, s, n = query.shape[:-3], query.shape[-3], key.shape[-3], query.shape[-2]
    # The kernels' own causal flag is top-left; use it only where the alignments agree.
    native = is_causal and t == s
    keep, alive = _revive(_keep_mask(t, s, mask, bias_keep, is_causal, alignment, window, native))
    flat = None if keep is None else _flat_mask(keep, batch, n, t, s)
    out = fn(_flatten(query), _flatten(key), _flatten(value), flat, native)
    return _zero_dead(out.reshape(batch + out.shape[-3:]).astype(query.dtype), alive)


def _cudnn(query, key, value, mask, bias, bias_keep, scale, is_causal, alignment, window, precision, interpret):
    del bias, precision, interpret  # refused by its capability; cuDNN picks its own precision; no interpret mode.

    def fn(q, k, v, m, causal):
        if m is not None:  # jax's cuDNN path takes the mask's T and S axes only at full size
            m = jnp.broadcast_to(m, m.shape[:2] + (q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale, is_causal=causal, implementation="cudnn")

    return _masked_kernel(fn, query, key, value, mask, bias_keep, is_causal, alignment, window)


def _tokamax(kind):
    def run(query, key, value, mask, bias, bias_keep, scale, is_causal, alignment, window, precision, interpret):
        del bias, interpret  # bias: refused by its capability
        if importlib.util.find_spec("tokamax") is None:
            raise ValueError(
                f"implementation='tokamax_{kind}' needs the optional package tokamax "
                "(pip install 'flax_attention[gpu]'); use implementation='chunked' without it.")
        import tokamax

        def fn(q, k, v, m, causal):
            return tokamax.dot_product_attention(
                q, k, v, mask=m, scale=scale, is_causal=causal, precision=precision, implementation=kind)

        return _masked_kernel(fn, query, key, value, mask, bias_keep, is_causal, alignment, window)

    return run


def _pallas_triton(query, key, value, mask, bias, bias_keep, scale, is_causal, alignment, window, precision,
                   interpret):
    """Causal/full attention only (capability refuses masks, bias and windows)."""
    del mask, bias, bias_keep, window, precision
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    batch, (t, n, _), d = query.shape[:-3], query.shape[-3:], value.shape[-1]
    s = key.shape[-3]
    q, k, v = _same_heads_and_dims(_flatten(query), _flatten(key), _flatten(value))
    front = dead = 0
    if is_causal and alignment == "bottom_right" and t != s:
        # The kernel's causal mask is top-left (query i sees keys <= i). Bottom-right
        # puts the queries at the last T of S positions: for T < S pad S - T dummy
        # queries in front; for T > S the first T - S queries see no key at all.
        if t < s:
            front = s - t
            q = jnp.pad(q, ((0, 0), (front, 0), (0, 0), (0, 0)))
        else:
            dead = t - s
            q = q[:, dead:]

    def mha(q, causal):
        tq = q.shape[1]
        blocks = gpu_attention.BlockSizes(
            block_q=min(128, tq), block_k=min(128, s),
            block_q_dkv=min(32, tq), block_kv_dkv=min(32, s), block_q_dq=min(32, tq), block_kv_dq=min(32, s))
        return _x32(lambda q, k, v: gpu_attention.mha(
            q, k, v, None, sm_scale=float(scale), causal=causal, block_sizes=blocks, interpret=interpret))(q, k, v)

    if is_causal and q.shape[1] > s:
        # Top-left with T > S: the kernel would read past the last key block (NaN rows);
        # queries from S on see every key, so they need no causal mask at all.
        out = jnp.concatenate([mha(q[:, :s], True), mha(q[:, s:], False)], axis=1)
    else:
        out = mha(q, is_causal)
    out = out[:, front:, :, :d]
    if dead:
        out = jnp.concatenate([jnp.zeros(out.shape[:1] + (dead,) + out.shape[2:], out.dtype), out], axis=1)
    return out.reshape(batch + (t, n, d)).astype(query.dtype)


def _within(fn, *contexts):
    """``fn`` with its forward and backward kernels both traced inside ``contexts``.

    The TPU kernel takes no ``interpret=`` flag, only JAX's contextual switch,
    and its backward pass is traced later, when ``jax.grad`` transposes: a
    plain ``with`` around the forward call would not cover it.
    """

    def entered(f, *args):
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context())
            return f(*args)

    @jax.custom_vjp
    def run(*args):
        return entered(fn, *args)

    def fwd(*args):
        return entered(lambda *a: jax.vjp(fn, *a), *args)  # the vjp function is a pytree: a valid residual

    def bwd(vjp, cotangent):
        return entered(vjp, cotangent)

    run.defvjp(fwd, bwd)
    return run


def _x32(fn):
    """``fn`` traced with 64-bit mode off: the Pallas kernels mix int32 grid ids with
    default-int constants, which become int64 under ``jax_enable_x64`` (a TypeError).
    Their float operands are float32/bfloat16/float16 either way."""
    return _within(fn, lambda: jax.enable_x64(False)) if jax.config.read("jax_enable_x64") else fn


def _pallas_tpu(query, key, value, mask, bias, bias_keep, scale, is_causal, alignment, window, precision,
                interpret):
    """Masks, bias, windows and alignment all travel as one additive bias ``[B, N, T', S']``."""
    del precision  # the kernel takes none
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_attention

    batch, (t, n, _), d = query.shape[:-3], query.shape[-3:], value.shape[-1]
    s = key.shape[-3]
    q, k, v = _same_heads_and_dims(_flatten(query), _flatten(key), _flatten(value))
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # the kernel's [B, N, L, dim]
    # Key blocks must be multiples of 128 lanes; query blocks of 8 sublanes.
    tp = _round_up(t, 8) if t <= 128 else _round_up(t, 128)
    sp = _round_up(s, 128)
    native = is_causal and (alignment == "top_left" or t == s)
    keep, alive = _revive(_keep_mask(t, s, mask, bias_keep, is_causal, alignment, window, native))
    ab = None
    if keep is not None or bias is not None or sp != s:
        # The kernel scales the biased logits, (q·k + ab) * scale: divide the bias
        # by the scale, and keep the masked value finite after the product.
        neg = _NEG / max(scale, 1.0)
        ab = jnp.zeros((), jnp.float32)
        if bias is not None:
            # A finite bias stays finite: flax masks with finfo.min, and finfo.min / scale
            # would overflow to -inf (a dead row instead of the dense path's uniform one).
            # Half of `neg` keeps it far above the masked value, as on the dense path.
            ab = jnp.maximum(bias.astype(jnp.float32) / scale, neg / 2)
        if keep is not None:
            ab = jnp.where(keep, ab, neg)
        ab = jnp.broadcast_to(ab, batch + (n, t, s)).reshape((-1, n, t, s))
        ab = jnp.pad(ab, ((0, 0), (0, 0), (0, tp - t), (0, sp - s)), constant_values=neg)
        ab = ab.at[:, :, t:, 0].set(0.0)  # padded query rows see key 0: no row is fully masked
    q = jnp.pad(q, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, sp - s), (0, 0))) for x in (k, v))
    bq, bk = min(tp, 128), 128
    blocks = tpu_attention.BlockSizes(
        block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
        block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
        block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)

    def call(q, k, v, ab):
        return tpu_attention.flash_attention(q, k, v, ab, causal=native, sm_scale=float(scale), block_sizes=blocks)

    out = (_within(call, pltpu.force_tpu_interpret_mode) if interpret else call)
    out = _x32(out)(q, k, v, ab)
    out = jnp.swapaxes(out[:, :, :t, :d], 1, 2)
    return _zero_dead(out.reshape(batch + (t, n, d)).astype(query.dtype), alive)


# Runners, under the names of backend_select.KERNELS (which holds each kernel's rules).
_KERNELS = {
    "cudnn": _cudnn,
    "pallas_triton": _pallas_triton,
    "pallas_tpu": _pallas_tpu,
    "tokamax_triton": _tokamax("triton"),
    "tokamax_mosaic": _tokamax("mosaic"),
}
if set(_KERNELS) != set(backend_select.KERNELS):  # a kernel registered in one place only
    raise ImportError(f"kernel runners {sorted(_KERNELS)} and rules {sorted(backend_select.KERNELS)} differ")


def fused_attention(name, query, key, value, mask, bias, bias_keep, scale, is_causal, alignment,
                    window, precision=None, interpret=False) -> Array:
    """Runs kernel ``name`` on validated operands (see :func:`flax_attention.core.checks.prepare`).

    Args:
      name: a key of :data:`flax_attention.kernels.backend_select.KERNELS`,
        already accepted by its capability function for this call.
      query: ``[..., T, N, H]``.
      key: ``[..., S, K, H]``.
      value: ``[..., S, K, D]``.
      mask: boolean, broadcastable to ``[..., N, T, S]``, or ``None``.
      bias: finite float, broadcastable to ``[..., N, T, S]``, or ``None``.
      bias_keep: boolean, ``False`` where the bias was ``-inf``, or ``None``.
      scale: Python float logit scale, or ``None`` for ``1 / sqrt(H)``.
      is_causal: apply a causal mask aligned by ``alignment``.
      alignment: ``"bottom_right"`` or ``"top_left"``.
      window: sliding window as in :func:`~flax_attention.core.masks.sliding_window_mask`, or ``None``.
      precision: passed to kernels that take one.
      interpret: run a Pallas kernel in interpret mode.

    Returns:
      ``[..., T, N, D]`` in the query's dtype; rows that see no key are zeros.
    """
    scale = 1.0 / np.sqrt(query.shape[-1]) if scale is None else float(scale)
    return _KERNELS[name](query, key, value, mask, bias, bias_keep, scale, is_causal, alignment, window,
                          precision, interpret)
