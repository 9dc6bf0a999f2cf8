"""Context parallelism: attention on global arrays whose sequence is split over a mesh axis.

:func:`context_parallel_attention` takes global ``[B, T, N, H]`` arrays, runs
:func:`flax_attention.functional.ring.ring_attention` under :func:`jax.shard_map` with
the sequence split over one mesh axis (other axes may split the batch or the
heads), and returns the output sharded the same way. The layout helpers here
move a sequence into the load-balanced ``"zigzag"`` order and back, give the
position ids that follow it, and count the kernel blocks each device computes
(:func:`ring_work`), so the balance of a layout can be checked without timing.

A model that keeps its activations in zigzag order end to end (permute the
tokens once with :func:`to_layout`, pass :func:`layout_positions` to the
position encoding, un-permute the logits or not at all) pays no permutation
inside attention; ``context_parallel_attention(..., layout="zigzag")`` on
natural-order arrays permutes each shard on the way in and out (two
``ppermute`` hops of half a shard each way, :func:`shard_to_layout`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from flax_attention.kernels._blocks import block_sizes, computed_blocks
from flax_attention.functional.attention import scaled_dot_product_attention
from flax_attention.functional.ring import LAYOUTS, chunk_ids, ring_attention
from flax_attention.functional.ulysses import ulysses_attention

Array = jnp.ndarray
METHODS = ("ring", "ulysses")


def _check_layout(length: int, size: int, layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    chunks = size * (2 if layout == "zigzag" else 1)
    if length % chunks:
        raise ValueError(f"sequence length {length} is not divisible by {chunks} (axis size {size}"
                         f"{' x 2 for zigzag' if layout == 'zigzag' else ''}); pad it to a multiple of "
                         f"{chunks} and mask the padding (key_mask).")
    return length // chunks


def layout_positions(length: int, size: int, layout: str = "contiguous") -> np.ndarray:
    """Global position of each stored slot: ``x_stored = x_natural[..., positions, ...]``.

    Shard ``i`` holds slots ``[i·T/P, (i+1)·T/P)``. ``"contiguous"`` is the
    identity; ``"zigzag"`` stores chunks ``i`` and ``2P-1-i`` (of ``2P``) on
    shard ``i``. Feed these to RoPE/ALiBi/sinusoidal encodings so positions
    follow the tokens.
    """
    chunk = _check_layout(length, size, layout)
    order = [c for i in range(size) for c in chunk_ids(i, size, layout)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in order]).astype(np.int32)


def to_layout(x: Array, size: int, layout: str = "contiguous", axis: int = 1) -> Array:
    """Reorders the sequence ``axis`` of ``x`` from natural order into ``layout``."""
    return jnp.take(x, jnp.asarray(layout_positions(x.shape[axis], size, layout)), axis=axis)


def from_layout(x: Array, size: int, layout: str = "contiguous", axis: int = 1) -> Array:
    """Inverse of :func:`to_layout`."""
    inverse = np.argsort(layout_positions(x.shape[axis], size, layout))
    return jnp.take(x, jnp.asarray(inverse), axis=axis)


def _zigzag_swap(x, axis_name, inverse: bool, axis: int = 1):
    """Per-shard move between natural chunks ``(2i, 2i+1)`` and zigzag chunks ``(i, 2P-1-i)``.

    Natural chunk ``c`` lives on shard ``c // 2``; in zigzag order on shard
    ``c`` (``c < P``) or ``2P-1-c``. The even chunks go to distinct shards and
    so do the odd ones, so two ``ppermute``s move everything, and each shard
    receives one even and one odd chunk (``i`` and ``2P-1-i`` differ in parity).
    """
    size = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    dest = lambda c: c if c < size else 2 * size - 1 - c  # noqa: E731
    first, second = jnp.split(x, 2, axis=axis)
    if not inverse:  # natural -> zigzag
        even = jax.lax.ppermute(first, axis_name, [(i, dest(2 * i)) for i in range(size)])
        odd = jax.lax.ppermute(second, axis_name, [(i, dest(2 * i + 1)) for i in range(size)])
        mine_even = me % 2 == 0  # my chunk i is even: it is slot 0
        return jnp.concatenate([jnp.where(mine_even, even, odd), jnp.where(mine_even, odd, even)], axis=axis)
    mine_even = me % 2 == 0
    even = jnp.where(mine_even, first, second)
    odd = jnp.where(mine_even, second, first)
    first = jax.lax.ppermute(even, axis_name, [(dest(2 * i), i) for i in range(size)])
    second = jax.lax.ppermute(odd, axis_name, [(dest(2 * i + 1), i) for i in range(size)])
    return jnp.concatenate([first, second], axis=axis)


def shard_to_layout(x: Array, axis_name, layout: str = "contiguous", axis: int = 1) -> Array:
    """Inside ``shard_map``: this shard's natural-order piece -> its piece of ``layout``.

    Per-shard twin of :func:`to_layout` (two ``ppermute``s for zigzag; the
    local length must be even), for code that already runs under ``shard_map``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    return x if layout == "contiguous" else _zigzag_swap(x, axis_name, False, axis)


def shard_from_layout(x: Array, axis_name, layout: str = "contiguous", axis: int = 1) -> Array:
    """Inverse of :func:`shard_to_layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    return x if layout == "contiguous" else _zigzag_swap(x, axis_name, True, axis)


def ring_work(length: int, size: int, layout: str = "contiguous", *, is_causal: bool = True,
              rows: int = 1, block_q: Optional[int] = None, block_k: Optional[int] = None) -> List[int]:
    """Query-key pairs (logits) each device computes over a whole ring pass, per head.

    A static count from the same block plan the kernel runs: computed
    ``block_q x block_k`` tiles times their area (tiles wholly hidden by the
    causal mask are skipped inside a diagonal chunk pair; chunk pairs wholly
    in the future are skipped). Counting logits rather than tiles keeps
    layouts with different chunk (and so block) sizes comparable; the dense
    causal total is ``T·(T+1)/2``. ``rows`` is ``B·N`` per device, which sets
    the CPU default block sizes. Returns one count per device, in mesh order.
    """
    chunk = _check_layout(length, size, layout)
    causal = bool(is_causal)
    bq, bk = block_sizes(block_q, block_k, chunk, chunk, rows, causal)
    full = computed_blocks(chunk, chunk, block_q=bq, block_k=bk, rows=rows)[0] * bq * bk
    diag = computed_blocks(chunk, chunk, is_causal=True, block_q=bq, block_k=bk, rows=rows)[0] * bq * bk
    work = []
    for me in range(size):
        total = 0
        for step in range(size):
            src = (me - step) % size
            for a in chunk_ids(me, size, layout):
                for b in chunk_ids(src, size, layout):
                    total += full if (not causal or b < a) else diag if b == a else 0
        work.append(total)
    return work


def _spec(batch_axis, seq_axis, head_axis, rank: int) -> PartitionSpec:
    return PartitionSpec(batch_axis, seq_axis, *([head_axis, None] if rank == 4 else []))


def context_parallel_attention(
    query: Array,
    key: Array,
    value: Optional[Array] = None,
    *,
    mesh=None,
    axis: str = "seq",
    is_causal: bool = False,
    key_mask: Optional[Array] = None,
    scale: Optional[float] = None,
    layout: str = "contiguous",
    method: str = "ring",
    implementation: Optional[str] = None,
    batch_axis=None,
    head_axis=None,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    precision=None,
) -> Array:
    """Exact attention on global arrays, computed with the sequence split over ``axis`` of ``mesh``.

    Same output and gradients as
    :func:`~flax_attention.functional.attention.scaled_dot_product_attention` (float32
    rounding), computed by :func:`~flax_attention.functional.ring.ring_attention`: no
    device holds more than ``T/P`` queries and ``S/P`` keys, or any ``T x S``
    array. Works under ``jax.jit`` and ``jax.grad``.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, D]``; ``None`` means key = value.
      mesh: a :class:`jax.sharding.Mesh` (or abstract mesh); ``None`` takes
        the mesh set with :func:`jax.set_mesh`.
      axis: the mesh axis the sequence (``T`` and ``S``) is split over.
      is_causal: causal mask over positions (needs ``T == S``).
      key_mask: boolean ``[B, S]``, ``True`` = a real key (padding mask).
      scale: a Python float; defaults to ``1 / sqrt(H)``.
      layout: ``"contiguous"`` or ``"zigzag"`` (balances causal work; the
        arrays are in natural order, permuted inside and back). Ring only.
      method: ``"ring"`` (:func:`~flax_attention.functional.ring.ring_attention`: K/V
        blocks travel, any head count) or ``"ulysses"``
        (:func:`~flax_attention.functional.ulysses.ulysses_attention`: two all-to-alls
        around a local kernel on whole sequences; ``N`` divisible by the axis).
      implementation: the local kernel of ``method="ulysses"`` (e.g.
        ``"cudnn"``); the ring always runs the chunked kernel.
      batch_axis: mesh axis (or tuple of axes) splitting ``B``, or ``None``.
      head_axis: mesh axis splitting the heads ``N`` and ``K`` (both must be
        divisible by its size), or ``None``.
      block_q, block_k, precision: passed to the kernel inside each ring step.

    Returns:
      ``[B, T, N, D]`` in the query's dtype, sharded ``(batch_axis, axis,
      head_axis, None)``.

    Raises:
      ValueError: without a mesh, for an axis the mesh lacks, lengths not
        divisible by the axis size (x 2 for zigzag), or anything
        :func:`~flax_attention.functional.ring.ring_attention` rejects.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or getattr(mesh, "empty", False) or not mesh.axis_names:
        raise ValueError("context_parallel_attention needs a mesh: pass mesh=jax.make_mesh(...) or call it "
                         "under `with jax.set_mesh(mesh):`.")
    named = (axis, *_axes(batch_axis), *_axes(head_axis))
    for name in named:
        if name not in mesh.axis_names:
            raise ValueError(f"context_parallel_attention: mesh has axes {tuple(mesh.axis_names)}, not {name!r}; "
                             "pass axis=/batch_axis=/head_axis= naming axes of the mesh.")
    query, key = jnp.asarray(query), jnp.asarray(key)
    value = key if value is None else jnp.asarray(value)
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(f"context_parallel_attention takes [B, T, N, H] arrays, got query {query.shape}, "
                         f"key {key.shape}, value {value.shape}.")
    if layout not in LAYOUTS:
        raise ValueError(f"context_parallel_attention: layout must be one of {LAYOUTS}, got {layout!r}.")
    size = mesh.shape[axis]
    for name, length in (("query", query.shape[1]), ("key", key.shape[1])):
        try:
            _check_layout(length, size, layout)
        except ValueError as err:
            raise ValueError(f"context_parallel_attention: {name} {err}") from None
    if key_mask is not None:
        key_mask = jnp.asarray(key_mask)
        if key_mask.shape != key.shape[:2] or key_mask.dtype != jnp.bool_:
            raise ValueError(f"context_parallel_attention: key_mask must be boolean [B, S] = {key.shape[:2]}, "
                             f"got {key_mask.dtype} {key_mask.shape}.")
    spec4, spec2 = _spec(batch_axis, axis, head_axis, 4), _spec(batch_axis, axis, head_axis, 2)

    if method not in METHODS:
        raise ValueError(f"context_parallel_attention: method must be one of {METHODS}, got {method!r}.")
    if method == "ulysses" and (layout != "contiguous" or block_q or block_k):
        raise ValueError("context_parallel_attention: method='ulysses' takes no layout or block sizes "
                         "(it attends over whole sequences); drop them or use method='ring'.")

    def shard(q, k, v, km):
        if method == "ulysses":
            return ulysses_attention(q, k, v, axis_name=axis, is_causal=is_causal, key_mask=km, scale=scale,
                                     implementation=implementation, precision=precision)
        # Natural-order shards in, natural-order shards out; a balanced layout
        # is entered and left with two ppermutes each way, inside the shard_map.
        q, k, v, km = (None if x is None else shard_to_layout(x, axis, layout) for x in (q, k, v, km))
        out = ring_attention(q, k, v, axis_name=axis, is_causal=is_causal, key_mask=km, scale=scale,
                             layout=layout, block_q=block_q, block_k=block_k, precision=precision)
        return shard_from_layout(out, axis, layout)

    args = (query, key, value, key_mask)
    specs = (spec4, spec4, spec4, None if key_mask is None else spec2)
    args = tuple(_reshard(x, mesh, s) for x, s in zip(args, specs))
    return jax.shard_map(shard, mesh=mesh, in_specs=specs, out_specs=spec4)(*args)


def _axes(a) -> Sequence[str]:
    return () if a is None else (a,) if isinstance(a, str) else tuple(a)


def _explicit(mesh) -> bool:
    return any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _reshard(x, mesh, spec):
    """Explicit mesh axes want operands already sharded as ``in_specs`` says; auto axes reshard themselves."""
    if x is None or not _explicit(mesh):
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


# ----------------------------------------------------------------------------- implementation= route

IMPLEMENTATIONS = ("context_parallel", "context_parallel:zigzag", "context_parallel:ulysses")
DEFAULT_AXIS = "seq"


def active_axis_size(axis: str = DEFAULT_AXIS) -> int:
    """Size of ``axis`` in the mesh set with :func:`jax.set_mesh` (1 when there is none or it lacks the axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or getattr(mesh, "empty", False) or axis not in mesh.axis_names:
        return 1
    return mesh.shape[axis]


def from_attention_call(implementation: str, query, key, value, mask, bias, scale, is_causal, window,
                        weights_or_dropout: bool, precision):
    """The modules' ``implementation="context_parallel[:zigzag|:ulysses]"``.

    Splits the sequence over the ``"seq"`` axis of the mesh set with
    :func:`jax.set_mesh`, and the batch over the mesh's other axes (of size
    > 1) when ``B`` divides by their product. Returns ``None`` when no active
    mesh has a ``"seq"`` axis of size > 1 (then the caller runs its local auto
    choice: a model trained with context parallelism decodes on one device
    unchanged). Only key masks (``[B, 1, 1, S]``-shaped) are taken.
    """
    if active_axis_size() == 1:
        return None
    layout = "zigzag" if implementation.endswith(":zigzag") else "contiguous"
    method = "ulysses" if implementation.endswith(":ulysses") else "ring"
    unsupported = [name for name, bad in (("bias", bias is not None), ("window", window is not None),
                                          ("dropout or return_weights", weights_or_dropout))
                   if bad]
    if unsupported:
        raise ValueError(f"implementation={implementation!r} does not take {', '.join(unsupported)}; use a "
                         "key mask and is_causal, or a local implementation (None, 'dense', 'chunked').")
    if query.ndim != 4:
        raise ValueError(f"implementation={implementation!r} takes [B, T, N, H] queries, got {query.shape}.")
    b, s = key.shape[0], key.shape[1]
    key_mask = None
    if mask is not None:
        m = jnp.asarray(mask)
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        if m.shape[1] != 1 or m.shape[2] != 1:
            raise ValueError(f"implementation={implementation!r} takes key masks only (broadcastable "
                             f"[B, 1, 1, S]), got a mask of shape {mask.shape}; per-query masks would need "
                             "a T x S array on every device.")
        key_mask = jnp.broadcast_to(m[:, 0, 0, :], (b, s))
    mesh = jax.sharding.get_abstract_mesh()
    others = tuple(a for a in mesh.axis_names if a != DEFAULT_AXIS and mesh.shape[a] > 1)
    width = int(np.prod([mesh.shape[a] for a in others])) if others else 1
    batch_axis = others if others and b % width == 0 else None
    return context_parallel_attention(query, key, value, mesh=mesh, axis=DEFAULT_AXIS, is_causal=is_causal,
                                      key_mask=key_mask, scale=scale, layout=layout, method=method,
                                      batch_axis=batch_axis, precision=precision)


def routed_attention(query, key, value=None, *, implementation=None, **kwargs):
    """:func:`~flax_attention.functional.attention.scaled_dot_product_attention` that also takes the
    context-parallel names (the modules' attention call; keyword arguments as there)."""
    if implementation in IMPLEMENTATIONS:
        dropout_active = kwargs.get("dropout_rate", 0.0) > 0.0 and not kwargs.get("deterministic", True)
        out = from_attention_call(implementation, query, key, value, kwargs.get("mask"), kwargs.get("bias"),
                                  kwargs.get("scale"), kwargs.get("is_causal", False), kwargs.get("window"),
                                  kwargs.get("return_weights", False) or dropout_active,
                                  kwargs.get("precision"))
        if out is not None:
            return out
        implementation = None  # no "seq" mesh axis active: the local auto choice
    return scaled_dot_product_attention(query, key, value, implementation=implementation, **kwargs)
