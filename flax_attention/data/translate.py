"""A TFDS translation dataset as SentencePiece-tokenised, length-bucketed seq2seq batches.

Default: Multi30k German-English (:mod:`flax_attention.data.multi30k`), any
direction (``source_lang``/``target_lang``). Any TFDS dataset whose records map
language codes to sentences works the same way (``wmt14_translate/de-en``, ...).

Vocabulary: one joint SentencePiece model (Kudo & Richardson 2018; unigram LM by
default) over the source and target sentences of the *training* split only,
saved as ``WORKDIR/spm.model`` and reused on resume and at inference. Ids:
``PAD_ID 0``, ``BOS_ID 1``, ``EOS_ID 2`` (as in :mod:`flax_attention.data.synthetic`),
``3`` unknown. A joint vocabulary lets the Transformer share one embedding
matrix between encoder, decoder and output layer (§3.4); German and English
share most names, numbers and punctuation.

Batches have the layout of :mod:`flax_attention.data.synthetic` (``src``,
``tgt_in``, ``tgt_out``) plus ``weights`` (1 for real rows, 0 for the rows that
pad the last evaluation batch). To waste little compute on padding, each epoch
shuffles the pairs, sorts them by length within pools of 50 batches, cuts
batches and shuffles the batch order (the "pooled bucketing" of torchtext and
fairseq); each batch is padded to a multiple of 8 tokens, so a jitted step
compiles once per length bucket, not per batch. The order depends only on
``(seed, epoch)``, so a run resumed mid-epoch sees the same batches.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from flax_attention.data.sentencepiece_vocab import SPM_FILE, UNK_ID, Tokenizer  # noqa: F401 (re-exported)
from flax_attention.data.synthetic import BOS_ID, EOS_ID, PAD_ID
from flax_attention.data.tfds_source import read_records

Batch = Dict[str, np.ndarray]
_POOL = 50  # batches per sorting pool
_ROUND = 8  # pad lengths to a multiple of this (one compilation per bucket)


@dataclasses.dataclass(frozen=True)
class TranslateConfig:
    """A translation task read from TFDS.

    Attributes:
      dataset: TFDS name (with config if any), e.g. ``multi30k``.
      source_lang: language key of the source sentences (e.g. ``de``).
      target_lang: language key of the target sentences (e.g. ``en``).
      vocab_size: joint SentencePiece vocabulary size (special ids included).
      spm_model_type: SentencePiece algorithm, ``unigram`` or ``bpe``.
      max_tokens: training pairs longer than this many subwords (source, or
        target + EOS) are left out; evaluation never drops or cuts sentences.
      train_examples: train on the first N pairs of the training split only
        (0 = all; for quick trials and tests; the vocabulary still sees all).
      train_split: TFDS split to train on (the vocabulary is learned from it).
      eval_split: split of the periodic evaluations (model selection).
      test_split: split of the final evaluation (beam search, reported BLEU).
    """

    dataset: str = "multi30k"
    source_lang: str = "de"
    target_lang: str = "en"
    vocab_size: int = 8000
    spm_model_type: str = "unigram"
    max_tokens: int = 64
    train_examples: int = 0
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"

    def __post_init__(self):
        if self.source_lang == self.target_lang:
            raise ValueError(f"--source_lang and --target_lang are both {self.source_lang!r}; pick two languages "
                             "of the dataset, e.g. --source_lang de --target_lang en.")
        if self.vocab_size < 8:
            raise ValueError(f"--vocab_size must be >= 8, got {self.vocab_size}.")
        if self.spm_model_type not in ("unigram", "bpe"):
            raise ValueError(f"--spm_model_type must be unigram or bpe, got {self.spm_model_type!r}.")
        if self.train_examples < 0:
            raise ValueError(f"--train_examples must be >= 0 (0 = all), got {self.train_examples}.")
        if self.max_tokens < 2:
            raise ValueError(f"--max_tokens must be >= 2, got {self.max_tokens}.")


def _text(value) -> str:
    # Real TFDS records hold bytes, tfds.testing.mock_data yields str.
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@functools.lru_cache(maxsize=8)
def sentence_pairs(dataset: str, split: str, source_lang: str, target_lang: str) -> Tuple[List[str], List[str]]:
    """``(sources, targets)`` text of one split (read once per process).

    Multi30k's evaluation splits (every split but ``train``) come in the line
    order of the official raw files, so written translations and references
    line up with ``sacrebleu -t multi30k/2016`` and the published references;
    ``train`` keeps the TFDS record order (the data order of earlier runs).
    Other datasets keep their TFDS record order.
    """
    own = dataset.split("/")[0] == "multi30k"
    if own:
        from flax_attention.data import multi30k  # registers the builder with TFDS
    records = read_records(dataset, split)
    if own and split != "train":
        records = multi30k.in_raw_order(records, split)
    if not records:
        raise ValueError(f"{dataset} split {split!r} is empty.")
    missing = [k for k in (source_lang, target_lang) if k not in records[0]]
    if missing:
        raise ValueError(f"{dataset} has no language {missing[0]!r} (its records have {sorted(records[0])}); "
                         "set --source_lang/--target_lang to two of those.")
    return [_text(r[source_lang]) for r in records], [_text(r[target_lang]) for r in records]


def load_tokenizer(workdir, config: TranslateConfig, train: bool = True) -> Tokenizer:
    """``WORKDIR/spm.model``; learned from the training split (and saved) if absent and ``train``."""
    path = Path(workdir) / SPM_FILE
    if path.exists():
        return Tokenizer.load(path)
    if not train:
        raise FileNotFoundError(f"{path} not found: train first with `python train.py --model translate "
                                f"--workdir {workdir}`.")
    sources, targets = sentence_pairs(config.dataset, config.train_split, config.source_lang, config.target_lang)
    tok = Tokenizer.train([*sources, *targets], config.vocab_size, config.spm_model_type)
    tok.save(path)
    return tok


def _round_up(n: int) -> int:
    return max(_ROUND, -(-n // _ROUND) * _ROUND)


@dataclasses.dataclass
class Split:
    """Tokenised sentence pairs of one split (variable length; padded per batch)."""

    src: List[np.ndarray]
    tgt: List[np.ndarray]

    def __len__(self) -> int:
        return len(self.src)

    def lengths(self) -> np.ndarray:
        return np.array([max(len(s), len(t) + 1) for s, t in zip(self.src, self.tgt)], np.int64)


def encode_split(tok: Tokenizer, sources: Sequence[str], targets: Sequence[str], max_tokens: int = 0) -> Split:
    """Token ids per pair; with ``max_tokens`` > 0, pairs longer than that are dropped (training only)."""
    src = [np.asarray(x, np.int32) for x in tok.encode(sources)]
    tgt = [np.asarray(y, np.int32) for y in tok.encode(targets)]
    if max_tokens:
        keep = [i for i in range(len(src)) if len(src[i]) <= max_tokens and len(tgt[i]) + 1 <= max_tokens]
        src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
    return Split(src, tgt)


def make_batch(split: Split, idx: Sequence[int] | np.ndarray, rows: int) -> Batch:
    """Pads pairs ``idx`` (and ``rows - len(idx)`` all-PAD rows of weight 0) to one bucket length."""
    length = _round_up(max(max(len(split.src[i]), len(split.tgt[i]) + 1) for i in idx))
    b = {"src": np.full((rows, length), PAD_ID, np.int32), "tgt_in": np.full((rows, length), PAD_ID, np.int32),
         "tgt_out": np.full((rows, length), PAD_ID, np.int32), "weights": np.zeros((rows,), np.float32)}
    for r, i in enumerate(idx):
        x, y = split.src[i], split.tgt[i]
        b["src"][r, :len(x)] = x
        b["tgt_in"][r, 0], b["tgt_in"][r, 1:len(y) + 1] = BOS_ID, y
        b["tgt_out"][r, :len(y)], b["tgt_out"][r, len(y)] = y, EOS_ID
        b["weights"][r] = 1.0
    return b


def epoch_batches(split: Split, batch_size: int, seed: int, epoch: int) -> List[np.ndarray]:
    """The index batches of one epoch (full batches only), in training order."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3, epoch]))
    order = rng.permutation(len(split))
    lengths = split.lengths()
    pool = _POOL * batch_size
    batches = []
    for start in range(0, len(order) - batch_size + 1, pool):
        chunk = order[start:start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def train_batches(split: Split, batch_size: int, seed: int, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    for idx in epoch_batches(split, batch_size, seed, epoch)[start_step:]:
        yield make_batch(split, idx, batch_size)


def eval_batches(split: Split, batch_size: int) -> Iterator[Batch]:
    """Every pair once, in order of length (less padding); the last batch is filled with weight-0 rows."""
    order = np.argsort(split.lengths(), kind="stable")
    for start in range(0, len(order), batch_size):
        yield make_batch(split, order[start:start + batch_size], batch_size)
