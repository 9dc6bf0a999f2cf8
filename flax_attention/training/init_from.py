"""``train.py --model transformer --init_from W``: the IMDB classifier fine-tuned from a ``--model lm`` workdir.

With ``--init_from W`` the classifier mirrors the language model of ``W``:

* model: :class:`~flax_attention.models.classifier.LMClassifier` -- the LM's
  blocks with ``W``'s :class:`~flax_attention.models.lm.LMConfig` (the
  classifier's encoder flags ``d_model``, ``num_layers``, ... do not apply;
  ``dropout_rate`` is the head's, ``lm_dropout_rate`` the body's), mean or
  concat pooling (``--pooling``), one logit;
* input: the labelled reviews cleaned as the LM's corpus
  (:func:`flax_attention.data.lm_corpus.clean`) and encoded with ``W``'s
  SentencePiece model (copied to ``WORKDIR/spm.model``) as ``[BOS] pieces``,
  cut to ``--max_length`` tokens as ``--truncate`` says (``--vocab_size`` does
  not apply); ``--max_length`` may exceed the LM's (its positions carry no
  parameters);
* parameters: the ``lm`` subtree starts as ``W``'s best checkpoint (by its
  validation log-likelihood), the head fresh;
* optimiser: one rate for every layer, or with ``--lm_lr_decay D``
  discriminative rates (:func:`layer_rates`).

Recipe decisions (epochs, learning rate, freezing) belong on a validation
split: ``--valid_examples N`` carves ``N`` labelled training reviews for the
per-epoch evaluation and checkpoint selection, and the test split is then
evaluated once, on the selected checkpoint.

Everything is checked before the workdir is written: ``W`` must be an ``lm``
workdir with a checkpoint, and every parameter the classifier's body expects
must be in the checkpoint with the same shape and dtype (the first mismatch
is named). Parameters of the LM the body does not use (an untied output
layer) are left out.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_attention.data import atomic, imdb
from flax_attention.data import lm_corpus
from flax_attention.data.sentencepiece_vocab import SPM_FILE, Tokenizer
from flax_attention.embed.pretrained import key_path
from flax_attention.models.classifier import LM_POOLINGS, LMClassifier
from flax_attention.models.lm import LMConfig


def _flag(path) -> str:
    return f"--init_from {path}"


@functools.lru_cache(maxsize=8)
def lm_source(path: str) -> Tuple[LMConfig, Tokenizer]:
    """``(LMConfig with the real vocabulary, tokenizer)`` of a ``--model lm`` workdir, or a one-line ValueError."""
    from flax_attention.training import restore
    from flax_attention.training.checkpointing import load_config
    from flax_attention.training.lm import LM, model_config

    w = Path(path)
    if not (w / "config.json").is_file():
        raise ValueError(f"{_flag(path)}: no config.json there; give a workdir written by "
                         "`python train.py --model lm`.")
    saved = load_config(w)
    if saved.get("model_name") != "lm":
        raise ValueError(f"{_flag(path)} holds a --model {saved.get('model_name')} run; give a --model lm workdir "
                         "(its language model initialises the classifier).")
    configs = restore.task_configs(w, LM)  # as lm_params and `train.py generate` read it (added fields filled)
    tok = lm_corpus.load_tokenizer(w, configs["data"], train=False)
    return model_config(configs, {"tokenizer": tok}), tok


@functools.lru_cache(maxsize=None)
def _classifier(config: LMConfig, dropout_rate: float, pooling: str) -> LMClassifier:
    return LMClassifier(config, dropout_rate, pooling)


def build_classifier(configs) -> LMClassifier:
    """The classifier on the LM's architecture (ValueError for a non-LM workdir or a pooling it lacks).

    ``--max_length`` may exceed the LM's row length: every position scheme of
    :class:`~flax_attention.models.lm.LMConfig` (RoPE, ALiBi, none) is
    parameter-free, so the body is the same tree at any length; positions past
    the pretraining rows are first seen in fine-tuning (RoPE's rotations
    extend to them unchanged, Su et al. 2021 eq. 34).
    """
    data, model = configs["data"], configs["model"]
    if model.pooling not in LM_POOLINGS:
        raise ValueError(f"{_flag(data.init_from)} pools the LM's states with --pooling mean or concat "
                         f"(got {model.pooling!r}).")
    lm_config, _ = lm_source(data.init_from)
    # Fine-tuning's own dropout in the body; the LM's rate was its pretraining's (parameters unchanged).
    lm_config = dataclasses.replace(lm_config, max_length=max(data.max_length, lm_config.max_length),
                                    dropout_rate=model.lm_dropout_rate)
    return _classifier(lm_config, model.dropout_rate, model.pooling)


def layer_depth(path: Tuple[str, ...], num_layers: int) -> int:
    """How many layer groups below the top a parameter of :class:`LMClassifier` sits.

    0: the head and the LM's final norm; ``num_layers - i``: block ``i``
    (``lm/layers_i``); ``num_layers + 1``: the embedding table.
    """
    if len(path) > 1 and path[0] == "lm":
        if path[1] == "embedding":
            return num_layers + 1
        if path[1].startswith("layers_"):
            return num_layers - int(path[1][len("layers_"):])
    return 0


def layer_rates(configs):
    """``(tx, params) -> tx`` giving layer group ``d`` (:func:`layer_depth`) ``lm_lr_decay ** -d`` of the rate.

    Discriminative fine-tuning, Howard & Ruder (2018) eq. 2 (``eta^(l-1) =
    eta^l / 2.6``): lower layers hold more general features and should move
    less. The multipliers scale Adam's *updates*, which is the same as scaling
    each group's learning rate (Adam's step does not depend on the gradient's
    scale), while clipping stays global. ``None`` for ``lm_lr_decay == 1``
    (plain Adam, the optimiser state of earlier runs).
    """
    decay = configs["model"].lm_lr_decay
    if decay == 1.0:
        return None
    depth = build_classifier(configs).config.num_layers

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda kp, _: f"depth_{layer_depth(key_path(kp), depth)}", params)

    scales = {f"depth_{d}": optax.scale(decay ** -d) for d in range(depth + 2)}
    return lambda tx, params: optax.chain(tx, optax.multi_transform(scales, labels))


@functools.lru_cache(maxsize=8)
def lm_params(path: str):
    """``(params, step)`` of the LM workdir's best checkpoint (read once per process)."""
    from flax_attention.training import restore
    from flax_attention.training.checkpointing import IncompatibleWorkdirError
    from flax_attention.training.lm import LM

    try:
        _, params, _, step = restore.restore_best(path, LM, restore.task_configs(path, LM))
    except FileNotFoundError as e:
        raise ValueError(f"{_flag(path)}: {e}") from None
    except IncompatibleWorkdirError as e:  # its config.json describes another model than its checkpoint holds
        raise ValueError(f"{_flag(path)}: {str(e).split('. Use the settings')[0]}; restore that workdir's "
                         "config.json, or retrain the LM.") from None
    return jax.device_get(params), step


def _name(keys) -> str:
    return "/".join(key_path(keys))


def _leaves(tree) -> Dict[str, Any]:
    return {_name(keys): leaf for keys, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_compatible(expected, got, path: str) -> None:
    """Every leaf of ``expected`` (shapes) is in ``got`` with its shape and dtype; else a ValueError naming the first."""
    have = _leaves(got)
    for name, leaf in _leaves(expected).items():
        if name not in have:
            raise ValueError(f"{_flag(path)}: its checkpoint has no parameter {name} that the classifier's body "
                             f"needs ({tuple(leaf.shape)}); it was written by another version: retrain the LM.")
        g = have[name]
        if tuple(np.shape(g)) != tuple(leaf.shape) or np.asarray(g).dtype != leaf.dtype:
            raise ValueError(f"{_flag(path)}: parameter {name} is {np.asarray(g).dtype}{list(np.shape(g))} in its "
                             f"checkpoint but the classifier built from its config.json expects "
                             f"{leaf.dtype}{list(leaf.shape)}; restore the workdir's config.json, or retrain the LM.")


def preflight(configs) -> None:
    """Flag combinations, ``W``'s kind and its checkpoint's shapes, before anything is written."""
    data, path = configs["data"], configs["data"].init_from
    if data.embeddings or data.freeze_embeddings:
        raise ValueError(f"--embeddings/--freeze_embeddings and {_flag(path)} both concern the embedding table; "
                         "--init_from brings the LM's own: leave the other two out.")
    model = build_classifier(configs)
    tokens = jnp.ones((1, data.max_length), jnp.int32)
    expected = jax.eval_shape(lambda k: model.init(k, tokens, jnp.ones((1,), jnp.int32)), jax.random.PRNGKey(0))
    check_compatible(expected["params"]["lm"], lm_params(path)[0], path)


def init_params(params, configs, data) -> Tuple[Any, Dict[str, Any]]:
    """The classifier's parameters with the ``lm`` subtree replaced by the LM's (values copied, dtypes kept)."""
    path = configs["data"].init_from
    source, step = lm_params(path)
    check_compatible(jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), params["lm"]),
                     source, path)
    have = _leaves(source)
    copied = jax.tree_util.tree_map_with_path(lambda keys, _: np.asarray(have[_name(keys)]), params["lm"])
    n = len(jax.tree_util.tree_leaves(copied))
    print(f"classifier body initialised from {path} (LM checkpoint step {step}, {n} tensors)")
    return {**params, "lm": copied}, {"init_from_step": int(step), "init_from_tensors": n}


def encode_reviews(texts, tok: Tokenizer, config: imdb.IMDBConfig) -> Tuple[np.ndarray, np.ndarray]:
    """``(tokens [N, S], lengths [N])``: ``[BOS] pieces`` of each cleaned review, cut to ``S = max_length``."""
    s = config.max_length
    rows = tok.encode([lm_corpus.clean(t) for t in texts])
    tokens, lengths = np.zeros((len(rows), s), np.int32), np.zeros((len(rows),), np.int32)
    for i, ids in enumerate(rows):
        ids = ids[-(s - 1):] if config.truncate == "pre" else ids[:s - 1]
        tokens[i, 0], tokens[i, 1:len(ids) + 1], lengths[i] = lm_corpus.BOS_ID, ids, len(ids) + 1
    return tokens, lengths


def prepare(workdir, config: imdb.IMDBConfig):
    """``(tokenizer, train, test)`` encoded with the LM's SentencePiece model, cached under ``workdir``."""
    _, tok = lm_source(config.init_from)
    own = Path(workdir) / SPM_FILE
    if own.exists() and own.read_bytes() != tok.proto:
        raise ValueError(f"{own} differs from the SentencePiece model of {config.init_from}; this workdir was "
                         "trained from another LM: use a fresh --workdir.")
    if not own.exists():
        tok.save(own)
    key = f"{hashlib.sha256(tok.proto).hexdigest()[:16]}-{lm_corpus.CLEANUP_VERSION}-{config.max_length}-{config.truncate}"
    splits = []
    for split in ("train", "test"):
        path = Path(workdir) / "data_cache" / f"spm-{split}-{key}.npz"
        if path.exists():
            with np.load(path) as z:
                splits.append(imdb.EncodedSplit(z["tokens"], z["lengths"], z["labels"]))
            continue
        texts, labels = imdb.load_split(split)
        tokens, lengths = encode_reviews(texts, tok, config)
        with atomic.atomic_open(path, "wb") as f:
            np.savez(f, tokens=tokens, lengths=lengths, labels=labels)
        splits.append(imdb.EncodedSplit(tokens, lengths, labels))
    return tok, splits[0], splits[1]
