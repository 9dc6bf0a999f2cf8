"""The attention implementations the benchmark compares, behind one calling convention.

Every JAX entry is a function ``(query [B,T,N,H], key [B,S,N,H], value [B,S,N,H])
-> [B,T,N,H]`` that the runner jits as-is (forward) or wraps in ``jax.vjp``
(forward + backward). PyTorch SDPA runs in a separate process
(:mod:`benchmarks.torch_worker`). tokamax is optional: without it its peers
are left out and :func:`tokamax_missing` says why.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, Optional

import flax.linen as nn
import jax

from flax_attention.functional.attention import scaled_dot_product_attention


CHUNKED = "ours-chunked"
AUTO = "ours-auto"  # implementation=None: what a user gets by default
OURS = (CHUNKED, "ours-dense", AUTO)
# Implementations that materialise the [B, N, T, S] logits: a suite may skip them
# above a size instead of compiling plans that cannot fit (or take minutes).
DENSE = ("ours-dense", "jax.nn-xla", "flax.linen", "tokamax-xla")
# tokamax's fused kernels exist only on accelerators ("mosaic" resolves to the
# Mosaic GPU or the Mosaic TPU kernel by device; Triton is GPU-only).
TOKAMAX_ACCEL = {"gpu": ("triton", "mosaic"), "tpu": ("mosaic",)}
_TOKAMAX_ERROR: Dict[str, str] = {}


def _import_tokamax():
    """tokamax, or ``None`` with the reason kept for :func:`tokamax_missing`."""
    try:
        tokamax = importlib.import_module("tokamax")
    except Exception as err:  # noqa: BLE001 - any failure means "no tokamax peers", reported
        _TOKAMAX_ERROR["reason"] = f"{type(err).__name__}: {err}"
        return None
    # tokamax reads its options from absl flags and, on first use, parses sys.argv,
    # which holds this benchmark's argparse flags and fails; parse an empty command
    # line instead so tokamax runs with its defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])
    return tokamax


def tokamax_missing() -> Optional[str]:
    """Why tokamax's peers are absent (``None`` when it imports)."""
    if _import_tokamax() is not None:
        return None
    return f"tokamax peers skipped: tokamax is not importable ({_TOKAMAX_ERROR.get('reason', '?')})"


def tokamax_impls(causal: bool, platform: str) -> Dict[str, Callable]:
    """``tokamax-<impl>`` entries: the XLA ones everywhere, fused kernels on GPU/TPU."""
    tokamax = _import_tokamax()
    if tokamax is None:
        return {}

    def entry(name):  # binds ``name`` now; a lambda in the comprehension would share the last one
        return lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation=name)

    names = ("xla", "xla_chunked") + TOKAMAX_ACCEL.get(platform, ())
    return {f"tokamax-{name}": entry(name) for name in names}


def jax_impls(causal: bool, platform: Optional[str] = None) -> Dict[str, Callable]:
    """Our paths and the JAX/Flax/tokamax peers (self-attention) for ``platform``.

    Args:
      causal: causal self-attention or full attention.
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``; defaults to JAX's default
        backend. cuDNN and tokamax's fused kernels are only listed on accelerators.

    Returns:
      Name -> ``(q, k, v) -> out``, ours first.
    """
    platform = platform or jax.default_backend()
    impls = {
        CHUNKED: lambda q, k, v: scaled_dot_product_attention(
            q, k, v, is_causal=causal, implementation="chunked"),
        "ours-dense": lambda q, k, v: scaled_dot_product_attention(
            q, k, v, is_causal=causal, implementation="dense"),
        AUTO: lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=causal),
        "jax.nn-xla": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"),
    }
    if platform == "gpu":
        impls["jax.nn-cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn")
    # flax.linen has no is_causal flag: build its [B, 1, T, T] causal mask the flax way,
    # inside the traced function (a captured concrete mask would be a T² constant).
    impls["flax.linen"] = lambda q, k, v: nn.dot_product_attention(
        q, k, v, mask=nn.make_causal_mask(q[:, :, 0, 0]) if causal else None)
    impls.update(tokamax_impls(causal, platform))
    return impls


def fwd_bwd(fn: Callable) -> Callable:
    """``(q, k, v, dout) -> (dq, dk, dv)``: one forward and one backward pass."""
    def run(q, k, v, dout):
        _, pullback = jax.vjp(fn, q, k, v)
        return pullback(dout)
    return run


def compile_jax(fn: Callable, args) -> "jax.stages.Compiled":
    """AOT-compiles once; the same executable is timed and memory-analysed."""
    return jax.jit(fn).lower(*args).compile()


def memory_bytes(compiled) -> Dict[str, Optional[int]]:
    """XLA's static buffer assignment: scratch (temp) bytes and args+outputs+temp."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return {"temp": None, "total": None}
    if m is None:
        return {"temp": None, "total": None}
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"temp": int(m.temp_size_in_bytes), "total": int(total)}


def device_peak_bytes() -> Optional[int]:
    """Accelerator allocator high-water mark (process-wide, monotone); ``None`` on CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def torch_available() -> bool:
    """Whether PyTorch is installed (checked without importing it into this process)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None
