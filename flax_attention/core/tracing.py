"""What encloses a call: autodiff and ``vmap`` traces, and ``shard_map``'s varying axes.

Auto dispatch reads the traces (the chunked kernel's ``custom_vjp`` has no
forward-mode rule and is differentiable once); the block loops mark their
carries as varying so they run unchanged inside ``shard_map``.
"""

from __future__ import annotations

from typing import Any, List

import jax


def _enclosing_traces() -> List[Any]:
    """The current trace and its parents, innermost first (``jax._src`` internals; ``[]`` if they move)."""
    try:
        from jax._src import core

        trace: Any = core.trace_ctx.trace
        out: List[Any] = []
        while trace is not None and len(out) < 1000:
            out.append(trace)
            trace = getattr(trace, "parent_trace", None)
        return out
    except (ImportError, AttributeError):
        return []


def forward_mode_active() -> bool:
    """Whether a forward-mode autodiff trace (``jax.jvp``, ``jacfwd``, ``hessian``) encloses this call.

    The chunked path's ``custom_vjp`` has no forward-mode rule, so auto
    dispatch must pick the dense path then. Reverse mode (``grad``/``vjp``)
    uses a linearize trace, which ``custom_vjp`` supports (if the internals
    move, assume reverse mode).
    """
    try:
        from jax._src.interpreters import ad
    except ImportError:
        return False
    return any(isinstance(trace, ad.JVPTrace) for trace in _enclosing_traces())


def nested_reverse_mode_active() -> bool:
    """Whether two or more reverse-mode traces enclose this call (a gradient of a gradient).

    A ``custom_vjp`` kernel is differentiable once: its backward pass (loops
    with traced bounds) cannot itself be reverse-differentiated, so auto
    dispatch takes the dense path here too.
    """
    try:
        from jax._src.interpreters import ad
    except ImportError:
        return False
    return sum(isinstance(trace, ad.LinearizeTrace) for trace in _enclosing_traces()) >= 2


def vmapped_size() -> int:
    """Product of the sizes of the ``jax.vmap`` axes enclosing this call (1 outside ``vmap``).

    Inside ``vmap`` a function sees per-example shapes; the computation runs
    on the whole batch, so memory-based choices must multiply it back in.
    """
    size = 1
    for trace in _enclosing_traces():
        axis_size = getattr(getattr(trace, "axis_data", None), "size", None)
        if type(trace).__name__ == "BatchTrace" and isinstance(axis_size, int):
            size *= axis_size
    return size


def _varying_axes(x) -> frozenset:
    mat = getattr(jax.typeof(x), "manual_axis_type", None) if x is not None else None
    return frozenset(mat.varying) if mat is not None else frozenset()


def vary_like(tree, *refs):
    """``tree`` marked as varying over every manual mesh axis that ``refs`` vary over.

    Inside :func:`jax.shard_map` (with its default ``check_vma=True``) a loop
    carry initialised from constants is "invariant" while the loop body's
    results vary with the shard's data, and ``lax.fori_loop`` rejects the
    mismatch. The block loops pass their initial carries through here so the
    kernels run unchanged on per-shard operands (ring attention). Outside
    ``shard_map`` it returns ``tree`` untouched.
    """
    axes = frozenset().union(*(_varying_axes(r) for r in jax.tree.leaves(refs)))
    if not axes:
        return tree

    def cast(x):
        missing = tuple(sorted(axes - _varying_axes(x), key=str))
        return jax.lax.pcast(x, missing, to="varying") if missing else x
    return jax.tree.map(cast, tree)
