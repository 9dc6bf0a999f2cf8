"""Ring / context-parallel cases run on 8 simulated CPU devices (see test_context_parallel.py).

Run as a script in a fresh process (the device count must be set before JAX
starts); prints one JSON object mapping case names to measured errors/facts.
"""

import functools
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

jax.config.update("jax_enable_x64", True)

from flax_attention import (  # noqa: E402
    MultiHeadAttention,
    context_parallel_attention,
    ring_attention,
    scaled_dot_product_attention,
)
from flax_attention.functional.masks import key_mask as key_mask_4d  # noqa: E402


@functools.partial(jax.jit, static_argnames="causal")
def reference(q, k, v, km, ct, causal):
    """float64 dense attention and its gradients against the cotangent ``ct``.

    One compiled program per case (eager float64 ops would each compile on their own).
    """
    wide = [x.astype(jnp.float64) for x in (q, k, v)]
    mask = None if km is None else km[:, None, None, :]

    def f(q, k, v):
        return scaled_dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="dense")
    out, vjp = jax.vjp(f, *wide)
    return out, vjp(ct.astype(jnp.float64))


def f64(x):
    """A host float64 copy (bfloat16 included) for error arithmetic in NumPy."""
    return np.asarray(x).astype(np.float64)


def max_err(a, b):
    return float(np.max(np.abs(f64(a) - f64(b))))


def inputs(b, t, s, n, kh, h, d, dtype, seed=0):
    """``q, k, v`` and the generator for the cotangent; drawn with NumPy (nothing to compile)."""
    rng = np.random.default_rng(seed)
    shapes = ((b, t, n, h), (b, s, kh, h), (b, s, kh, d))
    q, k, v = (jnp.asarray(rng.standard_normal(x, np.float32).astype(dtype)) for x in shapes)
    return q, k, v, rng


def global_case(mesh, *, b=2, t=64, s=None, n=4, kh=2, h=8, d=6, dtype=jnp.float32, causal=True,
                layout="contiguous", lengths=None, batch_axis="data", head_axis=None, block=None,
                method="ring"):
    s = t if s is None else s
    q, k, v, rng = inputs(b, t, s, n, kh, h, d, dtype)
    km = None if lengths is None else jnp.asarray(np.arange(s)[None, :] < np.asarray(lengths)[:, None])

    def f(q, k, v):
        return context_parallel_attention(q, k, v, mesh=mesh, axis="seq", batch_axis=batch_axis,
                                          head_axis=head_axis, is_causal=causal, key_mask=km, layout=layout,
                                          block_q=block, block_k=block, method=method)
    out, vjp = jax.vjp(jax.jit(f), q, k, v)
    ct_host = rng.standard_normal(out.shape, np.float32).astype(dtype)
    grads = vjp(jax.device_put(ct_host, out.sharding))
    ref, ref_grads = reference(q, k, v, km, jnp.asarray(ct_host), causal)  # unsharded
    scale = max(1.0, float(np.abs(f64(ref)).max()))
    return {
        "out": max_err(out, ref) / scale,
        "grads": max(max_err(g, r) / max(1.0, float(np.abs(f64(r)).max())) for g, r in zip(grads, ref_grads)),
        "dtype": str(out.dtype),
        "spec": [str(a) for a in out.sharding.spec],
        "finite": bool(all(np.isfinite(f64(g)).all() for g in grads)),
        "dead_rows_zero": None if lengths is None else bool(
            np.all(f64(out)[np.asarray(lengths) == 0] == 0)),
    }


def shard_map_case(mesh):
    """ring_attention called directly inside jax.shard_map (default check_vma=True)."""
    q, k, v, _ = inputs(2, 32, 32, 4, 4, 8, 8, jnp.float32, seed=1)

    def body(q, k, v):
        return ring_attention(q, k, v, axis_name="seq", is_causal=True)
    spec = P(None, "seq")
    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))(q, k, v)
    ref, _ = reference(q, k, v, None, np.zeros(out.shape, np.float32), True)
    return max_err(out, ref)


def errors(mesh):
    """Each bad call's ValueError message (or None when it did not raise)."""
    q, k, v, _ = inputs(1, 62, 62, 2, 2, 8, 8, jnp.float32)
    out = {}

    def catch(name, fn):
        try:
            fn()
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
    catch("indivisible", lambda: context_parallel_attention(q, k, v, mesh=mesh, axis="seq"))
    catch("unknown_axis", lambda: context_parallel_attention(q, k, v, mesh=mesh, axis="sequence"))
    q2, k2, v2, _ = inputs(1, 64, 64, 2, 2, 8, 8, jnp.float32)
    catch("unbound_axis", lambda: ring_attention(q2, k2, v2, axis_name="seq"))
    catch("bad_layout", lambda: context_parallel_attention(q2, k2, v2, mesh=mesh, layout="striped"))
    catch("ulysses_heads", lambda: context_parallel_attention(q2, k2, v2, mesh=mesh, method="ulysses"))
    catch("causal_cross", lambda: context_parallel_attention(q2, k2[:, :32], v2[:, :32], mesh=mesh,
                                                             is_causal=True))
    return out


def module_case(mesh):
    """MultiHeadAttention(implementation="context_parallel[:zigzag|:ulysses]") under jax.set_mesh == dense."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 32, 16), np.float32))
    msk = key_mask_4d(jnp.arange(32)[None] < jnp.array([32, 17, 5, 0])[:, None])
    dense = MultiHeadAttention(num_heads=4, implementation="dense")
    params = jax.jit(dense.init)(jax.random.PRNGKey(4), x)
    ref = jax.jit(lambda p: dense.apply(p, x, mask=msk, is_causal=True))(params)  # one compile, not one per op
    res = {}
    for impl in ("context_parallel", "context_parallel:zigzag", "context_parallel:ulysses"):
        layer = MultiHeadAttention(num_heads=4, implementation=impl)
        with jax.set_mesh(mesh):
            out = jax.jit(lambda p: layer.apply(p, x, mask=msk, is_causal=True))(params)
        res[impl] = {"err": max_err(out, ref), "spec": [str(a) for a in out.sharding.spec]}
    no_mesh = MultiHeadAttention(num_heads=4, implementation="context_parallel")
    res["no_mesh"] = max_err(jax.jit(lambda p: no_mesh.apply(p, x, mask=msk, is_causal=True))(params), ref)
    return res


def memory_plan(t):
    """Per-device XLA temp+args+outputs of causal fwd+bwd: 8-way zigzag ring vs one-device chunked."""
    from flax_attention import chunked_attention
    b, n, h = 1, 8, 64
    mesh = jax.make_mesh((8,), ("seq",), axis_types=(AxisType.Auto,))

    def total(fn, shape):
        m = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))).lower(
            shape, shape, shape).compile().memory_analysis()
        return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    one = total(lambda q, k, v: chunked_attention(q, k, v, is_causal=True),
                jax.ShapeDtypeStruct((b, t, n, h), jnp.float32))
    sharded = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32, sharding=NamedSharding(mesh, P(None, "seq")))
    ring = total(lambda q, k, v: context_parallel_attention(q, k, v, mesh=mesh, is_causal=True,
                                                            layout="zigzag"), sharded)
    return {"one_device": one, "ring_per_device": ring}


def main():
    which = sys.argv[1:] or ["values", "explicit", "errors", "module", "memory"]
    auto = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)
    res = {}
    if "explicit" in which:
        explicit = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
        with jax.set_mesh(explicit):
            res["explicit_mesh_zigzag"] = global_case(explicit, layout="zigzag")
    if "values" in which:
        for layout in ("contiguous", "zigzag"):
            for causal in (False, True):
                res[f"f32_{layout}_{'causal' if causal else 'full'}"] = global_case(
                    auto, causal=causal, layout=layout, lengths=[40, 0])
        res["bf16_zigzag_causal"] = global_case(auto, dtype=jnp.bfloat16, layout="zigzag", lengths=[64, 9])
        # 6 rows per shard, blocks of 4: every chunk is padded inside the kernel.
        res["odd_blocks"] = global_case(auto, t=24, causal=True, block=4)
        res["zigzag_odd_blocks"] = global_case(auto, t=48, causal=True, layout="zigzag", block=4)
        res["cross_full"] = global_case(auto, t=32, s=64, causal=False, lengths=[50, 64])
        res["mqa"] = global_case(auto, n=4, kh=1, d=8, causal=True)
        res["gqa_heads_split"] = global_case(auto, n=4, kh=2, causal=True, batch_axis=None, head_axis="data")
        res["ulysses_causal"] = global_case(auto, n=4, kh=4, d=8, causal=True, lengths=[40, 0], method="ulysses")
        res["ulysses_gqa_repeat"] = global_case(auto, n=8, kh=2, causal=False, lengths=[64, 30],
                                                method="ulysses")
        res["shard_map"] = shard_map_case(jax.make_mesh((8,), ("seq",), axis_types=(AxisType.Auto,)))
    if "errors" in which:
        res["errors"] = errors(auto)
    if "module" in which:
        res["module"] = module_case(auto)
    if "memory" in which:
        res["memory"] = memory_plan(16384)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
