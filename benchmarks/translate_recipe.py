"""Chooses a finished translation run's test-time recipe on the validation split only.

Translation quality depends on choices made after training: which parameters
(the best validation checkpoint, or the mean of the newest K checkpoints) and
how to decode them (beam width, GNMT length penalty alpha). This script scores
each choice on the *validation* split of a finished ``train.py --model
translate`` workdir, never touching the test split, writes the table to a
report, and prints the ``train.py`` command that decodes the test split once
with the winner (a finished workdir only re-evaluates).

Two stages keep it cheap on a CPU: the parameter candidates are compared with
greedy decoding, then beam widths x alphas are compared on the chosen
parameters.

    python benchmarks/translate_recipe.py --workdir checkpoints/translate_en_de \
        --report benchmarks/results/translate/recipe_en-de.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from flax_attention.data import atomic
from flax_attention.training.checkpointing import Checkpointer
from flax_attention.training.inspector import load_run_config
from flax_attention.training.loop import create_train_state
from flax_attention.training.selection import average_params
from flax_attention.training.translate import evaluate_split


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--average", default="0,5,10", help="checkpoint counts to average; 0 = the best single one")
    ap.add_argument("--beams", default="4,5")
    ap.add_argument("--alphas", default="0.6,1.0")
    ap.add_argument("--report", default=None, help="markdown report (a .json twin is written beside it)")
    args = ap.parse_args(argv)

    task, configs = load_run_config(args.workdir)
    if task.name != "translate":
        raise SystemExit(f"{args.workdir} holds a {task.name!r} run; this chooses translation recipes.")
    extras = task.load_extras(args.workdir, configs)
    model, state = create_train_state(task, configs, extras)
    split = configs["data"].eval_split
    ckpt = Checkpointer(args.workdir, read_only=True)
    try:
        steps = sorted(ckpt.all_steps())
        candidates = {}
        for k in _ints(args.average):
            if k == 0:
                best = ckpt.best_step()
                candidates["best"] = (ckpt.restore(best, state)[0].params, f"best validation checkpoint (step {best})")
            elif k <= len(steps):
                chosen = steps[-k:]
                candidates[f"avg{k}"] = (average_params(ckpt, chosen, state),
                                         f"mean of the newest {k} checkpoints (steps {chosen[0]}..{chosen[-1]})")
            else:
                print(f"skipping average of {k}: only {len(steps)} checkpoints kept")
    finally:
        ckpt.close()

    rows = []

    def score(name, params, beam, alpha):
        cfg = dict(configs, decode=dataclasses.replace(configs["decode"], alpha=alpha))
        t0 = time.perf_counter()
        out = evaluate_split(model, params, cfg, extras, split, beam)
        row = {"params": name, "beam": beam, "alpha": alpha, "bleu": out["bleu"],
               "bleu_lc_tok": out["bleu_lc_tok"], "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return out["bleu"]

    # Stage 1: parameters, greedy (alpha does not act at beam 1).
    greedy = {name: score(name, p, 1, configs["decode"].alpha) for name, (p, _) in candidates.items()}
    chosen = max(greedy, key=greedy.get)
    # Stage 2: decoding, on the chosen parameters.
    decoded = {(b, a): score(chosen, candidates[chosen][0], b, a)
               for b in _ints(args.beams) for a in (float(x) for x in args.alphas.split(","))}
    beam, alpha = max(decoded, key=decoded.get)
    k = 0 if chosen == "best" else int(chosen[3:])
    result = {"workdir": str(args.workdir), "split": split, "rows": rows,
              "chosen": {"params": chosen, "what": candidates[chosen][1], "beam": beam, "alpha": alpha,
                         "validation_bleu": decoded[(beam, alpha)]},
              "test_command": f"python train.py --model translate --workdir {args.workdir} "
                              f"--average_checkpoints {k} --beam_size {beam} --alpha {alpha} (plus the run's own flags)"}
    print(f"chosen on {split}: {candidates[chosen][1]}, beam {beam}, alpha {alpha} "
          f"(BLEU {decoded[(beam, alpha)]:.2f})\ntest decode: {result['test_command']}")
    if args.report:
        lines = [f"# Translation recipe chosen on the {split} split", "",
                 f"Workdir `{args.workdir}`; the test split was not decoded by this script.", "",
                 "| parameters | beam | alpha | cased sacreBLEU | lowercased, tokenised | seconds |",
                 "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['params']} | {r['beam']} | {r['alpha']} | {r['bleu']:.2f} | {r['bleu_lc_tok']:.2f} | "
                  f"{r['seconds']} |" for r in rows]
        lines += ["", f"Chosen: {candidates[chosen][1]}, beam {beam}, alpha {alpha}.", ""]
        atomic.write_text(args.report, "\n".join(lines))
        atomic.write_text(Path(args.report).with_suffix(".json"), json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
