"""The IMDB classifier tasks (``--model bigru``, ``--model transformer``).

The :class:`~flax_attention.training.task.Task` interface they implement lives
in :mod:`flax_attention.training.task` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_attention.data import imdb
from flax_attention.models.bigru import BiGRUClassifier, BiGRUConfig
from flax_attention.models.classifier import TransformerClassifier, TransformerClassifierConfig

from flax_attention.training.task import Configs, Task  # noqa: F401  (Task re-exported)


@dataclasses.dataclass
class Data:
    """Prepared splits plus side information (e.g. the vocabulary).

    The loop needs exactly these members from any task's data: ``train`` and
    ``test`` (sized), ``extras``, ``train_batches``, ``eval_batches``,
    ``steps_per_epoch`` and ``num_eval_batches``. Batches are dicts of arrays
    whose leading axis is the global batch.
    """

    train: Any
    test: Any
    extras: Dict[str, Any]
    valid: Any = None  # IMDB --valid_examples: evaluated every epoch instead of test (then read once at the end)

    @property
    def evaluated(self):
        """The split every epoch's evaluation reads: validation if there is one, else test."""
        return self.test if self.valid is None else self.valid

    @property
    def eval_name(self) -> str:
        return "test reviews" if self.valid is None else "validation reviews"

    @property
    def final_test(self) -> bool:
        """Whether the trainer evaluates the test split once after training (only with a validation split)."""
        return self.valid is not None

    @property
    def description(self) -> str:
        held = f" / {len(self.valid)} validation" if self.valid is not None else ""
        return f"{len(self.train)} train{held} / {len(self.test)} test examples"

    def test_split(self) -> "Data":
        """The test split as the evaluated one (for :func:`imdb_test_eval`)."""
        return dataclasses.replace(self, valid=None)

    def train_batches(self, batch_size: int, seed: int, epoch: int, start_step: int = 0) -> Iterator[dict]:
        return imdb.train_batches(self.train, batch_size, seed, epoch, start_step)

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        return imdb.eval_batches(self.evaluated, batch_size)

    def steps_per_epoch(self, batch_size: int) -> int:
        return imdb.steps_per_epoch(self.train, batch_size)

    def num_eval_batches(self, batch_size: int) -> int:
        return -(-len(self.evaluated) // batch_size)


# ------------------------------------------------------------ binary text classification


def binary_classification_loss(params, apply_fn, batch, rngs, train: bool):
    """Sigmoid cross-entropy on a model ``(tokens, lengths) -> (logits [B], ...)``.

    Returns the weighted loss sum and weighted sums of loss and correct
    predictions (``sigmoid(logit) >= 0.5`` i.e. ``logit >= 0`` is positive).
    """
    logits, _ = apply_fn({"params": params}, batch["tokens"], batch["lengths"], train=train, rngs=rngs)
    labels = batch["labels"].astype(jnp.float32)
    w = batch["weights"].astype(jnp.float32)
    losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels)
    correct = ((logits >= 0).astype(jnp.float32) == labels).astype(jnp.float32)
    loss_sum = jnp.sum(w * losses)
    return loss_sum, {"loss": loss_sum, "accuracy": jnp.sum(w * correct), "weight": jnp.sum(w)}


def prepare_imdb(workdir, configs: Configs) -> Data:
    cfg = configs["data"]
    extras: Dict[str, Any]
    if cfg.init_from:  # the LM's SentencePiece ids (flax_attention.training.init_from)
        from flax_attention.training import init_from

        tok, train, test = init_from.prepare(workdir, cfg)
        extras = {"tokenizer": tok}
    else:
        vocab, train, test = imdb.prepare(workdir, cfg)
        extras = {"vocab": vocab}
    if not cfg.valid_examples:
        return Data(train, test, extras)
    train, valid = imdb.carve_validation(train, cfg.valid_examples)
    return Data(train, test, extras, valid)


def imdb_test_eval(model, params, configs: Configs, data: Data, workdir, selection: Mapping[str, Any],
                   evaluate=None) -> Dict[str, Any]:
    """``--valid_examples``: the selected checkpoint's accuracy on the whole test split, computed once."""
    assert evaluate is not None, "the trainer passes its evaluation function"
    m = evaluate(params, data.test_split())
    what = (f"best validation checkpoint, step {selection['selected_step']}" if "selected_step" in selection
            else f"average of the checkpoints of steps {', '.join(map(str, selection['averaged_steps']))}")
    print(f"test accuracy {m['accuracy']:.4f} (loss {m['loss']:.4f}; {what}) on all {int(m['examples'])} "
          "test reviews")
    return {f"test_{k}": v for k, v in m.items()}


def load_imdb_extras(workdir, configs: Configs) -> Dict[str, Any]:
    if configs["data"].init_from:
        from flax_attention.data.sentencepiece_vocab import SPM_FILE, Tokenizer

        return {"tokenizer": Tokenizer.load(Path(workdir) / SPM_FILE)}
    path = Path(workdir) / "vocab.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train first with `python train.py --workdir {workdir}`.")
    return {"vocab": imdb.Vocabulary.load(path)}


def classify_texts(model, params, configs: Configs, extras, texts: Sequence[str]) -> List[Dict[str, Any]]:
    """Probability, label and per-word attention weights for raw review texts.

    The model must return ``(logits [B], weights [B, S])`` (weights over token
    positions, e.g. additive attention pooling).
    """
    cfg = configs["data"]
    if "tokenizer" in extras:  # --init_from: SentencePiece pieces
        from flax_attention.training.init_from import encode_reviews

        tokens, lengths = encode_reviews(texts, extras["tokenizer"], cfg)
        words = [extras["tokenizer"].pieces(tokens[b, :lengths[b]]) for b in range(len(texts))]
    else:
        tokens, lengths = imdb.encode(texts, extras["vocab"], cfg)
        words = [imdb.kept_words(t, cfg) for t in texts]
    logits, weights = jax.jit(lambda p, t, l: model.apply({"params": p}, t, l))(params, tokens, lengths)
    probs = np.asarray(jax.nn.sigmoid(logits))
    weights = np.asarray(weights)
    out = []
    for b in range(len(texts)):
        n = int(lengths[b])
        out.append({"prob": float(probs[b]), "label": "positive" if probs[b] >= 0.5 else "negative",
                    "words": words[b],
                    "weights": weights[b, :n].tolist()})
    return out


def _imdb_token_inputs(configs: Configs) -> Tuple:
    return (jnp.ones((1, configs["data"].max_length), jnp.int32), jnp.ones((1,), jnp.int32))


@functools.lru_cache(maxsize=None)
def _model(model_cls, config):
    # One module per (frozen, hashable) config: TrainState.apply_fn is a static
    # pmap argument, so reusing the instance reuses compiled steps.
    return model_cls(config)


def _build_classifier(model_cls, configs: Configs, extras):
    if configs["data"].init_from and model_cls is TransformerClassifier:  # the LM's architecture
        from flax_attention.training import init_from

        return init_from.build_classifier(configs)
    return _model(model_cls, configs["model"])


def pretrained_embeddings(params, configs: Configs, data: Data):
    """Initialises the embedding table from ``--embeddings`` (matched against the vocabulary),
    or with ``--init_from`` the whole body from the language model."""
    from flax_attention.data.word_vectors import load_word_vectors, token_counts
    from flax_attention.embed.pretrained import EMBEDDING_PATH, init_embedding

    if configs["data"].init_from:
        from flax_attention.training import init_from

        return init_from.init_params(params, configs, data)
    path = configs["data"].embeddings
    if not path:
        return params, {}
    check_embeddings_file(configs)
    vocab, model = data.extras["vocab"], configs["model"]
    gru = hasattr(model, "embed_dim")  # the Transformer classifier's table is d_model wide
    rows, found, coverage = load_word_vectors(path, vocab, dim=model.embed_dim if gru else model.d_model,
                                              counts=token_counts(data.train.tokens, vocab.size))
    print(coverage.summary())
    # The Transformer classifier scales embeddings by sqrt(E) and expects E^-1/2-sized rows.
    params = init_embedding(params, EMBEDDING_PATH, rows, found, match_std=not gru)
    return params, {"embedding_word_coverage": coverage.word_fraction,
                    "embedding_token_coverage": coverage.token_fraction}


def check_embeddings_file(configs: Configs) -> None:
    """The ``--embeddings`` file exists and is a well-formed vector file of the model's width (every line read)."""
    from flax_attention.data.word_vectors import load_word_vectors

    path, model = configs["data"].embeddings, configs["model"]
    if configs["train"].average_checkpoints and not configs["data"].valid_examples:
        raise ValueError(f"--average_checkpoints {configs['train'].average_checkpoints} needs a validation split "
                         "to judge it and a final test: add --valid_examples N (e.g. 2500).")
    if getattr(model, "lm_lr_decay", 1.0) != 1.0 and not configs["data"].init_from:
        raise ValueError(f"--lm_lr_decay {model.lm_lr_decay} sets per-layer rates of a pretrained LM's blocks: "
                         "add --init_from W (a --model lm workdir), or leave it at 1.")
    if configs["data"].init_from:
        if hasattr(model, "embed_dim"):
            raise ValueError(f"--init_from applies to --model transformer (the LM's blocks are a Transformer); "
                             f"--model bigru cannot start from {configs['data'].init_from}.")
        from flax_attention.training import init_from

        return init_from.preflight(configs)
    if not path:
        return
    if not Path(path).is_file():
        raise FileNotFoundError(f"--embeddings {path}: no such file; give a word-vector text file, e.g. one "
                                "written by `python train.py embed --out vectors.txt`.")
    dim = model.embed_dim if hasattr(model, "embed_dim") else model.d_model
    load_word_vectors(path, [], dim=dim, check_all=True)  # no vocabulary yet: format and values only


def classifier_optimizer(configs: Configs):
    """``(tx, params) -> tx`` for a frozen embedding table or the LM's per-layer rates; ``None`` for plain Adam."""
    from flax_attention.embed.pretrained import EMBEDDING_PATH, freeze, path_is

    if configs["data"].freeze_embeddings:
        return lambda tx, params: freeze(tx, params, path_is(EMBEDDING_PATH))
    if configs["data"].init_from:
        from flax_attention.training import init_from

        return init_from.layer_rates(configs)
    return None


def imdb_classifier(name: str, config_cls, model_cls) -> Task:
    """IMDB pipeline, vocabulary, loss, evaluation, checkpoints, predict/visualize; only the model differs."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    # Model fields added after workdirs were written with this model, filled in when those resume.
    added = {"lm_dropout_rate": 0.0, "lm_lr_decay": 1.0}
    added_model_fields = {f"model.{k}": v for k, v in added.items() if k in fields}
    return Task(
        name=name,
        config_classes={"model": config_cls, "data": imdb.IMDBConfig},
        prepare=prepare_imdb,
        load_extras=load_imdb_extras,
        build_model=functools.partial(_build_classifier, model_cls),
        init_inputs=_imdb_token_inputs,
        loss_and_metrics=binary_classification_loss,
        predict=classify_texts,
        init_params=pretrained_embeddings,
        preflight=check_embeddings_file,
        optimizer=classifier_optimizer,
        added_fields={"data.embeddings": "", "data.freeze_embeddings": False, "data.init_from": "",
                      "data.valid_examples": 0, **added_model_fields},
        test_eval=imdb_test_eval,
    )


BIGRU = imdb_classifier("bigru", BiGRUConfig, BiGRUClassifier)
# Transformer-encoder classifier: see flax_attention.models.classifier.
TRANSFORMER = imdb_classifier("transformer", TransformerClassifierConfig, TransformerClassifier)
