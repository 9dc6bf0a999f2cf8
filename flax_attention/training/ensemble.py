"""``train.py ensemble``: several IMDB classifier workdirs voting with their averaged probabilities.

Averaging the predicted probabilities of independently fine-tuned classifiers
is how ULMFiT (Howard & Ruder 2018, §4: forward + backward LM) and Mesnil et
al. (2015) combine models on IMDB. Each member is read exactly as its own run
reported it: the checkpoint its validation split selected (or the average of
its newest checkpoints under ``--average_checkpoints``), its own vocabulary or
SentencePiece model, its own ``max_length`` and truncation, through the same
encoded splits (``task.prepare``) its trainer evaluated.

The members must have been trained with the same ``--valid_examples`` N > 0:
then they all hold out the same N labelled reviews (a fixed draw,
:func:`flax_attention.data.imdb.split_validation`), so which members to
combine can be judged on validation without any of them having trained on it,
and no member chose its checkpoint on the test split.

Each member's probabilities on a split are written once to
``WORKDIR/predictions/`` (per split and selected step), so adding a member to
an ensemble reads the test split only for the new one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import jax
import numpy as np

from flax_attention.data import imdb
from flax_attention.data import atomic
from flax_attention.training.checkpointing import Checkpointer, load_config
from flax_attention.training.inspector import load_run_config
from flax_attention.training.loop import create_train_state
from flax_attention.training.selection import select_params

SPLITS = ("validation", "test")
CLASSIFIERS = ("bigru", "transformer")


def _member_configs(workdirs: Sequence[str]) -> List[Tuple[Any, Dict[str, Any]]]:
    """``(task, configs)`` of every member, after checking that they can be combined."""
    if len(workdirs) < 2:
        raise ValueError("an ensemble needs at least two members: repeat --workdir, e.g. "
                         "`train.py ensemble --workdir W1 --workdir W2`.")
    if len({Path(w).resolve() for w in workdirs}) != len(workdirs):
        raise ValueError("a workdir is given twice; each member must be a different run.")
    for w in workdirs:  # before parsing the config: another family's sections would not fit
        name = load_config(w).get("model_name", "bigru")
        if name not in CLASSIFIERS:
            raise ValueError(f"{w} holds a --model {name} run; ensemble combines IMDB classifiers "
                             f"(--model {' or '.join(CLASSIFIERS)}).")
    members = [load_run_config(w) for w in workdirs]
    for w, (_, configs) in zip(workdirs, members):
        if not configs["data"].valid_examples:
            raise ValueError(f"{w} was trained without --valid_examples, so its checkpoint was chosen on the "
                             "test split; retrain it with --valid_examples N (e.g. 2500) to use it here.")
    held = {w: configs["data"].valid_examples for w, (_, configs) in zip(workdirs, members)}
    if len(set(held.values())) > 1:
        listed = ", ".join(f"{w}: {n}" for w, n in held.items())
        raise ValueError(f"the members hold out different validation splits ({listed}); each then trained on "
                         "reviews the others validate on. Use members trained with the same --valid_examples.")
    return members


def _selection_tag(selection: Dict[str, Any]) -> str:
    if "selected_step" in selection:
        return f"step{selection['selected_step']}"
    return "average" + "-".join(map(str, selection["averaged_steps"]))


def member_probabilities(workdir, task, configs, split: str, batch_size: int) -> Dict[str, Any]:
    """Positive-class probabilities of one member on ``split``, in the split's order.

    Returns:
      ``{"probs": float32 [N], "labels": int32 [N], "selection": {...}, "cached": bool}``.
    """
    extras = task.load_extras(workdir, configs)
    model, state = create_train_state(task, configs, extras)
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        if not ckpt.all_steps():
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train that member first.")
        # The member's own selection rule, exactly as its final test used it.
        params, selection = select_params(ckpt, state, configs["train"].average_checkpoints)
    finally:
        ckpt.close()
    cache = Path(workdir) / "predictions" / f"{split}-{_selection_tag(selection)}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return {"probs": z["probs"], "labels": z["labels"], "selection": selection, "cached": True}
    data = task.prepare(workdir, configs)
    encoded = data.valid if split == "validation" else data.test
    apply = jax.jit(lambda p, t, l: jax.nn.sigmoid(model.apply({"params": p}, t, l)[0].astype(np.float32)))
    probs = [np.asarray(apply(params, b["tokens"], b["lengths"]))[b["weights"] > 0]
             for b in imdb.eval_batches(encoded, batch_size)]
    out = {"probs": np.concatenate(probs).astype(np.float32), "labels": np.asarray(encoded.labels, np.int32)}
    try:
        with atomic.atomic_open(cache, "wb") as f:
            np.savez(f, probs=out["probs"], labels=out["labels"])
    except OSError as e:  # a read-only workdir still ensembles; it just reads the split again next time
        print(f"note: not caching {cache} ({type(e).__name__}: {e})")
    return {**out, "selection": selection, "cached": False}


def _scores(probs: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)  # finite log-loss for a saturated member
    y = labels.astype(np.float64)
    return {"accuracy": float(np.mean((probs >= 0.5) == labels.astype(bool))),
            "loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))}


def ensemble(workdirs: Sequence[str], split: str = "validation", batch_size: int = 128,
             out=None) -> Dict[str, Any]:
    """Accuracy of the members and of their mean probability on ``split``; prints a table.

    Args:
      workdirs: two or more IMDB classifier workdirs trained with the same
        ``--valid_examples`` N > 0.
      split: ``"validation"`` (the N held-out training reviews; choose members
        here) or ``"test"`` (all test reviews; read it for the final ensemble).
      batch_size: reviews per forward pass.
      out: a JSON-lines file to append the ``ensemble`` record to.

    Returns:
      The record: ``split``, ``examples``, ``accuracy`` and ``loss`` (mean
      binary cross-entropy) of the ensemble, ``seconds`` and ``time``, and per
      member its workdir, model, selection, own accuracy and loss, and
      whether its probabilities came from ``WORKDIR/predictions/``.
    """
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: use one of {', '.join(SPLITS)}.")
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size}: give a positive number of reviews per forward pass.")
    members = _member_configs(workdirs)
    t0 = time.time()
    rows, tags, probs, labels = [], [], [], None
    for w, (task, configs) in zip(workdirs, members):
        m = member_probabilities(w, task, configs, split, batch_size)
        if labels is not None and not np.array_equal(labels, m["labels"]):
            raise ValueError(f"{w}'s {split} labels differ from {workdirs[0]}'s: the members did not read the "
                             "same reviews (a different IMDB copy?).")
        labels = m["labels"]
        probs.append(m["probs"])
        tags.append(_selection_tag(m["selection"]))
        rows.append({"workdir": str(w), "model": task.name, **m["selection"], **_scores(m["probs"], labels),
                     "cached": m["cached"]})
    assert labels is not None
    record = {"event": "ensemble", "split": split, "examples": int(labels.size),
              **_scores(np.mean(probs, axis=0), labels), "members": rows,
              "seconds": round(time.time() - t0, 1), "time": time.time()}
    width = max(len(r["workdir"]) for r in rows)
    for r, tag in zip(rows, tags):
        print(f"{r['workdir']:<{width}}  {split} accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}  ({tag})")
    print(f"{'ensemble':<{width}}  {split} accuracy {record['accuracy']:.4f}  loss {record['loss']:.4f}  "
          f"(mean probability of {len(rows)} members, {record['examples']} reviews)")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return record
