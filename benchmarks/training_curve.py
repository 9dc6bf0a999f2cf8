"""A training run's curve from its ``metrics.jsonl``: training loss per logging window, evaluations, test.

    python -m benchmarks.training_curve checkpoints/lm/metrics.jsonl benchmarks/results/lm/curve.png \
        --title "IMDB language model"

The x axis is the optimizer step. The left panel is the training loss as
``metrics.jsonl`` records it (the running mean since the epoch started, or
since a resume: so it lags the current loss) with every ``eval`` record's
loss on the same axis; the right panel is the same in
perplexity (``exp(loss)``, per token for ``--model lm``) on a log scale, with
the single ``test`` record (if any) as a marker at its selected step. Nothing
is smoothed or dropped.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List


def read_records(path) -> List[Dict]:
    """The JSON records of a ``metrics.jsonl`` (one per line; a half-written last line is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves at most its last line partial
            continue
    return records


def plot(records: List[Dict], out, title: str) -> None:
    """Writes the two-panel PNG ``out`` from ``records``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    tests = [r for r in records if r.get("event") == "test"]
    if not train:
        raise ValueError("no 'train' records to plot; give the metrics.jsonl of a run that logged training steps.")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, f, ylabel in ((left, lambda x: x, "loss (nats)"), (right, math.exp, "perplexity")):
        ax.plot([r["step"] for r in train], [f(r["loss"]) for r in train], lw=1, label="training (running mean over the epoch)")
        if evals:
            ax.plot([r["step"] for r in evals], [f(r["test_loss"]) for r in evals], "o-", label="validation")
        for r in tests[-1:]:
            ax.plot([r["selected_step"]], [f(r["test_loss"])], "s", color="black", label="test (once)")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", help="a workdir's metrics.jsonl")
    p.add_argument("out", help="PNG to write")
    p.add_argument("--title", default="training run")
    args = p.parse_args(argv)
    plot(read_records(args.metrics), args.out, args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
