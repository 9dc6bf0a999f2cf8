"""Probes the accelerator check runs in their own processes: what the devices are, and what the default does.

``python -m benchmarks.accelerator_probes devices`` prints the JAX devices, versions,
cuDNN version, the machine (:mod:`benchmarks.machine`) and what
``implementation=None`` selects for typical calls on this platform.
``python -m benchmarks.accelerator_probes default`` runs ``implementation=None``
(forward and backward) on a few calls that exercise the selection rule (masks, a
dead row, GQA, causal ``T < S``, a window, float32, a head size cuDNN refuses),
checks that cuDNN appears in the compiled program exactly where
:func:`~flax_attention.kernels.backend_select.select_implementation` says it should, and
compares values and gradients with the dense path in float32. Each prints its
result as one ``PROBE_JSON {...}`` line (last on stdout) and exits 1 when a
check failed.
"""

from __future__ import annotations

import json
import sys
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine
from flax_attention.kernels import backend_select
from flax_attention.functional.attention import scaled_dot_product_attention as sdpa

PREFIX = "PROBE_JSON "
# (name, dtype, B, T, S, N, K, H, options): small enough for a CPU dry run, yet
# every rule of the selection is met by at least one case.
CASES = (
    ("causal T=S", "bfloat16", 2, 256, 256, 8, 2, 64, dict(is_causal=True)),
    ("padding mask, batch 1 sees no key", "bfloat16", 2, 128, 256, 8, 8, 64, dict(padding=True)),
    ("causal T<S bottom-right", "bfloat16", 2, 128, 256, 8, 2, 64, dict(is_causal=True)),
    ("window 32", "float16", 1, 256, 256, 4, 4, 128, dict(window=32)),
    ("float32 causal (XLA)", "float32", 2, 256, 256, 8, 2, 64, dict(is_causal=True)),
    ("head size 256 (XLA)", "bfloat16", 1, 128, 128, 2, 2, 256, dict()),
)
# Relative tolerance against the float32 dense path (max |error| / max |reference|).
TOLERANCE = {"bfloat16": 4e-2, "float16": 1e-2, "float32": 1e-2}


def emit(result: Dict) -> None:
    print(PREFIX + json.dumps(result), flush=True)


def devices() -> Dict:
    """The platform, devices, versions and the default selection for typical calls."""
    import flax

    backend = jax.default_backend()
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    info = {"backend": backend, "devices": [str(d) for d in jax.devices()], "device_kind": kind,
            "jax": jax.__version__, "flax": flax.__version__,
            "memory_bytes_limit": (dev.memory_stats() or {}).get("bytes_limit"),
            "machine": machine.describe(accelerator=kind if backend != "cpu" else None)}
    try:
        from jax._src.lib import cuda_versions

        info["cudnn_version"] = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        info["cudnn_version"] = f"unknown ({type(err).__name__})"
    info["default_selection"] = {
        name: backend_select.select_implementation(_call(backend, dtype, b, t, s, n, k, h, opts))
        for name, dtype, b, t, s, n, k, h, opts in CASES}
    info["measured"] = {p: list(v) for p, v in backend_select.MEASURED.items()}
    return info


def _call(platform, dtype, b, t, s, n, k, h, opts) -> backend_select.AttentionCall:
    return backend_select.AttentionCall(
        platform=platform, batch=b, t=t, s=s, n=n, k=k, h=h, d=h, dtype=dtype, has_mask=bool(opts.get("padding")),
        is_causal=bool(opts.get("is_causal")), has_window="window" in opts)


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))


def _one_case(name, dtype, b, t, s, n, k, h, opts) -> Dict:
    backend = jax.default_backend()
    expected = backend_select.select_implementation(_call(backend, dtype, b, t, s, n, k, h, opts))
    rng = np.random.default_rng(0)
    q32, k32, v32 = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                     for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h)))
    kw = {"is_causal": bool(opts.get("is_causal")), "window": opts.get("window")}
    if opts.get("padding"):
        lengths = np.array([s] + [0] * (b - 1))  # batch 1 and up: no visible key, a dead row
        kw["mask"] = jnp.asarray(np.arange(s)[None, None, None, :] < lengths[:, None, None, None])

    def loss(impl):
        return lambda *a: jnp.sum(sdpa(*a, implementation=impl, **kw).astype(jnp.float32) ** 2)

    args = tuple(x.astype(dtype) for x in (q32, k32, v32))
    fwd = jax.jit(lambda *a: sdpa(*a, **kw))
    grad = jax.jit(jax.grad(loss(None), (0, 1, 2)))
    hlo = fwd.lower(*args).as_text() + grad.lower(*args).as_text()
    out, grads = fwd(*args), grad(*args)
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(lambda *a: sdpa(*a, implementation="dense", **kw))(q32, k32, v32)
        ref_grads = jax.jit(jax.grad(loss("dense"), (0, 1, 2)))(q32, k32, v32)
    result = {"case": name, "dtype": dtype, "shape": f"B={b} T={t} S={s} N={n} K={k} H={h}",
              "expected": expected, "cudnn_in_program": "cudnn" in hlo.lower(),
              "out_rel_err": _rel_err(out, ref),
              "grad_rel_err": max(_rel_err(g, r) for g, r in zip(grads, ref_grads)),
              "finite": bool(all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads))}
    checks = [result["cudnn_in_program"] == (expected == "cudnn"), result["finite"],
              result["out_rel_err"] <= TOLERANCE[dtype], result["grad_rel_err"] <= 2 * TOLERANCE[dtype]]
    if opts.get("padding"):
        result["dead_rows_zero"] = bool((np.asarray(out[1:], np.float32) == 0).all()
                                        and (np.asarray(grads[0][1:], np.float32) == 0).all())
        checks.append(result["dead_rows_zero"])
    result["ok"] = all(checks)
    return result


def default_path() -> Dict:
    """Every :data:`CASES` entry through ``implementation=None``; ``ok`` when all pass."""
    results: List[Dict] = []
    for case in CASES:
        try:
            results.append(_one_case(*case))
        except Exception as err:  # noqa: BLE001 - one failing case must not hide the others
            results.append({"case": case[0], "ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"})
        print(json.dumps(results[-1]), flush=True)
    return {"backend": jax.default_backend(), "cases": results, "ok": all(r["ok"] for r in results)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["devices"], ["default"]):
        print("usage: python -m benchmarks.accelerator_probes devices|default", file=sys.stderr)
        return 2
    if argv == ["devices"]:
        info = devices()
        print(json.dumps(info, indent=1), flush=True)
        emit(info)
        return 0
    result = default_path()
    emit(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
