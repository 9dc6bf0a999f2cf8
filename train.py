"""Train, evaluate and inspect attention models (reference: BiGRU + attention on IMDB).

    python train.py                                   # reference config, 3 epochs
    python train.py --model bigru --num_epochs 5 --workdir /tmp/run
    python train.py visualize --workdir checkpoints/bigru --num_examples 5
    python train.py predict --workdir checkpoints/bigru "A wonderful, moving film."

Re-running the same command resumes from the latest checkpoint in --workdir
(same data order, same step). Data: TFDS ``imdb_reviews`` under TFDS_DATA_DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

# --------------------------------------------------------------------------- config


def _field_docs(cls) -> Dict[str, str]:
    """``name: text`` entries of a dataclass docstring's Attributes section."""
    docs, current = {}, None
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"\s+(\w+): (.*)", line)
        if m:
            current = m.group(1)
            docs[current] = m.group(2).strip()
        elif current and line.strip() and line.startswith(" " * 8):
            docs[current] += " " + line.strip()
    return docs


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def config_sections(task) -> Dict[str, type]:
    from flax_attention.training import TrainConfig
    return {**task.config_classes, "train": TrainConfig}


def add_config_flags(parser: argparse.ArgumentParser, sections: Dict[str, type]) -> None:
    """One ``--flag`` per dataclass field; a name shared by sections is one flag."""
    seen = set()
    for section, cls in sections.items():
        group = parser.add_argument_group(f"{section} ({cls.__name__})")
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            typ = _parse_bool if isinstance(f.default, bool) else type(f.default)
            group.add_argument(f"--{f.name}", type=typ, default=f.default,
                               help=f"{docs.get(f.name, '')} (default: {f.default})")


def build_configs(task, args: argparse.Namespace) -> Dict[str, Any]:
    """Frozen config dataclass per section, from parsed flags (shared names feed all)."""
    return {s: cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
            for s, cls in config_sections(task).items()}


def configs_to_json(model: str, configs: Dict[str, Any]) -> Dict[str, Any]:
    return {"model_name": model, **{s: dataclasses.asdict(c) for s, c in configs.items()}}


def configs_from_json(task, saved: Dict[str, Any]) -> Dict[str, Any]:
    return {s: cls(**saved[s]) for s, cls in config_sections(task).items()}


# --------------------------------------------------------------------------- input pipeline


def input_pipeline(task, configs, workdir):
    """Vocabulary + encoded splits (cached in the workdir); see flax_attention.data.imdb."""
    return task.prepare(workdir, configs)


# --------------------------------------------------------------------------- steps


def create_train_state(task, configs, extras=None):
    """Model + optax TrainState (unreplicated) for the task's config."""
    import jax
    from flax_attention.training import create_train_state as _create

    model = task.build_model(configs, extras)
    tcfg = configs["train"]
    return model, _create(model, task.init_inputs(configs), tcfg, jax.random.PRNGKey(tcfg.seed))


def train_step(task):
    """pmapped training step (grads summed over devices; see flax_attention.training)."""
    from flax_attention.training import make_train_step
    return make_train_step(task.loss_and_metrics)


def eval_step(task):
    """pmapped evaluation step returning weighted metric sums over all devices."""
    from flax_attention.training import make_eval_step
    return make_eval_step(task.loss_and_metrics)


def evaluate(p_eval, rstate, data, batch_size: int, num_devices: int, desc: str = "eval") -> Dict[str, float]:
    """Full test-set metrics; every example counted exactly once (padding has weight 0)."""
    from tqdm import tqdm
    from flax_attention.data.imdb import shard
    from flax_attention.training import MetricAccumulator, summarize

    acc = MetricAccumulator()
    for i, batch in enumerate(tqdm(data.eval_batches(batch_size), total=data.num_eval_batches(batch_size),
                                   desc=desc, leave=False, dynamic_ncols=True)):
        acc.add(p_eval(rstate, shard(batch, num_devices)))
        if (i + 1) % 10 == 0:
            acc.fetch()
    return summarize(acc.fetch())


# --------------------------------------------------------------------------- loop


class _Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, **record) -> None:
        record["time"] = time.time()
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train_and_evaluate(task, configs: Dict[str, Any], workdir) -> Dict[str, float]:
    """Trains (resuming from the latest checkpoint in ``workdir``) and returns the final test metrics."""
    import jax
    from tqdm import tqdm
    from flax_attention.checkpointing import Checkpointer, check_or_write_config
    from flax_attention.data.imdb import shard
    from flax_attention.training import MetricAccumulator, TrainConfig, replicate, summarize, unreplicate

    tcfg = configs["train"]
    n_dev = jax.local_device_count()
    eval_bs = tcfg.eval_batch_size or tcfg.batch_size
    for name, b in (("--batch_size", tcfg.batch_size), ("--eval_batch_size", eval_bs)):
        if b % n_dev:
            raise ValueError(f"{name} {b} is not divisible by the {n_dev} local devices; use a multiple of {n_dev}.")
    workdir = Path(workdir)
    check_or_write_config(workdir, configs_to_json(task.name, configs),
                          resumable=[f"train.{k}" for k in TrainConfig.RESUMABLE_CHANGES])
    data = input_pipeline(task, configs, workdir)
    model, state = create_train_state(task, configs, data.extras)
    ckpt = Checkpointer(workdir, keep=tcfg.keep_checkpoints)
    epoch, start = 0, 0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(ckpt.latest_step(), state)
        epoch, start = int(meta["next_epoch"]), int(meta["next_step"])
        print(f"Resuming from step {int(state.step)} (epoch {epoch + 1}, batch {start}) in {workdir}")
    log = _Log(workdir / "metrics.jsonl")
    p_train, p_eval = train_step(task), eval_step(task)
    rstate = replicate(state)
    spe = data.steps_per_epoch(tcfg.batch_size)
    if spe == 0:
        raise ValueError(f"--batch_size {tcfg.batch_size} exceeds the {len(data.train)} training examples.")
    print(f"{task.name}: {len(data.train)} train / {len(data.test)} test examples, {spe} steps/epoch, "
          f"{n_dev} device(s) [{jax.devices()[0].platform}], global batch {tcfg.batch_size}")
    metrics: Dict[str, float] = {}
    for epoch in range(epoch, tcfg.num_epochs):
        t0, acc, shown = time.time(), MetricAccumulator(), start
        bar = tqdm(total=spe, initial=start, desc=f"epoch {epoch + 1}/{tcfg.num_epochs}", dynamic_ncols=True)
        for i, batch in enumerate(data.train_batches(tcfg.batch_size, tcfg.seed, epoch, start), start=start):
            rstate, sums = p_train(rstate, shard(batch, n_dev))
            acc.add(sums)
            if (i + 1) % tcfg.log_every == 0 or i + 1 == spe:  # regular syncs also avoid collective pile-ups
                m = summarize(acc.fetch())
                rate = m["examples"] / max(time.time() - t0, 1e-9)
                bar.update(i + 1 - shown)
                shown = i + 1
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.4f}", ex_s=f"{rate:.0f}")
                log(event="train", epoch=epoch + 1, step=int(epoch * spe + i + 1), loss=m["loss"],
                    accuracy=m["accuracy"], examples_per_sec=rate)
            if tcfg.checkpoint_every and (epoch * spe + i + 1) % tcfg.checkpoint_every == 0 and i + 1 < spe:
                ckpt.save(epoch * spe + i + 1, unreplicate(rstate), {"next_epoch": epoch, "next_step": i + 1})
        bar.close()
        train_m, train_time = summarize(acc.fetch()), time.time() - t0
        metrics = evaluate(p_eval, rstate, data, eval_bs, n_dev)
        ckpt.save((epoch + 1) * spe, unreplicate(rstate),
                  {"next_epoch": epoch + 1, "next_step": 0, "accuracy": metrics["accuracy"]},
                  metrics={"accuracy": metrics["accuracy"]})
        log(event="eval", epoch=epoch + 1, step=(epoch + 1) * spe, test_loss=metrics["loss"],
            test_accuracy=metrics["accuracy"], test_examples=metrics["examples"], train_loss=train_m.get("loss"),
            train_accuracy=train_m.get("accuracy"), epoch_seconds=train_time)
        print(f"epoch {epoch + 1}/{tcfg.num_epochs}: train loss {train_m.get('loss', float('nan')):.4f} "
              f"acc {train_m.get('accuracy', float('nan')):.4f} ({train_time:.0f} s) | test loss "
              f"{metrics['loss']:.4f} acc {metrics['accuracy']:.4f} ({int(metrics['examples'])} reviews)")
        start = 0
    if not metrics:  # nothing left to train: evaluate the restored state
        metrics = evaluate(p_eval, rstate, data, eval_bs, n_dev)
    ckpt.close()
    print(f"Final test accuracy: {metrics['accuracy']:.4f} on all {int(metrics['examples'])} test reviews "
          f"(step {int(unreplicate(rstate).step)}, checkpoints in {workdir})")
    return metrics


# --------------------------------------------------------------------------- inspection


def load_for_inference(workdir):
    """``(task, configs, model, params, extras)`` from a workdir's best checkpoint."""
    from flax_attention.checkpointing import Checkpointer, load_config
    from flax_attention.tasks import get_task

    saved = load_config(workdir)
    task = get_task(saved["model_name"])
    configs = configs_from_json(task, saved)
    extras = task.load_extras(workdir, configs)
    model, state = create_train_state(task, configs, extras)
    ckpt = Checkpointer(workdir, read_only=True)
    step = ckpt.best_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first.")
    state, _ = ckpt.restore(step, state)
    return task, configs, model, state.params, extras


def predict(workdir, texts: Sequence[str], html_path: Optional[str] = None) -> List[Dict[str, Any]]:
    """Classifies raw texts; prints the prediction and top-weighted words."""
    from flax_attention import visualize

    if not texts or any(not t.strip() for t in texts):
        raise ValueError('give at least one non-empty review text, e.g. predict --workdir W "Great film!"')
    task, configs, model, params, extras = load_for_inference(workdir)
    results = task.predict(model, params, configs, extras, list(texts))
    for r in results:
        print(visualize.format_words(r))
    if html_path:
        blocks = [visualize.review_block(r, title=f"input {i + 1}") for i, r in enumerate(results)]
        print(f"wrote {visualize.write_page(html_path, blocks)}")
    return results


def visualize_test(workdir, num_examples: int, seed: int, html_path: Optional[str]) -> Path:
    """Writes an HTML page for ``num_examples`` random test reviews."""
    from flax_attention import visualize
    from flax_attention.data.imdb import load_split

    if num_examples < 1:
        raise ValueError(f"--num_examples must be >= 1, got {num_examples}.")
    task, configs, model, params, extras = load_for_inference(workdir)
    texts, labels = load_split("test")
    idx = np.random.default_rng(seed).choice(len(texts), size=min(num_examples, len(texts)), replace=False)
    chosen = [texts[i].decode("utf-8", "replace") if isinstance(texts[i], bytes) else str(texts[i]) for i in idx]
    results = task.predict(model, params, configs, extras, chosen)
    names = ["negative", "positive"]
    blocks = [visualize.review_block(r, names[int(labels[i])], title=f"test review #{i}")
              for r, i in zip(results, idx)]
    path = visualize.write_page(html_path or Path(workdir) / "attention.html", blocks)
    print(f"wrote {path}")
    return path


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]):
    from flax_attention.tasks import REGISTRY, get_task

    argv = list(argv)
    if argv and argv[0] in ("predict", "visualize"):
        p = argparse.ArgumentParser(prog=f"train.py {argv[0]}")
        p.add_argument("--workdir", required=True, help="directory written by `train.py`")
        if argv[0] == "predict":
            p.add_argument("texts", nargs="+", help="review text(s) to classify")
            p.add_argument("--html", default=None, help="also write an HTML page here")
        else:
            p.add_argument("--num_examples", type=int, default=5, help="random test reviews to show")
            p.add_argument("--seed", type=int, default=0, help="picks the reviews")
            p.add_argument("--html", default=None, help="output page (default: WORKDIR/attention.html)")
        return argv[0], p.parse_args(argv[1:]), None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="bigru")
    model = pre.parse_known_args(argv)[0].model
    task = get_task(model)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bigru", choices=sorted(REGISTRY), help="model/task to train")
    p.add_argument("--workdir", default=None, help="checkpoints, vocab, metrics (default: checkpoints/<model>)")
    add_config_flags(p, config_sections(task))
    args = p.parse_args(argv)
    args.workdir = args.workdir or str(Path("checkpoints") / model)
    return "train", args, task


def main(argv: Optional[Sequence[str]] = None) -> int:
    from flax_attention.checkpointing import IncompatibleWorkdirError
    from flax_attention.data.imdb import DataUnavailableError
    from flax_attention.training import maybe_initialize_distributed

    try:
        command, args, task = parse_args(sys.argv[1:] if argv is None else argv)
        if command == "predict":
            predict(args.workdir, args.texts, args.html)
        elif command == "visualize":
            visualize_test(args.workdir, args.num_examples, args.seed, args.html)
        else:
            maybe_initialize_distributed()
            train_and_evaluate(task, build_configs(task, args), args.workdir)
    except (ValueError, FileNotFoundError, DataUnavailableError, IncompatibleWorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
