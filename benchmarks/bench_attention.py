"""Attention kernel benchmark: our attention paths against JAX, Flax, tokamax and PyTorch.

Run from the repository root::

    python -m benchmarks.bench_attention --out benchmarks/results           # CPU suite (default)
    python -m benchmarks.bench_attention --quick --out /tmp/bench           # CI smoke (tiny)
    python -m benchmarks.bench_attention --long --out benchmarks/results    # + T=32768
    python -m benchmarks.bench_attention --suite gpu --out benchmarks/results/gpu  # on a GPU

Every implementation runs in the same process on the same inputs (PyTorch in a
worker process of its own). JAX paths are AOT-compiled once
(``jit(f).lower(...).compile()``); the executable is timed (median of repeated
runs after a warm-up, ``block_until_ready``) and its ``memory_analysis()`` gives
XLA's static memory plan. Writes ``attention.md`` (also printed),
``attention.json`` and ``attention.png`` to ``--out``. Shapes per suite:
:mod:`benchmarks.suites`; peaks for "% of peak": :mod:`benchmarks.peaks`.

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
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import jax
import jax.numpy as jnp

from benchmarks import machine, peaks, peers, report, suites, timing

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
    ms_passes: List[float] = field(default_factory=list)  # each pass's median; ms = the best


def useful_flops(b, t, s, n, h, d, causal, mode) -> float:
    pairs = t * (t + 1) / 2 if causal and t == s else t * s
    fwd = 2.0 * b * n * pairs * (h + d)
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def run_case(b, t, n, h, dtype, causal, mode, args, log, cache=None) -> List[Result]:
    """Times every JAX implementation on one case; ``cache`` keeps executables across passes."""
    cache = {} if cache is None else cache
    keys = jax.random.split(jax.random.PRNGKey(t + b), 4)
    q, k, v, do = (jax.random.normal(kk, (b, t, n, h), jnp.float32).astype(dtype) for kk in keys)
    flops = useful_flops(b, t, t, n, h, h, causal, mode)
    results = []
    impls = peers.jax_impls(causal)
    if args.only:
        impls = {name: f for name, f in impls.items() if name in args.only}
    for name, fn in impls.items():
        res = Result(b, t, n, h, jnp.dtype(dtype).name, causal, mode, name)
        results.append(res)
        gib = suites.dense_logits_gib(b, n, t)
        if name in peers.DENSE and args.dense_max_gib is not None and gib > args.dense_max_gib:
            # Not even compiled: XLA would plan it, but running (or compiling) it is the cost we skip.
            res.note = f"skipped (memory): dense logits {gib:.0f} GiB > --dense-max-gib {args.dense_max_gib:g}"
            log(res)
            continue
        call_args = (q, k, v, do) if mode == "fwd+bwd" else (q, k, v)
        try:
            key = (b, t, n, h, res.dtype, causal, mode, name)
            if key not in cache:
                cache[key] = peers.compile_jax(peers.fwd_bwd(fn) if mode == "fwd+bwd" else fn, call_args)
            compiled = cache[key]
            mem = peers.memory_bytes(compiled)
            res.temp_bytes, res.total_bytes = mem["temp"], mem["total"]
            if mem["total"] is not None and mem["total"] > args.mem_limit_gib * 2**30:
                res.note = (f"skipped (memory): XLA plans {mem['total'] / 2**30:.1f} GiB "
                            f"> --mem-limit-gib {args.mem_limit_gib:g}")
            else:
                sec, res.runs = timing.median_time(
                    lambda: jax.block_until_ready(compiled(*call_args)), **timing_kw(args))
                res.ms, res.gflops = sec * 1e3, flops / sec / 1e9
                res.device_peak_bytes = peers.device_peak_bytes()
                res.max_rss_bytes = timing.max_rss_bytes()
        except Exception as err:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            res.note = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        log(res)
    return results


def timing_kw(args) -> dict:
    return dict(budget_s=args.budget, min_runs=args.min_runs, max_runs=args.max_runs,
                slow_call_s=args.slow_call_s, single_run_s=args.single_run_s)


def run_torch(cases: List[Result], request: dict, log) -> Optional[str]:
    """Times PyTorch SDPA for ``cases`` in a separate process; fills them in place.

    Args:
      cases: one placeholder result per case (impl ``"torch-sdpa"``).
      request: worker options: ``timing`` (keyword arguments of
        :func:`timing.median_time`), ``threads``, ``require_cuda`` (skip every
        case when torch has no CUDA device, rather than time CPU kernels in a
        GPU run) and ``allow_tf32``.
      log: called with each filled result.

    Returns:
      The worker's description of torch (version, threads, device), or ``None``
      if the worker failed.
    """
    payload = [dict(b=r.b, t=r.t, n=r.n, h=r.h, dtype=r.dtype, causal=r.causal, mode=r.mode) for r in cases]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.torch_worker"],
                          input=json.dumps({**request, "cases": payload}), capture_output=True, text=True, cwd=root)
    if proc.returncode:
        for r in cases:
            r.note = f"error: torch worker failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:120]}"
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
        # CPU figures hold for one CPU family only: name the CPU (model, ISA, cores) and any GPU.
        **machine.describe(accelerator=getattr(dev, "device_kind", None) if dev.platform != "cpu" else None),
        "python": platform.python_version(),
        "jax": jax.__version__,
        # Decides TF32 vs FP32 arithmetic for float32 dots on GPU, hence the peak used.
        "matmul_precision": jax.config.jax_default_matmul_precision or "default",
    }
    import flax

    env["flax"] = flax.__version__
    missing = peers.tokamax_missing()
    if missing is None:
        import tokamax

        env["tokamax"] = getattr(tokamax, "__version__", "?")
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="output folder (created)")
    p.add_argument("--suite", default="cpu", choices=sorted(suites.SUITES),
                   help="shape preset (benchmarks/suites.py): cpu (default), gpu, quick")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="= --suite quick: tiny shapes, float32: CI smoke test")
    size.add_argument("--long", action="store_true",
                      help="also causal T=32768 (B=1, float32; ours-chunked, plus ours-dense's memory plan)")
    size.add_argument("--long-only", action="store_true", help="only the --long case")
    p.add_argument("--dtypes", default=None, help="comma list overriding the suite's dtypes")
    p.add_argument("--lengths", default=None,
                   help="comma list of T: only the suite's shapes of these lengths, in this order (e.g. 16384,4096)")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--causal", default="both", choices=["both", "yes", "no"])
    p.add_argument("--only", default=None, help="comma list of implementation names to run")
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip PyTorch SDPA")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for the PyTorch worker (default: PyTorch's own)")
    p.add_argument("--matmul-precision", default=None,
                   choices=["default", "high", "highest", "tensorfloat32", "float32"],
                   help="jax_default_matmul_precision for the run (float32 inputs: TF32 or full FP32 "
                        "dots on GPU; also sets PyTorch's allow_tf32 to match); default: JAX's setting")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed runs per measurement "
                   "(default: the suite's, 3 on cpu, 0.5 on gpu/quick)")
    p.add_argument("--min-runs", type=int, default=3)
    p.add_argument("--passes", type=int, default=None,
                   help="time every case this many times, minutes apart, and keep each one's best "
                        "median (default: the suite's; 2 on cpu)")
    p.add_argument("--max-runs", type=int, default=None, help="default: the suite's (20; 5 for quick)")
    p.add_argument("--slow-call-s", type=float, default=5.0, help="calls slower than this: 1 timed run")
    p.add_argument("--single-run-s", type=float, default=30.0,
                   help="calls slower than this: the warm-up run is the measurement")
    p.add_argument("--mem-limit-gib", type=float, default=None,
                   help="skip (report only the memory plan of) runs XLA plans above this; "
                        "default 3 on CPU, 90%% of device memory on an accelerator")
    p.add_argument("--dense-max-gib", type=float, default=None,
                   help="skip dense O(T^2) implementations uncompiled when their float32 logits exceed "
                        "this (default: the suite's; 16 for gpu, off otherwise)")
    args = p.parse_args(argv)
    if args.quick:
        args.suite = "quick"
    suite = suites.SUITES[args.suite]
    args.budget = suite.budget_s if args.budget is None else args.budget
    args.max_runs = suite.max_runs if args.max_runs is None else args.max_runs
    args.passes = suite.passes if args.passes is None else args.passes
    args.dense_max_gib = suite.dense_max_gib if args.dense_max_gib is None else args.dense_max_gib
    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    if args.mem_limit_gib is None:
        stats = jax.devices()[0].memory_stats() or {}
        limit = stats.get("bytes_limit")
        args.mem_limit_gib = 0.9 * limit / 2**30 if limit else 3.0
    args.only = args.only.split(",") if args.only else None
    if args.lengths:
        args.lengths = [int(t) for t in args.lengths.split(",")]
        have = sorted({shape[1] for shape in suite.shapes})
        if not set(args.lengths) & set(have):
            p.error(f"--lengths {args.lengths}: the {args.suite} suite has T in {have}; pick from those.")
    return args


def _write_json(path: str, payload: dict) -> None:
    """Writes ``path`` whole or not at all (a run killed mid-write keeps the previous file)."""
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(path + ".tmp", path)


def _one_pass(args, plan, causal_opts, env, log, cache):
    """Every case once: all JAX implementations per case, then PyTorch's worker for all cases."""
    results: List[Result] = []
    torch_cases: List[Result] = []
    notes: List[str] = []
    for b, t, n, h, dt in plan:
        long_case = (b, t, n, h) in [s[:4] for s in suites.LONG]
        for causal in [c for c in causal_opts if c or not long_case]:
            for mode in args.modes.split(","):
                # At T=32768 only the chunked path (and its dense memory plan) is of interest.
                run_args = argparse.Namespace(**{**vars(args), "only": args.only or (
                    [peers.CHUNKED, "ours-dense"] if long_case else None)})
                results += run_case(b, t, n, h, jnp.dtype(dt), causal, mode, run_args, log, cache)
                if args.torch and not long_case and (not args.only or "torch-sdpa" in args.only):
                    torch_cases.append(Result(b, t, n, h, jnp.dtype(dt).name, causal, mode, "torch-sdpa"))
    if torch_cases and peers.torch_available():
        accel = env["backend"] in ("gpu", "tpu")
        # PyTorch gets the same float32 matmul arithmetic as the JAX side (TF32 or not).
        request = {"timing": timing_kw(args), "threads": args.torch_threads, "require_cuda": accel,
                   "allow_tf32": peaks.allows_tf32(env["matmul_precision"])}
        env["torch"] = run_torch(torch_cases, request, log)
        results += torch_cases
        if accel and all(r.note.startswith("skipped") for r in torch_cases):
            notes.append(f"torch-sdpa skipped: {torch_cases[0].note.split(': ', 1)[-1]}")
    elif args.torch:
        notes.append("torch-sdpa skipped: PyTorch is not installed")
    return results, notes


def merge_passes(passes: List[List[Result]]) -> List[Result]:
    """Per (case, implementation): the pass with the lowest median, every pass's median kept.

    A 2-vCPU VM has bursts of several seconds in which everything runs up to 2x
    slower (seen as identical executables timed 2x apart in one pass); taking the
    best of passes that are minutes apart keeps such a burst from deciding a ratio.
    """
    merged = []
    for rows in zip(*passes):
        timed = [r for r in rows if r.ms is not None]
        best = min(timed, key=lambda r: r.ms) if timed else rows[0]
        best.ms_passes = [round(r.ms, 3) for r in timed]
        merged.append(best)
    return merged


def main(argv=None) -> int:
    args = parse_args(argv)
    shapes = list(suites.SUITES[args.suite].shapes)
    if args.lengths:  # in the order given: a run cut by a time limit has measured the first ones
        shapes = [shape for t in args.lengths for shape in shapes if shape[1] == t]
    shapes = list(suites.LONG) if args.long_only else (list(suites.LONG) if args.long else []) + shapes
    causal_opts = {"both": [True, False], "yes": [True], "no": [False]}[args.causal]
    plan = [(b, t, n, h, dt) for b, t, n, h, dts in shapes for dt in (args.dtypes.split(",") if args.dtypes else dts)]
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    env["passes"] = args.passes
    print("environment:", json.dumps(env), file=sys.stderr, flush=True)

    json_path = os.path.join(args.out, "attention.json")
    seen: List[Result] = []

    def log(r: Result):
        # attention.json grows with every result ("complete": false), so a run stopped by a
        # time limit (benchmarks/accelerator_check.py) still leaves what it measured.
        seen.append(r)
        _write_json(json_path, {"environment": env, "notes": notes, "complete": False,
                                "results": [asdict(x) for x in seen]})
        shown = f"{r.ms:9.2f} ms {r.gflops:7.1f} GFLOP/s" if r.ms is not None else r.note
        print(f"B={r.b} T={r.t} N={r.n} H={r.h} {r.dtype:8s} causal={r.causal!s:5s} {r.mode:7s} {r.impl:20s} {shown}",
              file=sys.stderr, flush=True)

    notes = [note for note in [peers.tokamax_missing()] if note]
    passes: List[List[Result]] = []
    cache: dict = {}
    for p in range(args.passes):
        if args.passes > 1:
            print(f"pass {p + 1}/{args.passes}", file=sys.stderr, flush=True)
        results, torch_notes = _one_pass(args, plan, causal_opts, env, log, cache)
        passes.append(results)
    notes += torch_notes
    results = merge_passes(passes)
    rows = [asdict(r) for r in results]
    _write_json(json_path, {"environment": env, "notes": notes, "complete": True, "results": rows})
    markdown = report.markdown(rows, env, " ".join(sys.argv[1:] if argv is None else argv), notes)
    with open(os.path.join(args.out, "attention.md"), "w") as f:
        f.write(markdown)
    report.plot(rows, os.path.join(args.out, "attention.png"))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
