"""Logical axis names of every parameter, and how they map onto a device mesh.

Every linen module of the package names the dimensions of its parameters
with logical axis names (flax's :class:`~flax.linen.LogicallyPartitioned`
metadata, as maxtext does), so a user can place them on any
:class:`jax.sharding.Mesh` with a rules table ``(logical name, mesh axes)``:

=============  ===================================================  ==========================
logical name   dimension                                            default rule
=============  ===================================================  ==========================
``vocab``      vocabulary rows of embeddings / output projections   ``fsdp``
``embed``      model width ``E`` (input side of every projection)   ``fsdp``
``mlp``        feed-forward / attention-scoring / GRU-gate width    ``fsdp``
``heads``      query heads ``N``                                    ``fsdp``
``kv_heads``   key/value heads ``K``                                ``fsdp``
``kv``         head width ``H``                                     ``fsdp``
``hidden``     recurrent state width ``U`` (GRU)                    replicated
``direction``  the two directions of a bidirectional GRU            replicated
``batch``      activations: examples                                ``(data, fsdp)``
``length``     activations: sequence positions                      ``seq``
=============  ===================================================  ==========================

The rules are tried in order, and each mesh axis shards at most one
dimension of a parameter (flax's :func:`~flax.linen.logical_to_mesh_axes`),
so FSDP shards the first named dimension that the ``fsdp`` size divides and
replicates a parameter none of whose dimensions it divides. LayerNorm scales
and biases, small vectors, stay unnamed (replicated).

The annotation is opt-in, so ``model.init`` keeps returning plain arrays
(the same tree as ``flax.linen`` modules without metadata, e.g. for the
:class:`~flax_attention.MultiHeadAttention` drop-in) unless asked::

    with flax_attention.linen.partitioning.logical_axis_annotations():
        abstract = jax.eval_shape(model.init, rng, *inputs)   # LogicallyPartitioned leaves
    shardings = logical_to_mesh_sharding(abstract, mesh)       # NamedSharding per leaf
    params = jax.jit(lambda r: nn.meta.unbox(model.init(r, *inputs)), out_shardings=...)

Boxed trees have the same paths and shapes once unboxed (:func:`flax.linen.meta.unbox`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[Tuple[str, Any]]

LOGICAL_AXIS_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", "seq"),
    ("vocab", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("heads", "fsdp"),
    ("kv_heads", "fsdp"),
    ("kv", "fsdp"),
)

_ANNOTATE = contextvars.ContextVar("flax_attention_logical_axes", default=False)


@contextlib.contextmanager
def logical_axis_annotations(enabled: bool = True) -> Iterator[None]:
    """While active, parameters initialised by the package's modules come boxed with their logical names."""
    token = _ANNOTATE.set(enabled)
    try:
        yield
    finally:
        _ANNOTATE.reset(token)


def logical(init: Callable, names: Tuple[Optional[str], ...]) -> Callable:
    """``init`` whose value is boxed as :class:`flax.linen.LogicallyPartitioned` ``names`` when annotating.

    A value already boxed (a user's own ``nn.with_logical_partitioning`` init)
    keeps its own names. Paths, shapes and values never change.
    """

    @functools.wraps(init)
    def wrapped(*args, **kwargs):
        value = init(*args, **kwargs)
        if not _ANNOTATE.get() or isinstance(value, nn.meta.AxisMetadata):
            return value
        return nn.LogicallyPartitioned(value, names)

    return wrapped


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape.get(a, 1) for a in axes)


def mesh_axes(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
              rules: Rules = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """The :class:`PartitionSpec` of one array with logical ``names`` and ``shape`` on ``mesh``.

    Rules whose mesh axes are absent from ``mesh`` or whose size does not
    divide the dimension are skipped, so the next rule (or replication)
    applies instead of an uneven split.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match the array shape {tuple(shape)}.")
    dims = dict(zip(names, shape))
    usable = [(name, axes) for name, axes in rules
              if name in dims and axes is not None
              and all(a in mesh.shape for a in ((axes,) if isinstance(axes, str) else axes))
              and dims[name] % _axis_size(mesh, axes) == 0]
    spec = nn.logical_to_mesh_axes(tuple(names), usable)
    assert spec is not None  # None only for names=None
    return spec


def logical_to_mesh_sharding(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """A :class:`NamedSharding` for every leaf of a (possibly abstract) tree with ``LogicallyPartitioned`` boxes.

    Unboxed leaves are replicated. The result has the unboxed tree's structure.
    """

    replicated = NamedSharding(mesh, PartitionSpec())

    def one(leaf):
        if not isinstance(leaf, nn.LogicallyPartitioned):
            return replicated
        if not hasattr(leaf.value, "shape"):  # a box around a subtree, e.g. optax's MaskedNode of a frozen leaf
            return jax.tree_util.tree_map(lambda _: replicated, leaf.value)
        return NamedSharding(mesh, mesh_axes(leaf.names, leaf.value.shape, mesh, rules))

    return jax.tree_util.tree_map(one, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))

