"""Static block planning for :func:`flax_attention.kernels.flash.chunked_attention`.

Everything here runs in Python on static shapes: block sizes, the band of
visible ``(query, key)`` pairs from ``is_causal``/``window``, and per block the
contiguous range of blocks that must be computed. Re-exported by
:mod:`flax_attention.kernels.flash`.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax
import numpy as np

from flax_attention.core.checks import static_int
from flax_attention.core.masks import check_alignment, window_sizes

Window = Union[int, Tuple[int, int]]

# Default block edges. On CPU a block step must carry enough work for XLA's
# CPU matmuls (YNNPACK) to keep both cores busy and to amortise the loop's
# per-iteration cost: edges start at 128 and grow, key side first, until the
# step holds CPU_BLOCK_LOGITS logits over all heads (B·N·block_q·block_k), up to
# 256 x 512. Measured on the 2-core benchmark machine (B=1, T=2048, N=8, H=64,
# float32 fwd+bwd, non-causal): 128x128 -> 192 ms, 256x512 -> 117 ms; T=8192:
# 2.99 s -> 1.72 s (benchmarks/results/cpu_levers.md). Accelerators prefer
# fewer, larger blocks because every loop step is a kernel launch.
DEFAULT_BLOCK = {"cpu": 128}
DEFAULT_BLOCK_ACCELERATOR = 512
CPU_BLOCK_LOGITS = 2**20
CPU_MAX_BLOCK = (256, 512)  # (block_q, block_k)
# Causal/windowed calls at B=4, T=512, N=8 (float32 and bfloat16, fwd+bwd): 128x128 is
# 1.3x faster than 128x256, which leaves 2 key blocks and little to skip.
CPU_MIN_BANDED_BLOCKS = 4


def default_block_size() -> int:
    """The default ``block_q``/``block_k`` for the current default JAX backend."""
    return DEFAULT_BLOCK.get(jax.default_backend(), DEFAULT_BLOCK_ACCELERATOR)


def band(t: int, s: int, is_causal: bool, alignment: str, window: Optional[Window]):
    """Structural visibility as a band on ``diff = q_pos - k_pos``.

    Returns ``(offset, left, right)``: query row ``r`` sits at position
    ``r + offset`` and sees key ``c`` iff ``-right <= r + offset - c <= left``
    (``None`` = unbounded). Causal is ``right = 0``; a window ``(left, right)``
    follows :func:`flax_attention.core.masks.sliding_window_mask`.
    """
    check_alignment(alignment)
    offset = s - t if alignment == "bottom_right" else 0
    left, right = (None, None) if window is None else window_sizes(window)
    if is_causal:
        right = 0 if right is None else min(right, 0)
    return offset, left, right


def block_plan(
    t: int, s: int, block_q: int, block_k: int, *,
    offset: int = 0, left: Optional[int] = None, right: Optional[int] = None,
):
    """Static list of the (query block, key block) pairs that must be computed.

    A block is needed iff it holds a pair ``(r, c)`` with
    ``-right <= r + offset - c <= left``, ``r < t``, ``c < s``. The needed key
    blocks of a query block are contiguous (and vice versa), so the plan is a
    pair of half-open ranges per block.

    ``offset, left, right`` describe the band (``None`` = unbounded side).

    Returns:
      ``(kv_lo, kv_hi, q_lo, q_hi)`` int32 NumPy arrays: query block ``i``
      visits key blocks ``kv_lo[i] <= j < kv_hi[i]``; key block ``j`` is
      visited by query blocks ``q_lo[j] <= i < q_hi[j]``. The number of
      computed blocks is ``sum(kv_hi - kv_lo) == sum(q_hi - q_lo)``.
    """
    nq, nk = -(-t // block_q), -(-s // block_k)
    big = t + s + 1  # "unbounded" that stays an exact int
    left = big if left is None else left
    right = big if right is None else right
    kv_lo, kv_hi = np.zeros(nq, np.int32), np.zeros(nq, np.int32)
    for i in range(nq):
        r0, r1 = i * block_q, min((i + 1) * block_q, t) - 1
        c0, c1 = max(r0 + offset - left, 0), min(r1 + offset + right, s - 1)
        if c0 <= c1:
            kv_lo[i], kv_hi[i] = c0 // block_k, c1 // block_k + 1
    q_lo, q_hi = np.zeros(nk, np.int32), np.zeros(nk, np.int32)
    for j in range(nk):
        c0, c1 = j * block_k, min((j + 1) * block_k, s) - 1
        r0, r1 = max(c0 - offset - right, 0), min(c1 - offset + left, t - 1)
        if r0 <= r1:
            q_lo[j], q_hi[j] = r0 // block_q, r1 // block_q + 1
    return kv_lo, kv_hi, q_lo, q_hi


def full_block_plan(
    t: int, s: int, block_q: int, block_k: int, *,
    offset: int = 0, left: Optional[int] = None, right: Optional[int] = None,
):
    """Per block, the sub-range of its computed blocks that need no structural mask.

    Block ``(i, j)`` is *full* when every real query row of block ``i`` sees
    every key of block ``j`` (the band holds all its pairs, and no key is
    padding). Full blocks skip the position arithmetic and the selects of the
    band mask; only a user mask or bias is applied there. Along a row of blocks
    they are contiguous and lie inside :func:`block_plan`'s range.

    Returns:
      ``(kv_full_lo, kv_full_hi, q_full_lo, q_full_hi)`` int32 NumPy arrays:
      query block ``i``'s full key blocks are ``kv_full_lo[i] <= j <
      kv_full_hi[i]``, key block ``j``'s full query blocks ``q_full_lo[j] <= i <
      q_full_hi[j]``. An empty range is ``[hi, hi)`` at the end of the block's
      computed range, so ``[lo, full_lo)``, ``[full_lo, full_hi)``,
      ``[full_hi, hi)`` always partition it.
    """
    kv_lo, kv_hi, q_lo, q_hi = block_plan(t, s, block_q, block_k, offset=offset, left=left, right=right)
    nq, nk = len(kv_lo), len(q_lo)

    def full(i, j):
        r0, r1 = i * block_q + offset, min((i + 1) * block_q, t) - 1 + offset
        c0, c1 = j * block_k, (j + 1) * block_k - 1
        return (c1 < s and (left is None or r1 - c0 <= left)
                and (right is None or r0 - c1 >= -right))

    def ranges(lo, hi, count, is_full):
        f_lo, f_hi = hi.copy(), hi.copy()
        for a in range(count):
            inside = [b for b in range(lo[a], hi[a]) if is_full(a, b)]
            if inside:
                f_lo[a], f_hi[a] = inside[0], inside[-1] + 1
        return f_lo, f_hi

    kv_full_lo, kv_full_hi = ranges(kv_lo, kv_hi, nq, full)
    q_full_lo, q_full_hi = ranges(q_lo, q_hi, nk, lambda j, i: full(i, j))
    return kv_full_lo, kv_full_hi, q_full_lo, q_full_hi


def block_size(requested: Optional[int], length: int, name: str, max_size: Optional[int] = None) -> int:
    """Explicit size (clipped to the length), or the length split into equal blocks.

    ``length`` must be positive (empty axes never reach the block loops);
    ``max_size`` defaults to :func:`default_block_size`.
    """
    if requested is not None:
        return min(static_int(requested, name, minimum=1), length)
    n_blocks = -(-length // (max_size or default_block_size()))
    size = -(-length // n_blocks)
    # Several blocks: round to a multiple of 8 (vector width) so padding stays < 8·n_blocks.
    return size if n_blocks == 1 else -(-size // 8) * 8


def default_block_edges(t: int, s: int, rows: int, platform: Optional[str] = None,
                        banded: bool = False) -> Tuple[int, int]:
    """Largest default ``(block_q, block_k)`` for lengths ``t, s`` and ``rows = B·N``.

    A pure function of static shapes (and the platform, default: JAX's default
    backend). On CPU the edges grow from 128 (key side first, then query side)
    while a block step holds fewer than :data:`CPU_BLOCK_LOGITS` logits and the
    length allows, up to :data:`CPU_MAX_BLOCK`; for ``banded`` calls (causal or
    windowed) an edge only grows while its axis keeps at least
    :data:`CPU_MIN_BANDED_BLOCKS` blocks, since bigger blocks skip less of the
    hidden triangle. Elsewhere both are :data:`DEFAULT_BLOCK_ACCELERATOR`.
    """
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return DEFAULT_BLOCK_ACCELERATOR, DEFAULT_BLOCK_ACCELERATOR
    min_blocks = CPU_MIN_BANDED_BLOCKS if banded else 1

    def can_grow(edge, cap, length):
        return edge < cap and edge < length and length >= 2 * edge * min_blocks

    bq = bk = DEFAULT_BLOCK["cpu"]
    while rows * bq * bk < CPU_BLOCK_LOGITS:
        if can_grow(bk, CPU_MAX_BLOCK[1], s):
            bk *= 2
        elif can_grow(bq, CPU_MAX_BLOCK[0], t):
            bq *= 2
        else:
            break
    return bq, bk


def block_sizes(block_q: Optional[int], block_k: Optional[int], t: int, s: int, rows: int,
                banded: bool = False) -> Tuple[int, int]:
    """``(block_q, block_k)`` for a call: explicit sizes, else :func:`default_block_edges`."""
    max_q, max_k = default_block_edges(t, s, rows, banded=banded)
    return block_size(block_q, t, "block_q", max_q), block_size(block_k, s, "block_k", max_k)


def computed_blocks(t: int, s: int, *, is_causal: bool = False, causal_alignment: str = "bottom_right",
                    window: Optional[Window] = None, block_q: Optional[int] = None,
                    block_k: Optional[int] = None, rows: int = 1) -> Tuple[int, int]:
    """``(computed, total)`` block counts that ``chunked_attention`` uses for these lengths.

    ``rows`` is the call's ``B·N`` (batch size times query heads), which sets
    the default block sizes on CPU (:func:`default_block_edges`).
    """
    t, s = static_int(t, "t"), static_int(s, "s")
    offset, left, right = band(t, s, is_causal, causal_alignment, window)
    if t == 0 or s == 0:
        return 0, 0
    banded = left is not None or right is not None
    bq, bk = block_sizes(block_q, block_k, t, s, rows, banded)
    kv_lo, kv_hi, _, _ = block_plan(t, s, bq, bk, offset=offset, left=left, right=right)
    return int((kv_hi - kv_lo).sum()), (-(-t // bq)) * (-(-s // bk))
