"""Linen variables <-> NNX state for the modules of :mod:`flax_attention.nnx`.

Every NNX module here names its sub-modules and parameters as its linen twin
names them (``query/kernel``, ``wi/bias``, ``w_query``, ...), so the linen
``params`` collection and the NNX :class:`~flax.nnx.Param` state are the same
nested dict, and the decoding cache (``cached_key``, ``cached_value``,
``cache_index``) is the same in the ``"cache"`` collection and as
:class:`~flax.nnx.Cache` variables. The functions below check that claim on
every load (names, shapes and dtypes), so a mismatch is an error naming the
path, never a silent partial load.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Mapping, Tuple

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.core import FrozenDict, meta, unfreeze

from flax_attention.nnx import _cache

# Linen-only bookkeeping with no NNX counterpart: dropped when it carries no information.
_LINEN_ONLY_CACHE = ("cache_overflow",)


def linen_variables(module: nnx.Module) -> Dict[str, Any]:
    """The linen variables equivalent to ``module``'s state.

    Returns:
      ``{"params": ...}``, plus ``"cache"`` when the module holds a decoding
      cache (after ``init_cache``); pass it to the linen twin's ``apply``.
    """
    out = {"params": nnx.to_pure_dict(nnx.state(module, nnx.Param))}
    cache = nnx.to_pure_dict(nnx.state(module, nnx.Cache))
    if cache:
        out["cache"] = cache
    return out


def load_linen_variables(module: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
    """Loads linen ``variables`` (from ``init``/``apply`` or a checkpoint) into ``module``, in place.

    Args:
      module: an NNX module of :mod:`flax_attention.nnx` built with the same
        configuration as the linen one (for a cache: after ``init_cache`` with
        the cache's shape).
      variables: ``{"params": ...}`` and optionally ``{"cache": ...}``; boxed
        (``nn.with_logical_partitioning``) leaves are unboxed.

    Returns:
      ``module`` (for chaining).

    Raises:
      ValueError: on a missing, unexpected or differently shaped/typed entry,
        an unknown collection, or a linen cache whose overflow flag is set.
        A per-example ``cache_lengths``/``position_lengths`` (a ragged linen
        cache) is created in the NNX module, or dropped from it, as needed;
        an older linen cache's per-example ``cache_index [B]`` loads as flax's
        scalar index plus those lengths.
    """
    variables = unfreeze(variables) if isinstance(variables, FrozenDict) else dict(variables)
    unknown = set(variables) - {"params", "cache"}
    if unknown:
        raise ValueError(f"cannot load linen collections {sorted(unknown)} into an NNX module; "
                         "pass only 'params' (and 'cache').")
    updates: List[Any] = []
    ragged: Tuple[List[Tuple[Any, Any]], List[Any]] = ([], [])  # (levels to add, paths to drop)
    for collection, kind in (("params", nnx.Param), ("cache", nnx.Cache)):
        if collection not in variables:
            continue
        # Linen parameters annotated with (logical) partitioning come boxed; the values are what moves.
        incoming = meta.unbox(unfreeze(variables[collection]))
        expected = _flat(nnx.to_pure_dict(nnx.state(module, kind)))
        if collection == "cache":
            incoming = _linen_cache(incoming)
            ragged = _ragged_changes(expected, _flat(incoming))
            expected = {p: x for p, x in expected.items() if p not in ragged[1]}
            expected.update({p: incoming_leaf for p, incoming_leaf in ragged[0]})
        _check_match(collection, expected, _flat(incoming))
        updates.append((kind, incoming))
    # All checked first: an error above leaves the module untouched.
    for path, value in ragged[0]:  # per-example fill levels the NNX module does not hold yet
        setattr(_submodule(module, path), path[-1], nnx.Cache(jnp.asarray(value)))
    for path in ragged[1]:  # a non-ragged linen cache: back to flax's scalar index only
        setattr(_submodule(module, path), path[-1], nnx.data(None))
    for kind, incoming in updates:
        state = nnx.state(module, kind)
        nnx.replace_by_pure_dict(state, incoming)
        nnx.update(module, state)
    return module


def _flat(tree: Mapping[str, Any]) -> Dict[Tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _submodule(module: nnx.Module, path: Tuple[str, ...]) -> nnx.Module:
    return functools.reduce(getattr, path[:-1], module)


def _ragged_changes(expected, incoming):
    """``(to_create [(path, value)], to_drop [path])``: the per-example fill levels in the linen
    cache that the NNX module lacks, and those it holds that the linen cache lacks."""
    lengths = set(_cache.RAGGED.values())
    create = [(p, x) for p, x in incoming.items() if p[-1] in lengths and p not in expected]
    drop = [p for p in expected if p[-1] in lengths and p not in incoming]
    return create, drop


def _linen_cache(cache: Dict[str, Any]) -> Dict[str, Any]:
    """The linen cache in the NNX layout (recursively).

    Drops the ``cache_overflow`` flag of older linen caches (refusing a set
    one) and turns their per-example index ``[B]`` into flax's scalar index
    plus, when the examples differ, the per-example ``*_lengths``.
    """
    out: Dict[str, Any] = {}
    for name, value in cache.items():
        if isinstance(value, Mapping):
            out[name] = _linen_cache(dict(value))
        elif name in _LINEN_ONLY_CACHE:
            if np.any(np.asarray(value)):
                raise ValueError(f"the linen cache has {name} set: it overflowed and its entries are "
                                 "not valid; re-create it with a longer input.")
        elif name in _cache.RAGGED and np.ndim(value) > 0:
            levels = jnp.asarray(value, jnp.int32)
            out[name] = jnp.max(levels, initial=0)
            if _cache.RAGGED[name] not in cache and not bool(jnp.all(levels == levels.reshape(-1)[0])):
                out[_cache.RAGGED[name]] = levels
        else:
            out[name] = value
    return out


def _check_match(collection: str, expected: Dict[Tuple[str, ...], Any],
                 incoming: Dict[Tuple[str, ...], Any]) -> None:
    """Raises a ValueError listing every path that differs between the two flat trees."""
    name = lambda path: "".join(f"[{k!r}]" for k in path)  # noqa: E731
    want = {name(p): x for p, x in expected.items()}
    got = {name(p): x for p, x in incoming.items()}
    problems = [f"missing {p}" for p in sorted(set(want) - set(got))]
    problems += [f"unexpected {p}" for p in sorted(set(got) - set(want))]
    for p in sorted(set(want) & set(got)):
        w, g = want[p], got[p]
        if np.shape(w) != np.shape(g) or _dtype(w) != _dtype(g):
            problems.append(f"{p}: expected {_dtype(w)}{list(np.shape(w))}, "
                            f"got {_dtype(g)}{list(np.shape(g))}")
    if problems:
        raise ValueError(f"linen '{collection}' do not fit this NNX module ({'; '.join(problems)}); "
                         "build the NNX module with the linen module's configuration (and call "
                         "init_cache with the cache's shape).")


def _dtype(x) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
