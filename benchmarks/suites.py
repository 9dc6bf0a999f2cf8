"""Shape presets (suites) for the attention benchmark and the memory rule that skips dense peers.

A suite is a list of ``(B, T, N, H, dtypes)`` shapes plus timing defaults;
``--budget``, ``--max-runs`` and ``--dense-max-gib`` on the command line
override the suite's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

Shape = Tuple[int, int, int, int, Tuple[str, ...]]  # (B, T, N, H, dtypes)
BOTH = ("float32", "bfloat16")


@dataclass(frozen=True)
class Suite:
    """One preset.

    Attributes:
      shapes: the ``(B, T, N, H, dtypes)`` to run, in order.
      budget_s: seconds of timed runs per measurement.
      max_runs: cap on timed runs per measurement.
      passes: times every case this many times (whole suite per pass) and
        keeps each measurement's best median.
      dense_max_gib: skip the dense O(T²) implementations (``peers.DENSE``)
        without compiling them when one float32 ``[B, N, T, T]`` logits tensor
        would exceed this many GiB; ``None`` = compile them and rely on XLA's
        memory plan against ``--mem-limit-gib`` alone.
    """

    shapes: Tuple[Shape, ...]
    budget_s: float = 3.0
    max_runs: int = 20
    dense_max_gib: Optional[float] = None
    passes: int = 1


# CPU default: N=8, H=64. T=8192 runs in float32 only to keep the suite near 10 minutes
# on 2 CPU cores; --dtypes changes that.
CPU = Suite(((4, 512, 8, 64, BOTH), (1, 2048, 8, 64, BOTH), (1, 8192, 8, 64, ("float32",))),
            budget_s=2.0, passes=2)
QUICK = Suite(((1, 256, 2, 32, ("float32",)),), budget_s=0.5, max_runs=5)
# --long: causal only (the memory bar); run first so the process RSS is its own.
LONG: Tuple[Shape, ...] = ((1, 32768, 8, 64, ("float32",)),)

# GPU: a fixed work size per case so that every T costs about the same memory for
# q/k/v/out/grads (B·T = 32768 tokens: 128 MiB per tensor in bfloat16 at N·H = 2048)
# and FLOPs grow only linearly in T. N·H = 2048 (a 2048-wide model: N = 32 at H = 64,
# 16 at H = 128). Dense peers stop at 16 GiB of float32 logits (N·T/8192 GiB here:
# T ≤ 4096 at H = 64, T ≤ 8192 at H = 128); their fwd+bwd needs about three such
# tensors, which fits an 80 GB H100 and leaves the O(T) kernels the long sequences.
GPU_TOKENS, GPU_WIDTH = 32768, 2048
GPU_T = (1024, 2048, 4096, 8192, 16384, 32768)
GPU = Suite(tuple((GPU_TOKENS // t, t, GPU_WIDTH // h, h, ("bfloat16", "float32"))
                  for t in GPU_T for h in (64, 128)),
            budget_s=0.5, max_runs=20, dense_max_gib=16.0)

SUITES = {"cpu": CPU, "gpu": GPU, "quick": QUICK}


def dense_logits_gib(b: int, n: int, t: int, s: Optional[int] = None) -> float:
    """GiB of one float32 ``[B, N, T, S]`` logits tensor, the dense paths' largest buffer."""
    return 4.0 * b * n * t * (t if s is None else s) / 2**30
