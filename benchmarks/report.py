"""Markdown tables, performance bars and a PNG plot from benchmark result rows."""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

from benchmarks.peers import CHUNKED

MIB = 2**20


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


def markdown(rows: List[Dict], env: Dict, argv: str) -> str:
    groups = _group(rows)
    impls = list(OrderedDict.fromkeys(r["impl"] for r in rows))
    peers = [i for i in impls if i != CHUNKED]
    gpu = any(r.get("device_peak_bytes") for r in rows)
    out = ["# Attention kernel benchmark", ""]
    out.append(f"Command: `python -m benchmarks.bench_attention {argv}`".rstrip())
    out.append("")
    out.append("Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    out += ["", "Times are medians of repeated runs after a warm-up (wall clock, block_until_ready). "
            "GFLOP/s counts useful FLOPs: forward 2·B·N·P·(H+D), P = visible (query, key) pairs "
            "(T·(T+1)/2 when causal); fwd+bwd = 3.5x forward. Memory: XLA's compiled plan "
            "(`memory_analysis()`), temp = scratch, total = arguments + outputs + temp. runs = timed runs "
            "(0 = a single cold run, used for calls over --single-run-s).", ""]
    bar_lines = bars(rows)
    if bar_lines:
        out += ["## Bars", ""] + bar_lines + [""]
    out += ["## Speed-up of ours-chunked over each implementation (time ratio, > 1 = ours faster)", ""]
    out.append("| case | ours-chunked ms | " + " | ".join(peers) + " |")
    out.append("|---|---:|" + "---:|" * len(peers))
    for case, g in groups.items():
        ours = g.get(CHUNKED, {}).get("ms")
        cells = [_fmt(speedup(g, p), ".2f") + "x" if speedup(g, p) is not None else "—" for p in peers]
        out.append(f"| {_case_label(case)} | {_fmt(ours, '.1f')} | " + " | ".join(cells) + " |")
    out += ["", "## All measurements", ""]
    head = "| case | impl | ms | GFLOP/s | runs | temp MiB | total MiB |" + (" device peak MiB |" if gpu else "")
    out += [head + " note |", "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "") + "---|"]
    for case, g in groups.items():
        for name, r in g.items():
            cells = [_case_label(case), name, _fmt(r["ms"], ".2f"), _fmt(r["gflops"], ".1f"), str(r["runs"]),
                     _fmt(r["temp_bytes"] and r["temp_bytes"] / MIB, ".1f"),
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
    fig, axes = plt.subplots(len(modes), 1, figsize=(14, 4.5 * len(modes)), squeeze=False)
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
