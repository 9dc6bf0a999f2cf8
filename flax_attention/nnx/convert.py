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

from typing import Any, Dict, Mapping

import jax
import numpy as np
from flax import nnx
from flax.core import meta, unfreeze

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
    """
    variables = unfreeze(variables) if not isinstance(variables, dict) else dict(variables)
    unknown = set(variables) - {"params", "cache"}
    if unknown:
        raise ValueError(f"cannot load linen collections {sorted(unknown)} into an NNX module; "
                         "pass only 'params' (and 'cache').")
    updates = []
    for collection, kind in (("params", nnx.Param), ("cache", nnx.Cache)):
        if collection not in variables:
            continue
        # Linen parameters annotated with (logical) partitioning come boxed; the values are what moves.
        incoming = meta.unbox(unfreeze(variables[collection]))
        if collection == "cache":
            incoming = _drop_linen_only(incoming)
        state = nnx.state(module, kind)
        _check_match(collection, nnx.to_pure_dict(state), incoming)
        updates.append((state, incoming))
    for state, incoming in updates:  # all checked first: an error leaves the module untouched
        nnx.replace_by_pure_dict(state, incoming)
        nnx.update(module, state)
    return module


def _drop_linen_only(cache: Dict[str, Any]) -> Dict[str, Any]:
    """Removes linen-only cache flags (recursively), refusing to drop a set overflow flag."""
    out = {}
    for name, value in cache.items():
        if isinstance(value, Mapping):
            out[name] = _drop_linen_only(dict(value))
        elif name in _LINEN_ONLY_CACHE:
            if np.any(np.asarray(value)):
                raise ValueError(f"the linen cache has {name} set: it overflowed and its entries are "
                                 "not valid; re-create it with a longer input.")
        else:
            out[name] = value
    return out


def _check_match(collection: str, expected: Dict[str, Any], incoming: Dict[str, Any]) -> None:
    """Raises a ValueError listing every path that differs between the two trees."""
    flat = lambda tree: {jax.tree_util.keystr(p): x  # noqa: E731
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want, got = flat(expected), flat(incoming)
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
