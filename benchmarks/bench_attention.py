"""Attention kernel benchmark: our dense and chunked paths against JAX, Flax and PyTorch.

Run from the repository root::

    python -m benchmarks.bench_attention --out benchmarks/results           # default suite
    python -m benchmarks.bench_attention --quick --out /tmp/bench           # CI smoke (tiny)
    python -m benchmarks.bench_attention --long --out benchmarks/results    # + T=32768

Every implementation runs in the same process on the same inputs. JAX paths are
AOT-compiled once (``jit(f).lower(...).compile()``); the executable is timed
(median of repeated runs after a warm-up, ``block_until_ready``) and its
``memory_analysis()`` gives XLA's static memory plan. Writes ``attention.md``
(also printed), ``attention.json`` and ``attention.png`` to ``--out``.

FLOP convention (same for every implementation, so GFLOP/s ratios equal time
ratios): forward = ``2·B·N·P·(H + D)`` with ``P`` the number of *visible*
(query, key) pairs (``T·S``, or ``T·(T+1)/2`` for causal self-attention: masked
work is not useful work); forward+backward = 3.5 × forward (the backward has 5
matmuls to the forward's 2; recomputation is not counted).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional

import jax
import jax.numpy as jnp

from benchmarks import peers, report, timing

N_HEADS, HEAD_DIM = 8, 64
# (B, T, dtypes) at N=8, H=64. T=8192 runs in float32 only to keep the default
# suite near 10 minutes on 2 CPU cores; pass --dtypes to change that.
DEFAULT_SHAPES = [(4, 512, ("float32", "bfloat16")), (1, 2048, ("float32", "bfloat16")), (1, 8192, ("float32",))]
QUICK_SHAPES = [(1, 256, ("float32",))]  # at N=2, H=32
# --long: causal only (the memory bar), run first so the process RSS is its own.
LONG_SHAPES = [(1, 32768, ("float32",))]


@dataclass
class Result:
    b: int
    t: int
    n: int
    h: int
    dtype: str
    causal: bool
    mode: str  # "fwd" | "fwd+bwd"
    impl: str
    ms: Optional[float] = None
    gflops: Optional[float] = None
    runs: int = 0
    temp_bytes: Optional[int] = None
    total_bytes: Optional[int] = None
    device_peak_bytes: Optional[int] = None
    max_rss_bytes: Optional[int] = None
    note: str = ""


def useful_flops(b, t, s, n, h, d, causal, mode) -> float:
    pairs = t * (t + 1) / 2 if causal and t == s else t * s
    fwd = 2.0 * b * n * pairs * (h + d)
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def run_case(b, t, n, h, dtype, causal, mode, args, log) -> List[Result]:
    keys = jax.random.split(jax.random.PRNGKey(t + b), 4)
    q, k, v, do = (jax.random.normal(kk, (b, t, n, h), jnp.float32).astype(dtype) for kk in keys)
    flops = useful_flops(b, t, t, n, h, h, causal, mode)
    timing_kw = dict(budget_s=args.budget, min_runs=args.min_runs, max_runs=args.max_runs,
                  slow_call_s=args.slow_call_s, single_run_s=args.single_run_s)
    results = []
    impls = peers.jax_impls(causal)
    if args.only:
        impls = {name: f for name, f in impls.items() if name in args.only}
    for name, fn in impls.items():
        res = Result(b, t, n, h, jnp.dtype(dtype).name, causal, mode, name)
        call_args = (q, k, v, do) if mode == "fwd+bwd" else (q, k, v)
        try:
            compiled = peers.compile_jax(peers.fwd_bwd(fn) if mode == "fwd+bwd" else fn, call_args)
            mem = peers.memory_bytes(compiled)
            res.temp_bytes, res.total_bytes = mem["temp"], mem["total"]
            if mem["total"] is not None and mem["total"] > args.mem_limit_gib * 2**30:
                res.note = f"not run: XLA plans {mem['total'] / 2**30:.1f} GiB > --mem-limit-gib {args.mem_limit_gib:g}"
            else:
                sec, res.runs = timing.median_time(
                    lambda: jax.block_until_ready(compiled(*call_args)), **timing_kw)
                res.ms, res.gflops = sec * 1e3, flops / sec / 1e9
                res.device_peak_bytes = peers.device_peak_bytes()
                res.max_rss_bytes = timing.max_rss_bytes()
        except Exception as err:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            res.note = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        log(res)
        results.append(res)
    return results


def run_torch(cases: List[Result], timing_kw: dict, threads: Optional[int], log) -> Optional[str]:
    """Times PyTorch SDPA for ``cases`` in a separate process; fills them in place."""
    payload = [dict(b=r.b, t=r.t, n=r.n, h=r.h, dtype=r.dtype, causal=r.causal, mode=r.mode, timing=timing_kw)
               for r in cases]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.torch_worker"], input=json.dumps({"threads": threads, "cases": payload}),
                          capture_output=True, text=True, cwd=root)
    if proc.returncode:
        for r in cases:
            r.note = f"error: torch worker failed: {proc.stderr.strip().splitlines()[-1][:120]}"
        return None
    answer = json.loads(proc.stdout)
    for r, got in zip(cases, answer["results"]):
        r.impl, r.ms, r.runs, r.note = got["impl"], got["ms"], got["runs"], got["note"]
        if r.ms is not None:
            r.gflops = useful_flops(r.b, r.t, r.t, r.n, r.h, r.h, r.causal, r.mode) / r.ms / 1e6
        log(r)
    return answer["torch"]


def environment() -> dict:
    dev = jax.devices()[0]
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }
    import flax

    env["flax"] = flax.__version__
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="output folder (created)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny shapes, float32 only: CI smoke test")
    size.add_argument("--long", action="store_true",
                      help="also causal T=32768 (B=1, float32; ours-chunked, plus ours-dense's memory plan)")
    size.add_argument("--long-only", action="store_true", help="only the --long case")
    p.add_argument("--dtypes", default=None, help="comma list, default 'float32,bfloat16'")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--causal", default="both", choices=["both", "yes", "no"])
    p.add_argument("--only", default=None, help="comma list of implementation names to run")
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip PyTorch SDPA")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for the PyTorch worker (default: PyTorch's own)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed runs per measurement")
    p.add_argument("--min-runs", type=int, default=3)
    p.add_argument("--max-runs", type=int, default=20)
    p.add_argument("--slow-call-s", type=float, default=5.0, help="calls slower than this: 1 timed run")
    p.add_argument("--single-run-s", type=float, default=30.0,
                   help="calls slower than this: the warm-up run is the measurement")
    p.add_argument("--mem-limit-gib", type=float, default=None,
                   help="skip (report only the memory plan of) runs XLA plans above this; "
                        "default 3 on CPU, 90%% of device memory on an accelerator")
    args = p.parse_args(argv)
    if args.mem_limit_gib is None:
        stats = jax.devices()[0].memory_stats() or {}
        limit = stats.get("bytes_limit")
        args.mem_limit_gib = 0.9 * limit / 2**30 if limit else 3.0
    args.only = args.only.split(",") if args.only else None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    shapes, n, h = (QUICK_SHAPES, 2, 32) if args.quick else (DEFAULT_SHAPES, N_HEADS, HEAD_DIM)
    shapes = LONG_SHAPES if args.long_only else (LONG_SHAPES if args.long else []) + shapes
    causal_opts = {"both": [True, False], "yes": [True], "no": [False]}[args.causal]
    plan = [(b, t, dt) for b, t, dts in shapes for dt in (args.dtypes.split(",") if args.dtypes else dts)]
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    print("environment:", json.dumps(env), file=sys.stderr, flush=True)

    def log(r: Result):
        shown = f"{r.ms:9.2f} ms {r.gflops:7.1f} GFLOP/s" if r.ms is not None else r.note
        print(f"B={r.b} T={r.t} {r.dtype:8s} causal={r.causal!s:5s} {r.mode:7s} {r.impl:16s} {shown}",
              file=sys.stderr, flush=True)

    results: List[Result] = []
    torch_cases: List[Result] = []
    for b, t, dt in plan:
        long_case = any((b, t) == (lb, lt) for lb, lt, _ in LONG_SHAPES)
        for causal in [c for c in causal_opts if c or not long_case]:
            for mode in args.modes.split(","):
                # At T=32768 only the chunked path (and its dense memory plan) is of interest.
                run_args = argparse.Namespace(**{**vars(args), "only": args.only or (
                    [peers.CHUNKED, "ours-dense"] if long_case else None)})
                results += run_case(b, t, n, h, jnp.dtype(dt), causal, mode, run_args, log)
                if args.torch and not long_case and (not args.only or "torch-sdpa" in args.only):
                    torch_cases.append(Result(b, t, n, h, jnp.dtype(dt).name, causal, mode, "torch-sdpa"))
    if torch_cases and peers.torch_available():
        timing_kw = dict(budget_s=args.budget, min_runs=args.min_runs, max_runs=args.max_runs,
                      slow_call_s=args.slow_call_s, single_run_s=args.single_run_s)
        env["torch"] = run_torch(torch_cases, timing_kw, args.torch_threads, log)
        results += torch_cases

    rows = [asdict(r) for r in results]
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    markdown = report.markdown(rows, env, " ".join(sys.argv[1:] if argv is None else argv))
    with open(os.path.join(args.out, "attention.md"), "w") as f:
        f.write(markdown)
    report.plot(rows, os.path.join(args.out, "attention.png"))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
