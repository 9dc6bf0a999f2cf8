"""The attention implementations the benchmark compares, behind one calling convention.

Every JAX entry is a function ``(query [B,T,N,H], key [B,S,N,H], value [B,S,N,H])
-> [B,T,N,H]`` that the runner jits as-is (forward) or wraps in ``jax.vjp``
(forward + backward). PyTorch SDPA runs in a separate process
(:mod:`benchmarks.torch_worker`).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import flax.linen as nn
import jax

from flax_attention.attention import scaled_dot_product_attention


CHUNKED = "ours-chunked"


def jax_impls(causal: bool) -> Dict[str, Callable]:
    """Our two paths and the JAX/Flax peers (self-attention); cuDNN only where a GPU exists."""
    impls = {
        CHUNKED: lambda q, k, v: scaled_dot_product_attention(
            q, k, v, is_causal=causal, implementation="chunked"),
        "ours-dense": lambda q, k, v: scaled_dot_product_attention(
            q, k, v, is_causal=causal, implementation="dense"),
        "jax.nn-xla": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"),
    }
    if jax.default_backend() == "gpu":
        impls["jax.nn-cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn")
    # flax.linen has no is_causal flag: build its [B, 1, T, T] causal mask the flax way,
    # inside the traced function (a captured concrete mask would be a T² constant).
    impls["flax.linen"] = lambda q, k, v: nn.dot_product_attention(
        q, k, v, mask=nn.make_causal_mask(q[:, :, 0, 0]) if causal else None)
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
