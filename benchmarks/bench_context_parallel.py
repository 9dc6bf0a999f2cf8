"""Context-parallel (ring) attention: per-device memory plans, work balance and a comm/compute estimate.

For causal fwd+bwd attention (B=1, N=8, H=64, float32) at several lengths it
compiles, per device count P, the one-device chunked kernel (P=1) or
:func:`flax_attention.context_parallel_attention` (P>1, on P simulated CPU
devices, each count in its own process) and records XLA's per-device memory
plan (``compiled.memory_analysis()``: temporaries + arguments + outputs).
Nothing is executed: simulated devices share the host's cores, so their
timings would mean nothing, and none are reported.

FLOPs per device come from the kernel's block plan (:func:`ring_work`):
``14·H`` FLOPs per computed logit and head for fwd+bwd (forward ``QKᵀ`` and
``PV``: 4·H; backward recomputes ``QKᵀ`` and runs ``dV, dP, dQ, dK``: 10·H).
XLA's own ``cost_analysis`` counts a loop body once, whatever its trip count,
so it cannot count a blocked kernel and is not used.

The estimate for real hardware compares, per ring step of the balanced
(zigzag) layout, the attention compute at a stated fraction of the dense peak
with the time to send the step's K/V block (forward) or K/V plus float32
dK/dV accumulators (backward) to the next device, and gives the per-device
sequence length above which the transfer hides under compute.

    python -m benchmarks.bench_context_parallel            # T = 8k..128k, P = 1, 2, 4, 8
    python -m benchmarks.bench_context_parallel --lengths 8192 --devices 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from typing import Dict, List

B, N, H = 1, 8, 64
FLOPS_PER_LOGIT = 14 * H  # fwd 4·H + bwd 10·H, per head (see the module docstring)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Per-step comm/compute estimate. Stated assumptions, not measurements:
HARDWARE = {
    "NVIDIA H200 SXM": {"peak_tflops_bf16": 989.0, "link_gb_s": 450.0,
                        "link": "NVLink 4, 900 GB/s aggregate = 450 GB/s each way (ring sends one way)"},
    "TPU v5p": {"peak_tflops_bf16": 459.0, "link_gb_s": 100.0,
                "link": "one ICI link, ~100 GB/s each way (4,800 Gbps per chip over 6 links)"},
}
PEAK_FRACTION = 0.5  # attention kernels reach roughly half of dense peak (FlashAttention-2/3 papers)


def _worker(devices: int, lengths: List[int]) -> List[Dict]:
    """Runs in a process with ``devices`` simulated devices; returns memory plans."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from flax_attention import chunked_attention, context_parallel_attention, ring_work

    rows = []
    for t in lengths:
        if devices == 1:
            fn = lambda q, k, v: chunked_attention(q, k, v, is_causal=True)  # noqa: E731
            shape = jax.ShapeDtypeStruct((B, t, N, H), jnp.float32)
            work = ring_work(t, 1, "contiguous", rows=B * N)
        else:
            mesh = jax.make_mesh((devices,), ("seq",), axis_types=(AxisType.Auto,))
            fn = lambda q, k, v: context_parallel_attention(  # noqa: E731
                q, k, v, mesh=mesh, is_causal=True, layout="zigzag")
            shape = jax.ShapeDtypeStruct((B, t, N, H), jnp.float32,
                                         sharding=NamedSharding(mesh, PartitionSpec(None, "seq")))
            work = ring_work(t, devices, "zigzag", rows=B * N)
        grad = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2)))
        mem = grad.lower(shape, shape, shape).compile().memory_analysis()
        rows.append({
            "t": t, "devices": devices, "layout": "one device (chunked)" if devices == 1 else "zigzag ring",
            "temp_mib": mem.temp_size_in_bytes / 2**20,
            "args_mib": mem.argument_size_in_bytes / 2**20,
            "out_mib": mem.output_size_in_bytes / 2**20,
            "gflop_per_device": max(work) * N * B * FLOPS_PER_LOGIT / 1e9,
        })
    return rows


def balance(lengths: List[int], devices: List[int]) -> List[Dict]:
    """Per-device computed logits, contiguous vs zigzag (pure block-plan counts)."""
    from flax_attention import ring_work
    rows = []
    for t in lengths:
        for p in devices:
            if p == 1:
                continue
            for layout in ("contiguous", "zigzag"):
                w = ring_work(t, p, layout, rows=B * N)
                rows.append({"t": t, "devices": p, "layout": layout, "per_device_glogits": [x / 1e9 for x in w],
                             "max_over_mean": max(w) / (sum(w) / len(w))})
    return rows


def estimate(devices: List[int], kv_heads: int = N, heads: int = N, head_dim: int = 128) -> List[Dict]:
    """Per ring step: compute time at PEAK_FRACTION of peak vs the K/V (and dK/dV) transfer.

    Zigzag, after the first step, computes half a chunk pair: ``c²/2`` logits
    per head for ``c = T/P`` local tokens. Forward: ``4·H`` FLOPs per logit and
    ``2·c·K·H`` bf16 elements sent; backward: ``10·H`` FLOPs per logit and K/V
    (bf16) plus dK/dV (float32) sent. Compute hides the transfer when
    ``c >= bytes_per_token / (flops_per_token_pair / time_per_flop)``; solved
    for ``c`` below.
    """
    out = []
    for name, hw in HARDWARE.items():
        flops_s = hw["peak_tflops_bf16"] * 1e12 * PEAK_FRACTION
        bw = hw["link_gb_s"] * 1e9
        for phase, fpl, bytes_per_elem in (("forward", 4, 2), ("backward", 10, 2 + 4)):
            # compute(c) = fpl·H·N·c²/2 / flops_s ; comm(c) = 2·c·K·H·bytes / bw
            c_min = (2 * kv_heads * head_dim * bytes_per_elem / bw) / (fpl * head_dim * heads / 2 / flops_s)
            out.append({"hardware": name, "link": hw["link"], "phase": phase, "heads": heads,
                        "kv_heads": kv_heads, "head_dim": head_dim,
                        "peak_fraction": PEAK_FRACTION, "min_tokens_per_device": int(round(c_min)),
                        "example_c": 8192,
                        "compute_ms_at_8192": fpl * head_dim * heads * 8192**2 / 2 / flops_s * 1e3,
                        "comm_ms_at_8192": 2 * 8192 * kv_heads * head_dim * bytes_per_elem / bw * 1e3})
    return out


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores (simulated devices share them)"


def markdown(mem: List[Dict], bal: List[Dict], est: List[Dict]) -> str:
    lines = ["# Context-parallel attention: memory plans, work balance, comm/compute estimate", "",
             f"Machine: {machine()}. Causal fwd+bwd, B={B} N={N} H={H} float32. Memory: XLA's compiled "
             "per-device plan (nothing executed). Simulated devices share the host cores: no timings.", "",
             "## Per-device memory plan (MiB) and kernel GFLOP per device", "",
             "| T | devices | kernel | temp | args | outputs | total | vs 1 device | GFLOP/device |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    one = {r["t"]: r["temp_mib"] + r["args_mib"] + r["out_mib"] for r in mem if r["devices"] == 1}
    for r in sorted(mem, key=lambda r: (r["t"], r["devices"])):
        total = r["temp_mib"] + r["args_mib"] + r["out_mib"]
        ratio = f"{total / one[r['t']]:.3f}" if r["t"] in one else "—"
        lines.append(f"| {r['t']} | {r['devices']} | {r['layout']} | {r['temp_mib']:.1f} | {r['args_mib']:.1f} | "
                     f"{r['out_mib']:.1f} | {total:.1f} | {ratio} | {r['gflop_per_device']:.1f} |")
    lines += ["", "## Work per device (computed logits per head, billions; block-plan counts)", "",
              "| T | devices | layout | per device | max / mean |", "|---:|---:|---|---|---:|"]
    for r in bal:
        per = ", ".join(f"{x:.3f}" for x in r["per_device_glogits"])
        lines.append(f"| {r['t']} | {r['devices']} | {r['layout']} | {per} | {r['max_over_mean']:.2f} |")
    lines += ["", "## Estimate for real hardware (not measured)", "",
              f"Per ring step of the zigzag layout, bf16, N=K={est[0]['heads']}, H={est[0]['head_dim']}, "
              f"compute at {PEAK_FRACTION:.0%} of dense peak. The transfer hides under compute when the "
              "local sequence is at least the length below.", "",
              "| hardware | link assumption | phase | compute ms (8k tokens/device) | send ms (8k) | "
              "min tokens/device to hide |", "|---|---|---|---:|---:|---:|"]
    for r in est:
        lines.append(f"| {r['hardware']} | {r['link']} | {r['phase']} | {r['compute_ms_at_8192']:.2f} | "
                     f"{r['comm_ms_at_8192']:.3f} | {r['min_tokens_per_device']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.lengths)))
        return
    mem = []
    for p in args.devices:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={p}")
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_context_parallel", "--worker", str(p),
                               "--lengths", *map(str, args.lengths)], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"error: the {p}-device worker failed:\n{proc.stderr[-3000:]}")
        mem += json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{p} device(s) done", flush=True)
    bal, est = balance(args.lengths, args.devices), estimate(args.devices)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "context_parallel.json"), "w") as f:
        json.dump({"machine": machine(), "memory": mem, "balance": bal, "estimate": est}, f, indent=1)
    text = markdown(mem, bal, est)
    with open(os.path.join(args.out, "context_parallel.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
