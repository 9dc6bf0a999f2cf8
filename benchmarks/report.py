"""Markdown tables, performance bars and a PNG plot from benchmark result rows."""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from benchmarks.machine import summary_line
from benchmarks.peaks import peak_tflops
from benchmarks.peers import AUTO, CHUNKED, OURS

MIB = 2**20
AUTO_TOLERANCE = 1.05  # the bar: ours-auto at most 5% slower than the fastest peer


def _fmt(x: Optional[float], spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _case(r: Dict) -> tuple:
    return (r["b"], r["t"], r["n"], r["h"], r["dtype"], r["causal"], r["mode"])


def _case_label(c: tuple) -> str:
    b, t, n, h, dtype, causal, mode = c
    return f"B={b} T={t} N={n} H={h} {dtype} {'causal' if causal else 'full'} {mode}"


def _group(rows: List[Dict]) -> "OrderedDict[tuple, Dict[str, Dict]]":
    groups: "OrderedDict[tuple, Dict[str, Dict]]" = OrderedDict()
    for r in rows:
        groups.setdefault(_case(r), {})[r["impl"]] = r
    return groups


def speedup(group: Dict[str, Dict], peer: str) -> Optional[float]:
    """How many times faster ours-chunked is than ``peer`` (> 1: ours faster)."""
    ours, other = group.get(CHUNKED), group.get(peer)
    if not ours or not other or ours["ms"] is None or other["ms"] is None:
        return None
    return other["ms"] / ours["ms"]


def auto_vs_fastest(group: Dict[str, Dict]) -> Optional[Tuple[str, float, Optional[float], bool]]:
    """ours-auto against the fastest peer that ran in one case.

    Args:
      group: impl name -> result row (``ms`` is ``None`` when it did not run).

    Returns:
      ``(fastest peer, its ms, ours-auto ms / its ms, passed)``, where passed
      means the ratio is at most :data:`AUTO_TOLERANCE` (a missing ours-auto
      time fails); ``None`` when no peer ran, so there is nothing to compare.
    """
    times = {name: r["ms"] for name, r in group.items() if name not in OURS and r.get("ms") is not None}
    if not times:
        return None
    best = min(times, key=times.get)
    auto = group.get(AUTO, {}).get("ms")
    ratio = None if auto is None else auto / times[best]
    return best, times[best], ratio, ratio is not None and ratio <= AUTO_TOLERANCE


def auto_bar(rows: List[Dict], backend: str) -> Optional[str]:
    """The summary line of the "ours-auto within 5% of the fastest peer in every case" bar."""
    verdicts = [v for v in (auto_vs_fastest(g) for g in _group(rows).values() if AUTO in g) if v is not None]
    if not verdicts:
        return None
    passed = sum(v[3] for v in verdicts)
    ok = "PASS" if passed == len(verdicts) else "FAIL"
    label = "" if backend in ("gpu", "tpu") else f" (informational: a {backend} run; the bar is for GPU/TPU)"
    return (f"- {ok}{label}: None (ours-auto) within 5% of the fastest peer in every case: "
            f"{passed}/{len(verdicts)} cases pass (table below)")


def bars(rows: List[Dict]) -> List[str]:
    """The project's performance bars, checked on whatever this run measured."""
    lines = []
    groups = _group(rows)
    for (b, t, n, h, dtype, causal, mode), g in groups.items():
        if t == 2048 and mode == "fwd+bwd" and "flax.linen" in g:
            x = speedup(g, "flax.linen")
            need = 1.5 if causal else 1.0
            ok = "PASS" if x is not None and x >= need else "FAIL"
            lines.append(f"- {ok}: {'causal' if causal else 'non-causal'} T=2048 B={b} {dtype} fwd+bwd: "
                         f"ours-chunked {_fmt(x, '.2f')}x vs flax.linen (bar >= {need}x)")
        if t == 32768 and mode == "fwd+bwd" and causal and CHUNKED in g:
            r, dense = g[CHUNKED], g.get("ours-dense", {})
            peak = r["total_bytes"]
            ok = "PASS" if r["ms"] is not None and peak is not None and peak <= 2 * 2**30 else "FAIL"
            rss = r.get("max_rss_bytes")
            lines.append(
                f"- {ok}: causal T=32768 B={b} {dtype} fwd+bwd: ours-chunked ran in {_fmt(r['ms'], '.0f')} ms "
                f"with {_fmt(peak and peak / MIB, '.0f')} MiB planned by XLA (bar <= 2048 MiB; process max "
                f"RSS so far {_fmt(rss and rss / MIB, '.0f')} MiB, incl. the Python/JAX runtime); the dense "
                f"path would need {_fmt(dense.get('total_bytes') and dense['total_bytes'] / MIB, '.0f')} MiB")
    return lines


def _peaks(rows: List[Dict], env: Dict) -> Dict[str, Tuple[Optional[float], str]]:
    """dtype -> (peak TFLOP/s, label) for this run's device and matmul precision."""
    dtypes = OrderedDict.fromkeys(r["dtype"] for r in rows)
    return {d: peak_tflops(env.get("device", ""), d, env.get("matmul_precision")) for d in dtypes}


def _auto_table(groups, backend: str) -> List[str]:
    info = "" if backend in ("gpu", "tpu") else " — informational on " + backend
    out = [f"## ours-auto (implementation=None) vs the fastest peer (bar: ≤ {AUTO_TOLERANCE:.2f}x{info})", "",
           "| case | ours-auto ms | fastest peer | its ms | auto / peer | bar |", "|---|---:|---|---:|---:|---|"]
    for case, g in groups.items():
        v = auto_vs_fastest(g) if AUTO in g else None
        if v is None:
            continue
        best, best_ms, ratio, ok = v
        out.append(f"| {_case_label(case)} | {_fmt(g[AUTO]['ms'], '.2f')} | {best} | {best_ms:.2f} | "
                   f"{_fmt(ratio, '.2f')}{'x' if ratio is not None else ''} | {'PASS' if ok else 'FAIL'} |")
    return out + [""] if len(out) > 4 else []


def markdown(rows: List[Dict], env: Dict, argv: str, notes: Optional[List[str]] = None) -> str:
    """The report: bars, speed-ups over each implementation, ours-auto's bar, all measurements.

    Args:
      rows: result rows (``bench_attention.Result`` as dicts).
      env: the run's environment (``backend``, ``device``, ``matmul_precision`` ...).
      argv: the command line, shown verbatim.
      notes: lines about peers that were left out (no tokamax, no CUDA torch).
    """
    groups = _group(rows)
    impls = list(OrderedDict.fromkeys(r["impl"] for r in rows))
    peers = [i for i in impls if i != CHUNKED]
    backend = env.get("backend", "cpu")
    gpu = any(r.get("device_peak_bytes") for r in rows)
    peaks = _peaks(rows, env)
    with_peak = any(p is not None for p, _ in peaks.values())
    out = ["# Attention kernel benchmark", ""]
    out.append(f"Command: `python -m benchmarks.bench_attention {argv}`".rstrip())
    out.append("")
    if "cpu_model" in env:  # runs before the machine was recorded have no such line
        out += [f"Machine: {summary_line(env)}", ""]
    out.append("Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    passes = env.get("passes", 1)
    best_of = (f" The whole suite was timed {passes} times (passes minutes apart, PyTorch's worker once per "
               f"pass); each entry is its best pass's median, every pass's median is in attention.json "
               f"(`ms_passes`)." if passes > 1 else "")
    out += ["", "Times are medians of repeated runs after a warm-up (wall clock, block_until_ready). "
            "GFLOP/s counts useful FLOPs: forward 2·B·N·P·(H+D), P = visible (query, key) pairs "
            "(T·(T+1)/2 when causal); fwd+bwd = 3.5x forward. Memory: XLA's compiled plan "
            "(`memory_analysis()`), temp = scratch, total = arguments + outputs + temp. runs = timed runs "
            "(0 = a single cold run, used for calls over --single-run-s). ours-auto = "
            "`implementation=None`, the library default." + best_of, ""]
    out += [f"- {n}" for n in notes or []] + ([""] if notes else [])
    out.append(f"Peak used for % of peak (dense, vendor datasheet; `benchmarks/peaks.py`), "
               f"jax_default_matmul_precision={env.get('matmul_precision', 'default')} "
               f"(set with --matmul-precision):")
    out += [f"- {d}: {label}" for d, (_, label) in peaks.items()] + [""]
    bar_lines = bars(rows) + [line for line in [auto_bar(rows, backend)] if line]
    if bar_lines:
        out += ["## Bars", ""] + bar_lines + [""]
    out += ["## Speed-up of ours-chunked over each implementation (time ratio, > 1 = ours faster)", ""]
    out.append("| case | ours-chunked ms | " + " | ".join(peers) + " |")
    out.append("|---|---:|" + "---:|" * len(peers))
    for case, g in groups.items():
        ours = g.get(CHUNKED, {}).get("ms")
        cells = [_fmt(speedup(g, p), ".2f") + "x" if speedup(g, p) is not None else "—" for p in peers]
        out.append(f"| {_case_label(case)} | {_fmt(ours, '.1f')} | " + " | ".join(cells) + " |")
    out += [""] + _auto_table(groups, backend)
    out += ["## All measurements", ""]
    # Accelerators are judged in TFLOP/s (against datasheet peaks); CPUs in GFLOP/s.
    scale, unit = (1e3, "TFLOP/s") if backend in ("gpu", "tpu") else (1.0, "GFLOP/s")
    head = f"| case | impl | ms | {unit} |" + (" % peak |" if with_peak else "") + " runs | temp MiB | total MiB |"
    head += " device peak MiB |" if gpu else ""
    out += [head + " note |", "|---|---|---:|---:|" + "---:|" * (3 + with_peak + gpu) + "---|"]
    for case, g in groups.items():
        for name, r in g.items():
            cells = [_case_label(case), name, _fmt(r["ms"], ".2f"), _fmt(r["gflops"] and r["gflops"] / scale, ".1f")]
            if with_peak:
                peak = peaks[r["dtype"]][0]
                cells.append(_fmt(peak and r["gflops"] and 100 * r["gflops"] / 1e3 / peak, ".1f"))
            cells += [str(r["runs"]), _fmt(r["temp_bytes"] and r["temp_bytes"] / MIB, ".1f"),
                      _fmt(r["total_bytes"] and r["total_bytes"] / MIB, ".1f")]
            if gpu:
                cells.append(_fmt(r.get("device_peak_bytes") and r["device_peak_bytes"] / MIB, ".0f"))
            out.append("| " + " | ".join(cells + [r["note"]]) + " |")
    if gpu:
        out += ["", "device peak = the allocator's process-wide high-water mark after that run (monotone)."]
    return "\n".join(out) + "\n"


def plot(rows: List[Dict], path: str) -> None:
    """Grouped bars of GFLOP/s per case, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(OrderedDict.fromkeys(r["mode"] for r in rows))
    impls = list(OrderedDict.fromkeys(r["impl"] for r in rows))
    per_mode = max(len(_group(rows)) // max(len(modes), 1), 1)
    # Wider for big suites (the GPU suite has 48 cases per mode) so bars stay legible.
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(14, 0.6 * per_mode), 4.5 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        groups = OrderedDict((c, g) for c, g in _group(rows).items() if c[-1] == mode)
        width = 0.8 / max(len(impls), 1)
        for i, name in enumerate(impls):
            xs, ys = [], []
            for x, g in enumerate(groups.values()):
                r = g.get(name)
                if r and r["gflops"] is not None:
                    xs.append(x + (i - (len(impls) - 1) / 2) * width)
                    ys.append(r["gflops"])
            ax.bar(xs, ys, width, label=name)
        labels = [f"T={c[1]} B={c[0]}\n{c[4]} {'causal' if c[5] else 'full'}" for c in groups]
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("useful GFLOP/s (higher is better)")
        ax.set_title(f"attention {mode}")
        ax.legend(fontsize=8, ncol=3)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
