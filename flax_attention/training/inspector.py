"""Inspection commands on any workdir: ``predict``, ``translate`` and ``visualize``.

* classifiers: ``predict`` prints the label and the most-attended words of
  given texts (``--html`` highlights them); ``visualize`` writes that page for
  random test reviews;
* seq2seq and translation: ``translate`` (alias ``predict``) decodes given text
  (translation: raw sentences; synthetic tasks: symbol indices such as
  ``"3 1 4"``) and draws its attention as heatmap PNGs; ``visualize`` does the
  same for random held-out examples.

Every command loads the best checkpoint (by the task's selection metric).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from flax_attention.training.checkpointing import load_config
from flax_attention.training.loop import check_not_legacy
from flax_attention.training.registry import get_task
from flax_attention.training.restore import restore_best, task_configs

def load_run_config(workdir):
    """``(task, configs)`` of a workdir; a workdir of the retired seq2seq trainer is refused clearly."""
    saved = load_config(workdir)
    check_not_legacy(saved, workdir)
    task = get_task(str(saved.get("model_name")))
    return task, task_configs(workdir, task)


def load_for_inference(workdir):
    """``(task, configs, model, params, extras, step)`` from a workdir's best checkpoint."""
    task, configs = load_run_config(workdir)
    model, params, extras, step = restore_best(workdir, task, configs)
    return task, configs, model, params, extras, step


def predict(workdir, texts: Sequence[str],
            html_path: Optional[str] = None) -> Union[List[Dict[str, Any]], List[str]]:
    """Classifies raw texts (seq2seq workdirs: translates them, see :func:`translate`); prints the results."""
    from flax_attention.data.imdb import tokenize
    from flax_attention.training import review_html

    if not texts or any(not t.strip() for t in texts):
        raise ValueError('give at least one non-empty review text (or sentence to translate), e.g. predict --workdir W "Great film!"')
    if get_task(load_config(workdir).get("model_name", "bigru")).predict is None:
        return translate(workdir, texts, html_path)
    wordless = [i + 1 for i, t in enumerate(texts) if not tokenize(t)]
    if wordless:
        raise ValueError(f"text {wordless[0]} has no words to classify (only digits/punctuation: "
                         f"{texts[wordless[0] - 1][:40]!r}); pass review text, e.g. \"A wonderful film\".")
    task, configs, model, params, extras, _ = load_for_inference(workdir)
    results = task.predict(model, params, configs, extras, list(texts))
    for r in results:
        print(review_html.format_words(r))
    if html_path:
        blocks = [review_html.review_block(r, title=f"input {i + 1}") for i, r in enumerate(results)]
        print(f"wrote {review_html.write_page(html_path, blocks)}")
    return results


def _source_ids(task_name: str, configs, extras, texts: Sequence[str]) -> np.ndarray:
    if task_name == "translate":
        from flax_attention.training.translate import encode_sources
        return encode_sources(extras["tokenizer"], texts)
    from flax_attention.data.synthetic import NUM_SPECIAL, PAD_ID
    rows = []
    limit = configs["data"].num_symbols
    for t in texts:
        try:
            symbols = [int(x) for x in t.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"{t!r}: a synthetic task takes symbol indices 0..{limit - 1}, e.g. \"3 1 4\".") from None
        if not symbols or min(symbols) < 0 or max(symbols) >= limit:
            raise ValueError(f"{t!r}: give 1+ symbol indices in 0..{limit - 1}, e.g. \"3 1 4\".")
        rows.append([s + NUM_SPECIAL for s in symbols])
    out = np.full((len(rows), max(map(len, rows))), PAD_ID, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _labels(task_name: str, extras, ids) -> List[str]:
    from flax_attention.data.synthetic import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID

    if task_name == "translate":
        return extras["tokenizer"].pieces(ids)
    names = {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>"}
    return [names.get(int(t), str(int(t) - NUM_SPECIAL)) for t in ids]


def _trim(ids) -> List[int]:
    """Tokens up to and including the first EOS, padding dropped."""
    from flax_attention.data.synthetic import EOS_ID, PAD_ID

    out = []
    for t in np.asarray(ids).tolist():
        if t == PAD_ID:
            continue
        out.append(t)
        if t == EOS_ID:
            break
    return out


def decode_with_heatmaps(workdir, texts: Sequence[str], out_dir=None, names: Optional[Sequence[str]] = None):
    """Decodes ``texts`` with the best checkpoint and draws every attention map of each decoding.

    The model is run teacher-forced on its own output, so the maps show the
    attention that produced it. Writes ``out_dir/<name>/{kind}_layer<l>.png``.

    Returns:
      ``(outputs, paths)``: decoded strings and the written PNG paths.
    """
    from flax_attention.data.synthetic import BOS_ID, EOS_ID, PAD_ID
    from flax_attention.training.heatmaps import collect_attention, save_attention_heatmaps
    from flax_attention.training.seq2seq import decode_dataset

    task, configs, model, params, extras, step = load_for_inference(workdir)
    src = _source_ids(task.name, configs, extras, texts)
    beam = configs["decode"].beam_size
    max_len = min(model.config.max_len, src.shape[1] + 16)
    pred = decode_dataset(model, params, src, max_len, len(src), beam, configs["decode"].alpha)
    tgt_in = np.concatenate([np.full((len(src), 1), BOS_ID, np.int32), pred[:, :-1]], axis=1)
    maps = collect_attention(model, params, src, tgt_in)
    out_dir = Path(out_dir) if out_dir is not None else Path(workdir) / "heatmaps"
    outputs, paths = [], []
    for row in range(len(src)):
        s_ids, p_ids = [t for t in src[row].tolist() if t != PAD_ID] + [EOS_ID], _trim(pred[row])
        if task.name == "translate":
            text = extras["tokenizer"].decode([pred[row]])[0]
        else:
            text = " ".join(_labels(task.name, extras, [t for t in p_ids if t != EOS_ID]))
        outputs.append(text)
        folder = out_dir / (names[row] if names else f"input_{row + 1}")
        paths += save_attention_heatmaps(maps, folder, example=row, src_labels=_labels(task.name, extras, s_ids),
                                         tgt_labels=_labels(task.name, extras, [BOS_ID] + p_ids[:-1] or [BOS_ID]))
        print(f"{texts[row]} -> {text}   [step {step}; heatmaps in {folder}]")
    return outputs, paths


def translate(workdir, texts: Sequence[str], out_dir=None) -> List[str]:
    """``train.py translate``: decodes each text and draws its attention (cross-attention included)."""
    if not texts or all(not t.strip() for t in texts):
        raise ValueError('give at least one non-empty sentence, e.g. translate --workdir W "Ein Hund rennt."')
    task, _ = load_run_config(workdir)
    if task.predict is not None:
        raise ValueError(f"{workdir} holds a {task.name} classifier: use `train.py predict --workdir {workdir} TEXT`.")
    # An empty line (e.g. from a file of sentences) translates to an empty line; the others are decoded.
    real = [i for i, t in enumerate(texts) if t.strip()]
    decoded = decode_with_heatmaps(workdir, [texts[i] for i in real], out_dir, names=[f"input_{i + 1}" for i in real])[0]
    outputs = [""] * len(texts)
    for i, text in zip(real, decoded):
        outputs[i] = text
    for i, t in enumerate(texts):
        if not t.strip():
            print(f"{t!r} -> ''   [input {i + 1} is empty: nothing to translate]")
    return outputs


def visualize(workdir, num_examples: int, seed: int, out: Optional[str]) -> Path:
    """Random held-out examples: an HTML page (classifiers) or heatmap PNGs (seq2seq, translation)."""
    from flax_attention.data.imdb import load_split
    from flax_attention.training import review_html

    if num_examples < 1:
        raise ValueError(f"--num_examples must be >= 1, got {num_examples}.")
    task, configs = load_run_config(workdir)
    rng = np.random.default_rng(seed)
    if task.predict is None:
        if task.name == "translate":
            from flax_attention.data.translate import sentence_pairs
            c = configs["data"]
            pool = sentence_pairs(c.dataset, c.test_split, c.source_lang, c.target_lang)[0]
            idx = np.sort(rng.choice(len(pool), size=min(num_examples, len(pool)), replace=False))
            texts = [pool[i] for i in idx]
        else:
            from flax_attention.data.synthetic import NUM_SPECIAL, PAD_ID
            held = configs["data"].task_config().test_set(max(num_examples, 100))["src"]
            idx = np.sort(rng.choice(len(held), size=min(num_examples, len(held)), replace=False))
            texts = [" ".join(str(t - NUM_SPECIAL) for t in held[i] if t != PAD_ID) for i in idx]
        folder = Path(out) if out else Path(workdir) / "heatmaps"
        decode_with_heatmaps(workdir, texts, folder, names=[f"example_{i}" for i in idx])
        return folder
    _, configs, model, params, extras, _ = load_for_inference(workdir)
    texts, labels = load_split("test")
    idx = rng.choice(len(texts), size=min(num_examples, len(texts)), replace=False)
    chosen = [texts[i].decode("utf-8", "replace") if isinstance(texts[i], bytes) else str(texts[i]) for i in idx]
    results = task.predict(model, params, configs, extras, chosen)
    names = ["negative", "positive"]
    blocks = [review_html.review_block(r, names[int(labels[i])], title=f"test review #{i}")
              for r, i in zip(results, idx)]
    path = review_html.write_page(out or Path(workdir) / "attention.html", blocks)
    print(f"wrote {path}")
    return path
