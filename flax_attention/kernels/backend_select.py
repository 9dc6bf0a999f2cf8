"""Which implementation serves an attention call: capability checks and auto selection.

Everything here is pure (no kernel is imported, no device is queried), so the
rules can be tested for every platform on any machine. A call is described by
:class:`AttentionCall`; each fused kernel has a capability function returning
``None`` when it can honour every guarantee of
:func:`~flax_attention.functional.attention.scaled_dot_product_attention` for that call,
or a reason string when it cannot.

Auto selection (``implementation=None``) only ever picks a fused kernel listed
in :data:`MEASURED` for the platform, and only for calls its capability
function accepts; every other call takes the XLA paths (``"dense"``/``"chunked"``).
On GPU that kernel is cuDNN: float16/bfloat16 calls with ``H = D`` a multiple
of 8 up to 128 and no float bias (masks, windows and causal ``T != S`` with
even ``T`` and ``S``) take it; float32, other head sizes, bias, dropout,
returned weights and forward-mode autodiff take the XLA paths. Its entry
rests on *published* figures, not on a run of this project (see
:data:`MEASURED_SOURCES`); nothing is listed for CPU or TPU, and the Pallas and
tokamax kernels stay opt-in until a benchmark of this project measures them.
To enable a kernel once a benchmark shows it wins on a platform, add it to
that platform's tuple, with its source in :data:`MEASURED_SOURCES`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import numpy as np

XLA_IMPLEMENTATIONS = ("dense", "chunked")
# Pallas kernels JAX can interpret on any backend (CPU included), for testing:
# ``implementation="pallas_triton:interpret"``. Part of the (static) name, so a
# jitted function can never reuse a trace made with the other mode.
INTERPRET_SUFFIX = ":interpret"
# The fused kernels' names, their capability rules and which can be interpreted
# are all read from :data:`KERNELS` (defined below, after the rules); the
# kernels' runners sit in :mod:`flax_attention.kernels.backends` under the same names.

# Kernels measured to beat the XLA paths, per platform, in order of preference.
MEASURED = {"cpu": (), "gpu": ("cudnn",), "tpu": ()}
# Where each MEASURED entry's evidence comes from. "published" = someone else's
# figures, counted as the measurement until this project's own GPU run
# (benchmarks/accelerator_check.py) replaces them with "measured here".
MEASURED_SOURCES = {
    ("gpu", "cudnn"): (
        "published, not measured by this project: tokamax's autotuning timing tables for "
        "NVIDIA H100 80GB HBM3 (tokamax/data/autotuning/nvidia_h100_80gb_hbm3/), as quoted in "
        "issue 20: bfloat16 B=1 S=16384 N=16 H=128 causal forward, cuDNN via jax.nn 645 TFLOP/s, "
        "Mosaic 636, Triton 361, XLA chunked 26 (about 25x the XLA path)"),
}

# Auto-dispatch threshold on the dense path's float32 logits (4·B·N·T·S bytes):
# below it the dense path is simplest and fast; above it a few such temporaries
# (logits, probabilities, their gradients) would cost >1 GiB.
AUTO_CHUNKED_BYTES = 256 * 2**20
# On CPU the chunked kernel is also the faster one once both lengths reach a few
# key blocks: measured on the 2-core benchmark machine (float32, N=8, H=64,
# fwd+bwd, causal and not): T=S=512 (B=4, 8) chunked 0.74-0.91x dense's time,
# T=S=1024 0.16-0.2x; T=S=256 (B=16) 1.16-1.34x, T=S=128 (B=32) 1.36-1.48x,
# so shorter sequences stay dense (benchmarks/results/cpu_levers.md).
CPU_CHUNKED_MIN_LENGTH = 512


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """Static description of one attention call (shapes in the package legend).

    Attributes:
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"`` (the default backend's platform).
      batch: product of the leading ``...`` dims.
      t, s, n, k, h, d: ``T``, ``S``, ``N``, ``K``, ``H``, ``D``.
      dtype: name of the query/key/value dtype, e.g. ``"bfloat16"``.
      has_mask: a boolean ``mask`` array was given.
      has_bias: a float ``bias`` array was given.
      is_causal: causal masking requested.
      alignment: ``"bottom_right"`` or ``"top_left"``.
      has_window: a sliding window was given.
      dropout: attention dropout is active.
      return_weights: the weights must be returned.
      forward_mode: inside ``jax.jvp``/``jacfwd``/``hessian`` or a gradient of a
        gradient: autodiff a once-differentiable ``custom_vjp`` cannot serve.
      static_scale: the scale is a Python number (kernels take it as a
        compile-time constant), not a traced array.
      interpret: run the Pallas kernel in interpret mode.
    """

    platform: str
    batch: int
    t: int
    s: int
    n: int
    k: int
    h: int
    d: int
    dtype: str = "float32"
    has_mask: bool = False
    has_bias: bool = False
    is_causal: bool = False
    alignment: str = "bottom_right"
    has_window: bool = False
    dropout: bool = False
    return_weights: bool = False
    forward_mode: bool = False
    static_scale: bool = True
    interpret: bool = False


def parse_implementation(implementation: str) -> Tuple[str, bool]:
    """Splits ``"name[:interpret]"`` into ``(name, interpret)``; unknown names raise ``ValueError``."""
    if not isinstance(implementation, str):
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}.")
    name, interpret = implementation, implementation.endswith(INTERPRET_SUFFIX)
    if interpret:
        name = implementation[: -len(INTERPRET_SUFFIX)]
        if name not in INTERPRETABLE:
            raise ValueError(
                f"implementation={implementation!r}: only {INTERPRETABLE} have an interpret mode "
                f"(append {INTERPRET_SUFFIX!r} to one of them).")
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be None (auto) or one of {IMPLEMENTATIONS} (Pallas kernels may "
            f"add {INTERPRET_SUFFIX!r}), got {implementation!r}.")
    return name, interpret


def _common(call: AttentionCall) -> Optional[str]:
    """Limits shared by every fused kernel (all are custom-VJP flash kernels)."""
    if call.dropout:
        return "it supports no attention dropout"
    if call.return_weights:
        return "it never materialises the weights (return_weights=True)"
    if call.forward_mode:
        return "its custom VJP has no forward-mode rule (jax.jvp/jacfwd/hessian)"
    if call.t == 0 or call.s == 0:
        return f"it needs non-empty sequences (T={call.t}, S={call.s})"
    if not call.static_scale:
        return "it takes the scale as a compile-time Python float, not a traced array"
    if call.dtype == "float64":
        return "it has no float64 kernel"
    return None


def _hardware(call: AttentionCall, platforms: Tuple[str, ...]) -> Optional[str]:
    if call.interpret or call.platform in platforms:
        return None
    return f"it needs a {'/'.join(p.upper() for p in platforms)} and this is a {call.platform.upper()}"


def cudnn_gets_mask(call: AttentionCall) -> bool:
    """Whether the cuDNN adapter hands the kernel a mask (which jax sends to cuDNN as a bias).

    Its own causal flag is top-left, so causal with ``T != S`` travels as a mask too.
    """
    return call.has_mask or call.has_window or (call.is_causal and call.t != call.s)


def _cudnn(call: AttentionCall) -> Optional[str]:
    # The rules of jax's cuDNN wrapper (jax/_src/cudnn/fused_attention_stablehlo.py,
    # check_layout and check_is_flash_attention) for the calls this adapter makes.
    if call.dtype not in ("float16", "bfloat16"):
        return f"cuDNN flash attention takes float16/bfloat16 inputs, not {call.dtype}"
    if call.h != call.d:
        return f"cuDNN needs H == D (got H={call.h}, D={call.d})"
    if call.h % 8 or call.h > 128:  # 256 on Hopper and later; 128 holds on every GPU
        return f"cuDNN needs a head dim that is a multiple of 8 and <= 128 (got {call.h})"
    if call.has_bias:
        return "its bias gradient is not verified here"
    if cudnn_gets_mask(call) and (call.t % 2 or call.s % 2):
        # A mask reaches cuDNN as a bias, and its backward with a bias needs even lengths.
        return (f"with a mask, window or causal T != S it needs even T and S for the backward "
                f"(got T={call.t}, S={call.s})")
    return None


def triton_query_length(call: AttentionCall) -> int:
    """Query length the Pallas Triton kernel sees (bottom-right causal is re-aligned to top-left)."""
    if call.is_causal and call.alignment == "bottom_right" and call.t != call.s:
        return call.s  # queries padded at the front (T < S) or the dead leading rows cut (T > S)
    return call.t


def _triton_length_ok(length: int) -> bool:
    # Triton blocks are powers of two; the kernel uses min(128, length) as block.
    return length % 128 == 0 or (16 <= length < 128 and length & (length - 1) == 0)


def _pallas_triton(call: AttentionCall) -> Optional[str]:
    if call.has_mask or call.has_bias or call.has_window:
        return "the kernel takes no mask, bias or window (only is_causal)"
    if call.dtype not in ("float16", "bfloat16", "float32"):
        return f"it takes float16/bfloat16/float32, not {call.dtype}"
    for name, length in (("T", triton_query_length(call)), ("S", call.s)):
        if not _triton_length_ok(length):
            return f"{name}={length} must be a multiple of 128 or a power of two in [16, 128)"
    if max(call.h, call.d) > 256:
        return f"head dims above 256 are not supported (H={call.h}, D={call.d})"
    return None


def _pallas_tpu(call: AttentionCall) -> Optional[str]:
    if call.dtype not in ("bfloat16", "float32"):
        return f"it takes bfloat16/float32, not {call.dtype}"
    return None


def _tokamax(call: AttentionCall) -> Optional[str]:
    if call.dtype not in ("float16", "bfloat16", "float32"):
        return f"it takes float16/bfloat16/float32, not {call.dtype}"
    if call.has_bias:
        return "its bias gradient is not verified here"
    return None


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One fused kernel's entry in the registry.

    Attributes:
      platforms: the platforms with its hardware.
      check: its own capability rule (after the rules every kernel shares):
        ``None`` when it can serve the call, else why not.
      interpretable: a Pallas kernel that JAX can run in interpret mode on any
        backend (``"<name>:interpret"``).
    """

    platforms: Tuple[str, ...]
    check: Callable[[AttentionCall], Optional[str]]
    interpretable: bool = False


# The one registry of fused kernels. Adding one: an entry here and its runner in
# ``backends._KERNELS`` (an import-time check keeps the two in step).
KERNELS = {
    "cudnn": Kernel(("gpu",), _cudnn),
    "pallas_triton": Kernel(("gpu",), _pallas_triton, interpretable=True),
    "pallas_tpu": Kernel(("tpu",), _pallas_tpu, interpretable=True),
    "tokamax_triton": Kernel(("gpu",), _tokamax),
    "tokamax_mosaic": Kernel(("gpu", "tpu"), _tokamax),
}
KERNEL_IMPLEMENTATIONS = tuple(KERNELS)
IMPLEMENTATIONS = XLA_IMPLEMENTATIONS + KERNEL_IMPLEMENTATIONS
INTERPRETABLE = tuple(name for name, kernel in KERNELS.items() if kernel.interpretable)


def capability(name: str, call: AttentionCall) -> Optional[str]:
    """``None`` if kernel ``name`` can honour ``call``, else why not (a clause for an error message)."""
    kernel = KERNELS[name]
    return _common(call) or _hardware(call, kernel.platforms) or kernel.check(call)


def xla_implementation(call: AttentionCall, threshold: int = AUTO_CHUNKED_BYTES) -> str:
    """The XLA rule: ``"chunked"`` above ``threshold`` bytes of float32 logits, or on CPU
    once ``T`` and ``S`` reach :data:`CPU_CHUNKED_MIN_LENGTH`; ``"dense"`` when only
    dense can do the call (dropout, returned weights, forward-mode autodiff)."""
    big = 4 * call.batch * call.n * call.t * call.s > threshold
    if call.platform == "cpu" and min(call.t, call.s) >= CPU_CHUNKED_MIN_LENGTH:
        big = True  # measured faster there, not only smaller
    dense_only = call.dropout or call.return_weights or call.forward_mode
    return "chunked" if big and not dense_only else "dense"


def select_implementation(call: AttentionCall, threshold: int = AUTO_CHUNKED_BYTES) -> str:
    """The implementation ``implementation=None`` uses: a measured kernel that accepts the call, else XLA.

    Args:
      call: the call's static description.
      threshold: logits size in bytes above which the XLA rule picks ``"chunked"``.

    Returns:
      A name from :data:`IMPLEMENTATIONS` (never an interpret-mode one).
    """
    for name in MEASURED.get(call.platform, ()):
        if capability(name, call) is None:
            return name
    return xla_implementation(call, threshold)


def resolve(implementation: Optional[str], call: AttentionCall,
            threshold: int = AUTO_CHUNKED_BYTES) -> Tuple[str, bool]:
    """``(name, interpret)`` for a call, or a ``ValueError`` saying why the request cannot be met and what to use.

    ``call.interpret`` is ignored; it is taken from the name. ``threshold`` is
    passed to :func:`select_implementation`.
    """
    if implementation is None:
        return select_implementation(call, threshold), False
    name, interpret = parse_implementation(implementation)
    if name == "chunked" and (call.dropout or call.return_weights):
        raise ValueError(
            "implementation='chunked' supports neither attention dropout nor return_weights "
            "(it never materialises the weights); use implementation='dense' for those.")
    if name in XLA_IMPLEMENTATIONS:
        return name, False
    reason = capability(name, dataclasses.replace(call, interpret=interpret))
    if reason is not None:
        fix = "dense" if (call.dropout or call.return_weights or call.forward_mode) else "chunked"
        fix = f"use implementation='{fix}' (or None for automatic choice)"
        if name in INTERPRETABLE and reason.startswith("it needs a "):
            fix += f", or '{name}{INTERPRET_SUFFIX}' to test the kernel in interpret mode"
        raise ValueError(f"implementation={implementation!r} cannot serve this call: {reason}; {fix}.")
    return name, interpret


def describe(query_shape, key_shape, value_shape, dtype, **options) -> AttentionCall:
    """Builds an :class:`AttentionCall` from ``[..., T, N, H]``/``[..., S, K, H]``/``[..., S, K, D]`` shapes."""
    return AttentionCall(
        batch=int(np.prod(query_shape[:-3], dtype=np.int64)),
        t=query_shape[-3], n=query_shape[-2], h=query_shape[-1],
        s=key_shape[-3], k=key_shape[-2], d=value_shape[-1],
        dtype=np.dtype(dtype).name, **options)
