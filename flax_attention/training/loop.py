"""The one training loop for every ``--model``: input pipeline, state, steps, evaluation, checkpoints.

``train_and_evaluate(task, configs, workdir)`` trains (resuming from the newest
complete checkpoint in ``workdir``), evaluates after every epoch (the task's
teacher-forced metrics, then its decoding metrics such as BLEU), checkpoints
(the newest ``keep_checkpoints`` plus the best by ``task.selection_metric``),
logs to ``metrics.jsonl`` and TensorBoard, stops cleanly on SIGTERM and on a
non-finite loss. The task (:mod:`flax_attention.training.tasks`) supplies
everything model- and data-specific; the placement
(:mod:`flax_attention.training.placement`) where state and batches live:
``pmap`` replicas by default, a ``jit`` mesh with ``--mesh``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import jax

from flax_attention.training import distributed
from flax_attention.training.bookkeeping import (DivergenceError, MetricsLog, StopRequested, StopSignal,
                                                 check_finite_loss, check_writable_dir, save_if_finite)
from flax_attention.training.checkpointing import Checkpointer, check_or_write_config, load_config
from flax_attention.training.config import TrainConfig, configs_to_json
from flax_attention.training.placement import PmapPlacement, make_placement
from flax_attention.training.selection import final_test
from flax_attention.training.steps import (MetricAccumulator, create_train_state as _create_state,
                                           learning_rate_schedule, make_eval_step, make_train_step, summarize)


def input_pipeline(task, configs, workdir):
    """The task's prepared data (vocabulary and caches live in the workdir)."""
    return task.prepare(workdir, configs)


def create_train_state(task, configs, extras=None, steps_per_epoch: int = 1):
    """``(model, TrainState)`` (unreplicated) for the task's config.

    ``steps_per_epoch`` sets the horizon of a decaying learning-rate schedule
    (``num_epochs * steps_per_epoch``); inference-only callers may leave it.
    """
    model = task.build_model(configs, extras)
    tcfg = configs["train"]
    wrap = task.optimizer(configs) if task.optimizer is not None else None
    # Inference callers do not know the run's length; any horizon past the warm-up gives a valid schedule
    # (optax's cosine needs one) and the same optimizer-state structure to restore into.
    total = max(tcfg.num_epochs * steps_per_epoch, tcfg.warmup_steps + 1)
    return model, _create_state(model, task.init_inputs(configs), tcfg, jax.random.PRNGKey(tcfg.seed),
                                total_steps=total, wrap_optimizer=wrap)


def check_inputs(task, configs, resuming: bool = False) -> None:
    """Every check that needs no data, before anything is written: the model and the task's input files.

    Builds the model and traces its initialisation abstractly (``jax.eval_shape``:
    no arrays, no compute), so an impossible model (e.g. ``d_model`` not
    divisible by ``num_heads``) fails before a workdir exists; then the task's
    own ``preflight`` (e.g. the ``--embeddings`` file's format), which only a
    fresh run needs (``resuming``: the files were read at step 0).
    """
    if configs["train"].average_checkpoints and task.test_eval is None:
        raise ValueError(f"--average_checkpoints applies to models with a final test split (translate, lm); "
                         f"--model {task.name} evaluates every epoch on its own: leave it at 0.")
    model = task.build_model(configs, None)
    try:
        jax.eval_shape(lambda k: model.init(k, *task.init_inputs(configs)), jax.random.PRNGKey(0))
    except (TypeError, AssertionError) as e:  # flax/jax shape errors: name the problem, not a stack
        raise ValueError(f"the model flags describe no buildable model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); check the model section of --help.") from None
    if task.preflight is not None and not resuming:
        task.preflight(configs)


def train_step(task, configs):
    """pmapped training step (grads summed over devices; see :mod:`flax_attention.training.steps`)."""
    return make_train_step(task.loss_fn(configs))


def eval_step(task, configs):
    """pmapped evaluation step returning weighted metric sums over all devices."""
    return make_eval_step(task.loss_fn(configs))


def evaluate(p_eval, rstate, data, batch_size: int, desc: str = "eval", placement=None) -> Dict[str, float]:
    """Teacher-forced metrics on the whole evaluation split; every example counted exactly once."""
    from tqdm import tqdm

    placement, acc = placement or PmapPlacement(), MetricAccumulator()
    for i, batch in enumerate(tqdm(data.eval_batches(batch_size), total=data.num_eval_batches(batch_size),
                                   desc=desc, leave=False, dynamic_ncols=True, disable=not distributed.is_primary())):
        # The placement checked that batch_size splits evenly; each process feeds its rows.
        acc.add(p_eval(rstate, placement.batch(batch)))
        if (i + 1) % 10 == 0:
            acc.fetch()
    return summarize(acc.fetch())


def full_evaluation(task, configs, model, p_eval, rstate, data, workdir, step: int, final: bool,
                    placement=None) -> Dict[str, Any]:
    """Teacher-forced metrics, then the task's decoding metrics (BLEU, exact match) if it has any."""
    tcfg, placement = configs["train"], placement or PmapPlacement()
    metrics: Dict[str, Any] = evaluate(p_eval, rstate, data, tcfg.eval_batch_size or tcfg.batch_size,
                                       placement=placement)
    if task.eval_metrics is not None:  # e.g. perplexities from the mean loss
        metrics.update(task.eval_metrics(metrics))
    if task.decode_eval is not None:
        metrics.update(task.decode_eval(model, placement.params(rstate), configs, data, workdir, step, final))
    return metrics


def check_not_legacy(saved: Dict[str, Any], workdir) -> None:
    """Raises ValueError for a ``config.json`` written by the old ``seq2seq_train`` program."""
    if saved.get("model_name") == "seq2seq" and "task" in saved and "data" not in saved:
        raise ValueError(f"{workdir} was written by the retired separate seq2seq trainer (config sections "
                         f"task/model/train; its checkpoints hold a different TrainState); it cannot be resumed "
                         "or inspected by the one trainer. Nothing in it was changed: retrain in a fresh "
                         "--workdir, e.g. `python train.py --model seq2seq --task reverse --workdir NEW`.")


def train_and_evaluate(task, configs: Mapping[str, Any], workdir, mesh: Optional[str] = None) -> Dict[str, Any]:
    """Trains (resuming from the latest checkpoint in ``workdir``) and returns the final evaluation metrics.

    Args:
      mesh: ``None`` trains with ``jax.pmap``; ``"data=D,fsdp=F,seq=S"``
        (see :mod:`flax_attention.training.mesh`) with ``jax.jit`` on that mesh.
    """
    tcfg, placement = configs["train"], make_placement(mesh)
    placement.check_batch(tcfg.batch_size, "--batch_size")
    placement.check_batch(tcfg.eval_batch_size or tcfg.batch_size, "--eval_batch_size")
    workdir, primary = Path(workdir), distributed.is_primary()
    config_json = configs_to_json(task.name, configs)
    resumable = [f"train.{k}" for k in tcfg.resumable_changes()] + list(task.resumable)
    # Refuse an incompatible workdir before anything in it is touched.
    if (workdir / "config.json").exists():
        check_not_legacy(load_config(workdir), workdir)
    added = {**TrainConfig.added_fields(), **task.added_fields}
    check_or_write_config(workdir, config_json, resumable, write=False, added_fields=added)
    resuming = any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*"))
    check_inputs(task, configs, resuming)  # flags and input files, before the workdir is created
    placement.check_model(task.build_model(configs, None))  # e.g. seq=S needs Transformer attention
    if primary:  # process 0 writes and caches the vocabulary/data; the others then read its files
        created = not workdir.exists()
        check_writable_dir(workdir, "--workdir")
        try:
            data = input_pipeline(task, configs, workdir)
        except BaseException:
            if created and not any(workdir.iterdir()):  # e.g. data unavailable: leave no empty workdir
                workdir.rmdir()
            raise
    distributed.barrier("flax_attention_data_ready")
    if not primary:
        data = input_pipeline(task, configs, workdir)
    if data.steps_per_epoch(tcfg.batch_size) == 0:  # before config.json: a corrected rerun must be accepted
        raise ValueError(f"--batch_size {tcfg.batch_size} exceeds the {len(data.train)} training examples.")
    total_steps = tcfg.num_epochs * data.steps_per_epoch(tcfg.batch_size)
    if tcfg.lr_schedule == "cosine" and tcfg.warmup_steps >= total_steps:
        raise ValueError(f"--warmup_steps {tcfg.warmup_steps} leaves the cosine schedule no steps to decay over: "
                         f"the run has {total_steps} steps (--num_epochs x steps per epoch); lower --warmup_steps "
                         "or train longer.")
    model = task.build_model(configs, data.extras)
    wrap = task.optimizer(configs) if task.optimizer is not None else None
    state = placement.create_state(model, task.init_inputs(configs), tcfg, jax.random.PRNGKey(tcfg.seed),
                                   tcfg.num_epochs * data.steps_per_epoch(tcfg.batch_size), wrap)
    ckpt = Checkpointer(workdir, keep=tcfg.keep_checkpoints)
    try:
        with StopSignal() as stop:
            return _train_loop(task, configs, workdir, data, model, state, ckpt,
                               lambda: check_or_write_config(workdir, config_json, resumable, write=primary,
                                                             added_fields=added), stop, placement)
    except DivergenceError as e:
        ckpt.wait()
        raise DivergenceError(f"{e}; stopped. The last good checkpoint (step {ckpt.latest_step()}) is kept in "
                              f"{workdir}. Lower --learning_rate and train in a fresh --workdir.") from None
    finally:
        ckpt.close()  # waits for an in-flight save


def _train_loop(task, configs, workdir: Path, data, model, rstate, ckpt, write_config, stop,
                placement) -> Dict[str, Any]:
    from tqdm import tqdm

    def stopped(step: int) -> StopRequested:
        ckpt.wait()
        return StopRequested(f"SIGTERM received: stopped after step {step} with a checkpoint of it in {workdir}; "
                             "rerun the same command to resume from there.")

    tcfg, primary = configs["train"], distributed.is_primary()
    epoch, start = 0, 0
    latest = ckpt.latest_step()
    if latest is not None and (workdir / "config.json").exists():  # before anything is restored
        saved_epochs = load_config(workdir).get("train", {}).get("num_epochs", tcfg.num_epochs)
        tcfg.check_epochs_change(int(saved_epochs), latest, data.steps_per_epoch(tcfg.batch_size))
    if latest is not None:  # the newest complete and intact checkpoint; checks shapes first
        rstate, meta = placement.restore_latest(ckpt, rstate,
                                                report=lambda m: print(m, file=sys.stderr) if primary else None)
        epoch, start = int(meta["next_epoch"]), int(meta["next_step"])
        if primary:
            print(f"Resuming from step {placement.step(rstate)} (epoch {epoch + 1}, batch {start}) in {workdir}")
    write_config()  # only now: the workdir is known to fit this run
    log = MetricsLog(workdir / "metrics.jsonl", enabled=primary, tensorboard_dir=workdir / "tensorboard")
    log.truncate_after(placement.step(rstate))
    if placement.step(rstate) == 0 and task.init_params is not None:  # e.g. pretrained word vectors; never on resume
        params, report = task.init_params(placement.params(rstate), configs, data)
        rstate = placement.with_params(rstate, params)
        if report:
            log(event="init", step=0, **report)
    loss_fn = task.loss_fn(configs)
    p_train, p_eval = placement.train_step(loss_fn), placement.eval_step(loss_fn)
    spe = data.steps_per_epoch(tcfg.batch_size)
    lr = learning_rate_schedule(tcfg, tcfg.num_epochs * spe)
    if primary:
        what = getattr(data, "description", None) or f"{len(data.train)} train / {len(data.test)} test examples"
        print(f"{task.name}: {what}, {spe} steps/epoch, {placement.describe()} "
              f"[{jax.devices()[0].platform}] in {jax.process_count()} process(es), global batch {tcfg.batch_size}")
    final_test_run = task.test_eval is not None and getattr(data, "final_test", True)
    eval_split = "validation" if final_test_run else "test"  # what every epoch's evaluation reads
    metrics: Dict[str, Any] = {}
    try:
        for epoch in range(epoch, tcfg.num_epochs):
            t0, acc, shown = time.time(), MetricAccumulator(), start
            bar = tqdm(total=spe, initial=start, desc=f"epoch {epoch + 1}/{tcfg.num_epochs}", dynamic_ncols=True,
                       disable=not primary)
            for i, batch in enumerate(data.train_batches(tcfg.batch_size, tcfg.seed, epoch, start), start=start):
                rstate, sums = p_train(rstate, placement.batch(batch))
                acc.add(sums)
                step = epoch * spe + i + 1
                sync_point = (i + 1) % tcfg.log_every == 0 or i + 1 == spe
                if sync_point:  # regular syncs also avoid collective pile-ups
                    m = summarize(acc.fetch())
                    check_finite_loss(m["loss"], step)
                    rate = m["examples"] / max(time.time() - t0, 1e-9)
                    bar.update(i + 1 - shown)
                    shown = i + 1
                    bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.4f}", ex_s=f"{rate:.0f}")
                    log(event="train", epoch=epoch + 1, step=step, loss=m["loss"], accuracy=m["accuracy"],
                        examples_per_sec=rate, learning_rate=float(lr(step - 1)))
                periodic = tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0
                stopping = i + 1 < spe and stop.requested(sync_point)  # at the epoch's end: after its evaluation
                if (periodic or stopping) and i + 1 < spe:
                    save_if_finite(ckpt, step, rstate, {"next_epoch": epoch, "next_step": i + 1}, placement=placement)
                if stopping:
                    raise stopped(step)
            bar.close()
            train_m, train_time = summarize(acc.fetch()), time.time() - t0
            final = epoch + 1 == tcfg.num_epochs
            metrics = full_evaluation(task, configs, model, p_eval, rstate, data, workdir, (epoch + 1) * spe, final,
                                      placement)
            score = metrics[task.selection_metric]
            save_if_finite(ckpt, (epoch + 1) * spe, rstate, {"next_epoch": epoch + 1, "next_step": 0, "accuracy": score},
                           metrics={"accuracy": score}, placement=placement)  # "accuracy": the selection metric
            # The keys keep their historic test_ prefix; `split` names what they were measured on.
            log(event="eval", epoch=epoch + 1, step=(epoch + 1) * spe, split=eval_split,
                **{f"test_{k}" if k in ("loss", "accuracy", "examples") else k: v for k, v in metrics.items()},
                train_loss=train_m.get("loss"), train_accuracy=train_m.get("accuracy"), epoch_seconds=train_time)
            if primary:
                print(f"epoch {epoch + 1}/{tcfg.num_epochs}: train loss {train_m.get('loss', float('nan')):.4f} "
                      f"acc {train_m.get('accuracy', float('nan')):.4f} ({train_time:.0f} s) | eval "
                      f"{task.summary(metrics)} ({int(metrics['examples'])} "
                      f"{getattr(data, 'eval_name', None) or task.eval_name})")
            start = 0
            if epoch + 1 < tcfg.num_epochs and stop.requested():
                raise stopped((epoch + 1) * spe)
        if not metrics:  # nothing left to train: evaluate the restored state
            step = placement.step(rstate)
            metrics = full_evaluation(task, configs, model, p_eval, rstate, data, workdir, step, True, placement)
        if final_test_run:  # the model chosen on validation
            def evaluate_params(params, split):
                return evaluate(p_eval, placement.with_params(rstate, params), split,
                                tcfg.eval_batch_size or tcfg.batch_size, desc="test", placement=placement)

            metrics.update(final_test(task, configs, model, ckpt, placement.host_template(rstate), data, workdir, log,
                                      evaluate_params))
    finally:
        log.close()
    ckpt.wait()
    if primary:
        eval_name = getattr(data, "eval_name", None) or task.eval_name
        what = (f"{eval_name.split()[0]} accuracy: {metrics['accuracy']:.4f}"
                if task.decode_eval is None and task.eval_metrics is None else f"evaluation: {task.summary(metrics)}")
        chosen = (f"; the reported model is the tested one above, step {metrics['selected_step']}"
                  if "selected_step" in metrics else "")  # the last epoch need not be the best on validation
        print(f"Final {what} on all {int(metrics['examples'])} {eval_name} "
              f"(step {placement.step(rstate)}, checkpoints in {workdir}{chosen})")
    return metrics
