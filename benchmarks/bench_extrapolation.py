"""Length extrapolation of the position schemes on the synthetic ``reverse`` task.

Run from the repository root::

    python -m benchmarks.bench_extrapolation               # writes benchmarks/results/extrapolation.{json,md}
    python -m benchmarks.bench_extrapolation --steps 50 --out /tmp/extra   # smoke run

The small Transformer of ``train.py --model seq2seq`` is trained on sources of length
1-20 with each ``TransformerConfig.position`` (sinusoidal, RoPE, ALiBi) and
decoded greedily on lengths 1-40; the table reports exact match (the whole
reversed sequence right) at the training lengths and on the unseen 21-30 and
31-40. One seed per variant (CPU budget), so differences of a few points are
noise. Variants run one after the other; results are saved after each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

VARIANTS = ("sinusoidal", "rope", "alibi")


def train_variant(position: str, steps: int, seed: int):
    """Trains one variant through the one trainer; returns ``(exact_by_length {n: float}, seconds)``.

    Same settings as ``train.py --model seq2seq --task reverse --test_max_len 40 --position P``
    (epochs of 250 steps), in a throw-away workdir.
    """
    import dataclasses
    import tempfile

    from flax_attention.training.config import TrainConfig
    from flax_attention.training.loop import train_and_evaluate
    from flax_attention.training.seq2seq import SEQ2SEQ, DecodeConfig, Seq2SeqModelConfig, SyntheticConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    train = TrainConfig(**{**{k: v for k, v in SEQ2SEQ.flag_defaults.items() if k in names},
                           "num_epochs": max(1, steps // min(250, steps)), "seed": seed})
    configs = {"model": Seq2SeqModelConfig(position=position),
               "data": SyntheticConfig(task="reverse", max_len=20, test_max_len=40, steps_per_epoch=min(250, steps)),
               "decode": DecodeConfig(),
               "train": train}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        metrics = train_and_evaluate(SEQ2SEQ, configs, workdir)
    exact = {int(k[len("exact_len"):]): float(v) for k, v in metrics.items() if k.startswith("exact_len")}
    return exact, time.perf_counter() - start


def _mean(exact, lo, hi):
    vals = [exact[n] for n in range(lo, hi + 1) if n in exact]
    return sum(vals) / len(vals) if vals else float("nan")


def write_markdown(results, path, steps):
    """``results``: ``{label: {"exact_by_length", "seconds"[, "steps"]}}``."""
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Length extrapolation: sinusoidal vs RoPE vs ALiBi (reverse task)",
        "",
        f"`python -m benchmarks.bench_extrapolation` — small Transformer (E=64, N=4, F=256, 2+2 layers), "
        f"{steps} steps (unless the row says otherwise), batch 64, trained on lengths 1-20, greedy "
        "decoding, 20 examples per length, "
        "one seed per variant. Machine: 2-core AMD EPYC VM, shared with other jobs while this ran "
        f"(so the seconds are loaded wall-clock; {cpu}).",
        "",
        "| position | exact 1-20 (train) | exact 21-30 | exact 31-40 | seconds |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        e = r["exact_by_length"]
        lines.append(f"| {name} | {_mean(e, 1, 20):.3f} | {_mean(e, 21, 30):.3f} | {_mean(e, 31, 40):.3f} "
                     f"| {r['seconds']:.0f} |")
    lines += ["", "Exact match by length:", "", "| n | " + " | ".join(results) + " |",
              "|---|" + "---|" * len(results)]
    for n in range(1, 41):
        lines.append(f"| {n} | " + " | ".join(f"{r['exact_by_length'].get(n, float('nan')):.2f}"
                                              for r in results.values()) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated positions, each optionally with its own steps: alibi:4000")
    p.add_argument("--out", default="benchmarks/results/extrapolation")
    p.add_argument("--add-to", action="store_true", help="append to the results already in --out.json")
    args = p.parse_args()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    results = {}
    if args.add_to and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            results = {k: {**v, "exact_by_length": {int(n): x for n, x in v["exact_by_length"].items()}}
                       for k, v in json.load(f)["results"].items()}
    for spec in args.variants.split(","):
        name, _, steps = spec.partition(":")
        steps = int(steps) if steps else args.steps
        exact, seconds = train_variant(name, steps, args.seed)
        label = name if steps == args.steps else f"{name} ({steps} steps)"
        results[label] = {"exact_by_length": exact, "seconds": seconds, "steps": steps}
        with open(args.out + ".json", "w") as f:
            json.dump({"steps": args.steps, "seed": args.seed, "results": results}, f, indent=1)
        write_markdown(results, args.out + ".md", args.steps)
        print(f"{name}: train {_mean(exact, 1, 20):.3f}  21-30 {_mean(exact, 21, 30):.3f}  "
              f"31-40 {_mean(exact, 31, 40):.3f}  ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
