"""Input checks shared by the dense, chunked and fused attention paths: arrays, static ints, shapes."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.core.dtypes import not_neg_inf


def as_array(x, name: str):
    """``jnp.asarray`` for array-likes (lists included, as ``jax.nn`` does); ``None`` is an error."""
    if x is None:
        raise ValueError(f"{name} must be an array, got None.")
    if isinstance(x, jax.Array):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be an array or array-like, got {type(x).__name__}: {err}") from None


def as_float_arrays(**arrays):
    """Converts ``query``/``key``/``value`` and requires one floating dtype for all.

    Integer inputs would silently give zero or truncated attention; mixed
    dtypes are rejected as by ``jax.nn.dot_product_attention`` and PyTorch's
    SDPA, since silently promoting would hide a costly cast (or a lost one).
    """
    out = {name: as_array(x, name) for name, x in arrays.items()}
    for name, x in out.items():
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{name} must be a floating array, got dtype {x.dtype}; cast it, e.g. "
                f"{name}.astype(jnp.float32)."
            )
    found = {name: x.dtype for name, x in out.items()}
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{n} {d}" for n, d in found.items())
        first = next(iter(found.values()))
        raise ValueError(
            f"query, key and value must have the same dtype, got {listed}; cast them, e.g. "
            f"key.astype({first}) (flax_attention does not promote silently)."
        )
    return tuple(out.values())


def static_int(value, name: str, minimum: int = 0) -> int:
    """A Python int ``>= minimum`` (booleans and floats rejected, no silent truncation)."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        result = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.") from None
    if result < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return result


def check_inputs(query, key, value, mask, bias):
    """Validates shapes at trace time so users never see a raw XLA error."""
    if query.ndim < 3:
        raise ValueError(
            f"query must be [..., T, N, H] (rank >= 3), got shape {query.shape}; "
            "add a heads axis with query[..., None, :] for single-head attention."
        )
    for name, x in (("key", key), ("value", value)):
        if x.ndim != query.ndim:
            raise ValueError(
                f"{name} must have the same rank as query ([..., S, K, H] vs [..., T, N, H]); "
                f"got query {query.shape} and {name} {x.shape}."
            )
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(
            "query, key and value must share batch dims [...]; got "
            f"query {query.shape}, key {key.shape}, value {value.shape}."
        )
    if key.shape[-3:-1] != value.shape[-3:-1]:
        raise ValueError(
            f"key [..., S, K, H] and value [..., S, K, D] must agree on S and K; "
            f"got key {key.shape} and value {value.shape}."
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key head dims H must match; got query {query.shape} and key {key.shape}."
        )
    n, k = query.shape[-2], key.shape[-2]
    if k == 0 or n % k:
        raise ValueError(
            f"query heads N={n} must be a multiple of kv heads K={k} "
            f"(query {query.shape}, key {key.shape}); choose K among the divisors of N."
        )
    logits_shape = query.shape[:-3] + (n, query.shape[-3], key.shape[-3])
    for name, x in (("mask", mask), ("bias", bias)):
        if x is None:
            continue
        if name == "mask" and x.dtype != jnp.bool_:
            raise ValueError(
                f"mask must be boolean (True = attend), got dtype {x.dtype}; "
                "pass mask.astype(bool), or use `bias` for additive float masks."
            )
        if name == "bias" and x.dtype == jnp.bool_:
            raise ValueError(
                "bias must be a float array added to the logits, got a boolean one; "
                "pass boolean masks as `mask=` (True = attend)."
            )
        try:
            if np.broadcast_shapes(x.shape, logits_shape) != logits_shape:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{name} of shape {x.shape} does not broadcast to the logits shape "
                f"[..., N, T, S] = {logits_shape}."
            ) from None


def check_scale(scale) -> None:
    """A logit scale must be a scalar (a number or a 0-d, possibly traced, array)."""
    if scale is None:
        return
    shape = np.shape(scale)
    if shape != ():
        raise ValueError(f"scale must be a scalar (a float or a 0-d array), got shape {shape}; "
                         "for a per-head temperature scale the query heads instead.")
    dtype = scale.dtype if hasattr(scale, "dtype") else np.asarray(scale).dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(f"scale must be a real number, got dtype {dtype}.")


def prepare(query, key, value, mask, bias, scale=None):
    """Converts and validates the attention operands; ``value=None`` means key = value.

    Returns ``(query, key, value, mask, bias, bias_keep)``. ``-inf`` bias
    entries are replaced by 0 before any other op touches the bias (so no
    later op outputs an infinity) and marked ``False`` in the boolean
    ``bias_keep`` (bias-shaped; ``None`` without a bias). It is kept apart from
    ``mask`` because their joint broadcast shape can be far larger than either.
    """
    if value is None:
        query, key = as_float_arrays(query=query, key=key)
        value = key
    else:
        query, key, value = as_float_arrays(query=query, key=key, value=value)
    mask = None if mask is None else as_array(mask, "mask")
    bias = None if bias is None else as_array(bias, "bias")
    check_inputs(query, key, value, mask, bias)
    check_scale(scale)
    bias_keep = None
    if bias is not None:
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            bias = bias.astype(jnp.float32)  # an int bias is exact in float32 up to 2**24
        bias_keep = not_neg_inf(bias)
        bias = jax.lax.select(bias_keep, bias, jax.lax.full_like(bias, 0))
    return query, key, value, mask, bias, bias_keep
