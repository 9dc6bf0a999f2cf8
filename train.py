"""Train, evaluate and inspect attention models (reference: BiGRU + attention on IMDB).

    python train.py                                   # reference config, 3 epochs
    python train.py --model bigru --num_epochs 5 --workdir /tmp/run
    python train.py --model transformer --workdir /tmp/tfm     # Transformer-encoder classifier
    python train.py --model seq2seq --task reverse              # encoder-decoder on a synthetic task
    python train.py --model seq2seq --help                      # its own flags
    python train.py visualize --workdir checkpoints/seq2seq_reverse   # attention heatmap PNGs
    python train.py visualize --workdir checkpoints/bigru --num_examples 5
    python train.py predict --workdir checkpoints/bigru "A wonderful, moving film."

Re-running the same command resumes from the latest checkpoint in --workdir
(same data order, same step). Data: TFDS ``imdb_reviews`` under TFDS_DATA_DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def create_train_state(task, configs, extras=None, steps_per_epoch: int = 1):
    """Model + optax TrainState (unreplicated) for the task's config.

    ``steps_per_epoch`` sets the horizon of a decaying learning-rate schedule
    (``num_epochs * steps_per_epoch``); inference-only callers may leave it.
    """
    import jax
    from flax_attention.training import create_train_state as _create

    model = task.build_model(configs, extras)
    tcfg = configs["train"]
    return model, _create(model, task.init_inputs(configs), tcfg, jax.random.PRNGKey(tcfg.seed),
                          total_steps=tcfg.num_epochs * steps_per_epoch)


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
    from flax_attention import distributed
    from flax_attention.training import MetricAccumulator, summarize

    acc = MetricAccumulator()
    for i, batch in enumerate(tqdm(data.eval_batches(batch_size), total=data.num_eval_batches(batch_size),
                                   desc=desc, leave=False, dynamic_ncols=True, disable=not distributed.is_primary())):
        # num_devices (global) was checked to divide batch_size; each process feeds its rows.
        acc.add(p_eval(rstate, distributed.local_batch(batch)))
        if (i + 1) % 10 == 0:
            acc.fetch()
    return summarize(acc.fetch())


# --------------------------------------------------------------------------- loop


def train_and_evaluate(task, configs: Dict[str, Any], workdir) -> Dict[str, float]:
    """Trains (resuming from the latest checkpoint in ``workdir``) and returns the final test metrics."""
    import jax
    from flax_attention import distributed
    from flax_attention.checkpointing import Checkpointer, check_or_write_config
    from flax_attention.training import DivergenceError, StopSignal, TrainConfig, check_writable_dir

    tcfg = configs["train"]
    eval_bs = tcfg.eval_batch_size or tcfg.batch_size
    distributed.check_global_batch(tcfg.batch_size, "--batch_size")
    distributed.check_global_batch(eval_bs, "--eval_batch_size")
    workdir, primary = Path(workdir), distributed.is_primary()
    config_json = configs_to_json(task.name, configs)
    resumable = [f"train.{k}" for k in tcfg.resumable_changes()]
    # Refuse an incompatible workdir before anything in it is touched.
    added = TrainConfig.added_fields()
    check_or_write_config(workdir, config_json, resumable, write=False, added_fields=added)
    if primary:  # process 0 writes and caches the vocabulary/data; the others then read its files
        check_writable_dir(workdir, "--workdir")
        data = input_pipeline(task, configs, workdir)
    distributed.barrier("flax_attention_data_ready")
    if not primary:
        data = input_pipeline(task, configs, workdir)
    model, state = create_train_state(task, configs, data.extras, data.steps_per_epoch(tcfg.batch_size))
    ckpt = Checkpointer(workdir, keep=tcfg.keep_checkpoints)
    try:
        with StopSignal() as stop:
            return _train_loop(task, configs, workdir, data, state, ckpt,
                               lambda: check_or_write_config(workdir, config_json, resumable, write=primary,
                                                             added_fields=added), stop)
    except DivergenceError as e:
        ckpt.wait()
        raise DivergenceError(f"{e}; stopped. The last good checkpoint (step {ckpt.latest_step()}) is kept in "
                              f"{workdir}. Lower --learning_rate and train in a fresh --workdir.") from None
    finally:
        ckpt.close()  # waits for an in-flight save


def _train_loop(task, configs, workdir: Path, data, state, ckpt, write_config, stop) -> Dict[str, float]:
    import jax
    from tqdm import tqdm
    from flax_attention import distributed
    from flax_attention.training import (MetricAccumulator, MetricsLog, StopRequested, check_finite_loss,
                                         replicate, save_if_finite, summarize, unreplicate)

    def stopped(step: int) -> StopRequested:
        ckpt.wait()
        return StopRequested(f"SIGTERM received: stopped after step {step} with a checkpoint of it in {workdir}; "
                             "rerun the same command to resume from there.")

    tcfg, primary = configs["train"], distributed.is_primary()
    eval_bs = tcfg.eval_batch_size or tcfg.batch_size
    epoch, start = 0, 0
    if ckpt.latest_step() is not None:  # the newest *complete* checkpoint; checks shapes first
        state, meta = ckpt.restore(ckpt.latest_step(), state)
        epoch, start = int(meta["next_epoch"]), int(meta["next_step"])
        if primary:
            print(f"Resuming from step {int(state.step)} (epoch {epoch + 1}, batch {start}) in {workdir}")
    write_config()  # only now: the workdir is known to fit this run
    log = MetricsLog(workdir / "metrics.jsonl", enabled=primary)
    log.truncate_after(int(state.step))
    p_train, p_eval = train_step(task), eval_step(task)
    rstate = replicate(state)
    spe = data.steps_per_epoch(tcfg.batch_size)
    if spe == 0:
        raise ValueError(f"--batch_size {tcfg.batch_size} exceeds the {len(data.train)} training examples.")
    n_dev = jax.device_count()
    if primary:
        print(f"{task.name}: {len(data.train)} train / {len(data.test)} test examples, {spe} steps/epoch, "
              f"{n_dev} device(s) [{jax.devices()[0].platform}] in {jax.process_count()} process(es), "
              f"global batch {tcfg.batch_size}")
    metrics: Dict[str, float] = {}
    for epoch in range(epoch, tcfg.num_epochs):
        t0, acc, shown = time.time(), MetricAccumulator(), start
        bar = tqdm(total=spe, initial=start, desc=f"epoch {epoch + 1}/{tcfg.num_epochs}", dynamic_ncols=True,
                   disable=not primary)
        for i, batch in enumerate(data.train_batches(tcfg.batch_size, tcfg.seed, epoch, start), start=start):
            rstate, sums = p_train(rstate, distributed.local_batch(batch))
            acc.add(sums)
            sync_point = (i + 1) % tcfg.log_every == 0 or i + 1 == spe
            if sync_point:  # regular syncs also avoid collective pile-ups
                m = summarize(acc.fetch())
                check_finite_loss(m["loss"], epoch * spe + i + 1)
                rate = m["examples"] / max(time.time() - t0, 1e-9)
                bar.update(i + 1 - shown)
                shown = i + 1
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.4f}", ex_s=f"{rate:.0f}")
                log(event="train", epoch=epoch + 1, step=int(epoch * spe + i + 1), loss=m["loss"],
                    accuracy=m["accuracy"], examples_per_sec=rate)
            periodic = tcfg.checkpoint_every and (epoch * spe + i + 1) % tcfg.checkpoint_every == 0
            stopping = i + 1 < spe and stop.requested(sync_point)  # at the epoch's end: after its evaluation
            if (periodic or stopping) and i + 1 < spe:
                save_if_finite(ckpt, epoch * spe + i + 1, rstate, {"next_epoch": epoch, "next_step": i + 1})
            if stopping:
                raise stopped(epoch * spe + i + 1)
        bar.close()
        train_m, train_time = summarize(acc.fetch()), time.time() - t0
        metrics = evaluate(p_eval, rstate, data, eval_bs, n_dev)
        save_if_finite(ckpt, (epoch + 1) * spe, rstate, {"next_epoch": epoch + 1, "next_step": 0, "accuracy": metrics["accuracy"]},
              metrics={"accuracy": metrics["accuracy"]})
        log(event="eval", epoch=epoch + 1, step=(epoch + 1) * spe, test_loss=metrics["loss"],
            test_accuracy=metrics["accuracy"], test_examples=metrics["examples"], train_loss=train_m.get("loss"),
            train_accuracy=train_m.get("accuracy"), epoch_seconds=train_time)
        if primary:
            print(f"epoch {epoch + 1}/{tcfg.num_epochs}: train loss {train_m.get('loss', float('nan')):.4f} "
                  f"acc {train_m.get('accuracy', float('nan')):.4f} ({train_time:.0f} s) | test loss "
                  f"{metrics['loss']:.4f} acc {metrics['accuracy']:.4f} ({int(metrics['examples'])} reviews)")
        start = 0
        if epoch + 1 < tcfg.num_epochs and stop.requested():
            raise stopped((epoch + 1) * spe)
    if not metrics:  # nothing left to train: evaluate the restored state
        metrics = evaluate(p_eval, rstate, data, eval_bs, n_dev)
    ckpt.wait()
    if primary:
        print(f"Final test accuracy: {metrics['accuracy']:.4f} on all {int(metrics['examples'])} test reviews "
              f"(step {int(unreplicate(rstate).step)}, checkpoints in {workdir})")
    return metrics


# --------------------------------------------------------------------------- inspection


def load_for_inference(workdir):
    """``(task, configs, model, params, extras)`` from a workdir's best checkpoint."""
    from flax_attention.checkpointing import Checkpointer, load_config
    from flax_attention.tasks import get_task
    from flax_attention.training import TrainConfig

    saved = load_config(workdir, TrainConfig.added_fields())
    if saved.get("model_name") == SEQ2SEQ:
        raise ValueError(f"{workdir} holds a seq2seq run: `predict` classifies reviews with an IMDB model; "
                         f"use `train.py visualize --workdir {workdir}` for its decoded examples and heatmaps.")
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

    from flax_attention.data.imdb import tokenize

    if not texts or any(not t.strip() for t in texts):
        raise ValueError('give at least one non-empty review text, e.g. predict --workdir W "Great film!"')
    wordless = [i + 1 for i, t in enumerate(texts) if not tokenize(t)]
    if wordless:
        raise ValueError(f"text {wordless[0]} has no words to classify (only digits/punctuation: {texts[wordless[0] - 1][:40]!r}); "
                         "pass review text, e.g. \"A wonderful film\".")
    task, configs, model, params, extras = load_for_inference(workdir)
    results = task.predict(model, params, configs, extras, list(texts))
    for r in results:
        print(visualize.format_words(r))
    if html_path:
        blocks = [visualize.review_block(r, title=f"input {i + 1}") for i, r in enumerate(results)]
        print(f"wrote {visualize.write_page(html_path, blocks)}")
    return results


def visualize_test(workdir, num_examples: int, seed: int, html_path: Optional[str]) -> Path:
    """Writes an HTML page for ``num_examples`` random test reviews (seq2seq workdirs: heatmap PNGs)."""
    from flax_attention import visualize
    from flax_attention.checkpointing import load_config
    from flax_attention.data.imdb import load_split

    if load_config(workdir).get("model_name") == SEQ2SEQ:
        from flax_attention.heatmaps import heatmaps_from_workdir
        paths = heatmaps_from_workdir(workdir, num_examples, seed, html_path)
        print(f"wrote {len(paths)} PNGs to {paths[0].parents[1]}")
        return paths[0].parents[1]
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


SEQ2SEQ = "seq2seq"


def _without_model_flag(argv: List[str]) -> List[str]:
    """``argv`` minus ``--model seq2seq`` / ``--model=seq2seq`` (the seq2seq trainer has no --model)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--model" and i + 1 < len(argv):
            skip = True
        elif not a.startswith("--model="):
            out.append(a)
    return out


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
            p.add_argument("--html", default=None, help="output page (default: WORKDIR/attention.html); for a "
                           "seq2seq workdir, the folder of the heatmap PNGs (default: WORKDIR/heatmaps)")
        return argv[0], p.parse_args(argv[1:]), None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="bigru")
    model = pre.parse_known_args(argv)[0].model
    if model == SEQ2SEQ:  # its own trainer and flags (flax_attention.seq2seq_train), no IMDB pipeline
        return SEQ2SEQ, _without_model_flag(argv), None
    task = get_task(model)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bigru", choices=sorted([*REGISTRY, SEQ2SEQ]),
                   help="bigru: BiGRU + additive attention (IMDB); transformer: Transformer-encoder "
                        "classifier (IMDB); seq2seq: encoder-decoder Transformer on a synthetic --task "
                        "(copy/reverse/sort/dedup/add; `train.py --model seq2seq --help` lists its flags)")
    p.add_argument("--workdir", default=None, help="checkpoints, vocab, metrics (default: checkpoints/<model>)")
    g = p.add_argument_group("multi-process (one process per host; see flax_attention.distributed)")
    g.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (or $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num_processes", type=int, default=None, help="total processes (or $JAX_NUM_PROCESSES)")
    g.add_argument("--process_id", type=int, default=None, help="this process, 0..n-1 (or $JAX_PROCESS_ID)")
    add_config_flags(p, config_sections(task))
    args = p.parse_args(argv)
    args.workdir = args.workdir or str(Path("checkpoints") / model)
    return "train", args, task


def main(argv: Optional[Sequence[str]] = None) -> int:
    from flax_attention.checkpointing import IncompatibleWorkdirError
    from flax_attention.data.imdb import DataUnavailableError
    from flax_attention.training import DivergenceError, StopRequested, maybe_initialize_distributed

    try:
        command, args, task = parse_args(sys.argv[1:] if argv is None else argv)
        if command == SEQ2SEQ:
            from flax_attention.seq2seq_train import main as seq2seq_main
            return seq2seq_main(args, prog="train.py --model seq2seq")
        if command == "predict":
            predict(args.workdir, args.texts, args.html)
        elif command == "visualize":
            visualize_test(args.workdir, args.num_examples, args.seed, args.html)
        else:
            configs = build_configs(task, args)  # bad values fail before processes connect
            maybe_initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
            train_and_evaluate(task, configs, args.workdir)
    except (ValueError, FileNotFoundError, DataUnavailableError, IncompatibleWorkdirError) as e:
        return _fail(str(e), 2)
    except DivergenceError as e:
        return _fail(str(e), 3)
    except OSError as e:  # disk full, permissions, ...: one line naming the file
        return _fail(f"{type(e).__name__}: {e}", 2)
    except StopRequested as e:  # 128 + SIGTERM, what a scheduler expects from a preempted job
        return _fail(str(e), 143, prefix="stopped")
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume from the last checkpoint.", 130)
    return 0


def _fail(message: str, code: int, prefix: str = "error") -> int:
    """One ``error:`` line on stderr (after closing progress bars) and the exit code."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(f"{prefix}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
