"""IMDB as a language-modelling corpus: SentencePiece ids of whole reviews, packed into fixed-length rows.

Corpus: the 25,000 ``train`` and 50,000 ``unsupervised`` reviews of
``imdb_reviews`` (labels unused) are the training text; the 25,000 ``test``
reviews are held out for perplexity. Text cleanup (:func:`clean`): ``<br />``
markup becomes a space and whitespace runs collapse to one space; case,
digits and punctuation are kept (a language model should write them).

Vocabulary: a SentencePiece model (:class:`~flax_attention.data.sentencepiece_vocab.Tokenizer`,
unigram by default, ids pad 0, bos 1, eos 2, unk 3) learned from the
training text only (validation reviews excluded) -- from a fixed random sample of ``spm_sample_reviews``
whole reviews (seeded independently of ``--seed``, so every run of a data
configuration gets the same vocabulary; SentencePiece's own sampling is
off because it is not reproducible across versions), saved as
``WORKDIR/spm.model``. The encoded splits are cached under
``WORKDIR/lm_cache/`` (keyed by the model's hash), so a resumed run does not
tokenise 100,000 reviews again.

Documents and packing: a review is ``[BOS] pieces [EOS]``. Each epoch
shuffles the reviews (a pure function of ``(seed, epoch)``), lays them end to
end as one token stream, and cuts it into rows of ``L + 1`` tokens with stride
``L`` (``L = max_length``): row ``r`` holds stream tokens ``rL .. rL + L``, so
``inputs = row[:-1]`` and ``targets = row[1:]`` and the token a row ends with
begins the next row. Every stream position after the first is therefore the
target of exactly one row. Within a row:

* ``segment_ids`` number the documents present ``1, 2, ...`` (``0`` = padding
  after the stream's end), so no token attends across reviews;
* ``positions`` restart at 0 where a document starts *and* at the start of a
  row that continues a document cut by the row boundary. Restarting keeps
  every position inside ``[0, L)``, the range generation uses (the KV cache
  holds ``max_length`` entries); with RoPE (the default) attention depends
  only on position differences inside a segment, so nothing changes for it,
  and a true document start remains recognisable by its BOS;
* ``weights`` mark the targets that count: target ``t`` counts iff input and
  target belong to the same document -- the BOS of a review is never a target
  (nothing in another review predicts it), the EOS always is.

The rows are then shuffled too, and an epoch is its full batches (the rest of
the rows wait for the next epoch's new packing); a run resumed at step ``k``
sees the same batches. Evaluation packs the validation (or test) reviews in their order
and reads every row once (the last batch is filled with all-padding rows).

Counts (metric denominators): ``tokens`` = targets with weight 1 = for each
review, its SentencePiece pieces + 1 (the EOS); ``words`` = for each review,
``len(clean(text).split())`` whitespace words + 1 (the EOS, the convention of
word-level perplexity on PTB/WikiText), credited at the review's EOS target.
Word-level perplexity ``exp(total NLL / words)`` does not depend on the
vocabulary, so models with different tokenizers compare on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import numpy.typing as npt

from flax_attention.data import atomic, imdb
from flax_attention.data.sentencepiece_vocab import SPM_FILE, Tokenizer
from flax_attention.data.synthetic import BOS_ID, EOS_ID, PAD_ID
from flax_attention.data.tfds_source import read_records

DATASET = "imdb_reviews"
TRAIN_SPLITS = ("train", "unsupervised")
TEST_SPLIT = "test"
CLEANUP_VERSION = "v1"  # bump when clean() changes: it invalidates the encoded caches
CACHE_DIR = "lm_cache"
_SPM_SAMPLE_SEED = 20_150_601  # fixed: the vocabulary depends on the data flags only, never on --seed
_VALID_SEED = 20_150_602  # fixed likewise: every run of a data configuration validates on the same reviews
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
Batch = Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class LMDataConfig:
    """The IMDB language-modelling corpus.

    Attributes:
      vocab_size: SentencePiece vocabulary size (special ids included; the
        model's embedding follows the size SentencePiece actually made).
      max_length: ``L``, tokens per packed row fed to the model.
      spm_model_type: SentencePiece algorithm, ``unigram`` or ``bpe``.
      spm_sample_reviews: reviews (a fixed random sample of the training text)
        the vocabulary is learned from (0 = all 75,000; slower).
      train_reviews: train on the first N of the training reviews left after
        the validation set only (0 = all; quick trials and tests; evaluation
        always reads every validation and test review).
      valid_reviews: reviews carved from the 75,000 training reviews (a fixed
        seeded sample) for per-epoch evaluation and checkpoint selection;
        never trained on, never in the vocabulary's sample. ``0`` marks a
        workdir written before this split existed (it selected on test): such
        runs can be loaded (``generate``, ``--init_from``) but not trained.
    """

    vocab_size: int = 8000
    max_length: int = 256
    spm_model_type: str = "unigram"
    spm_sample_reviews: int = 20_000
    train_reviews: int = 0
    valid_reviews: int = 1000

    def __post_init__(self):
        if self.vocab_size < 8:
            raise ValueError(f"--vocab_size must be >= 8, got {self.vocab_size}.")
        if self.max_length < 2:
            raise ValueError(f"--max_length must be >= 2 (a token and its successor), got {self.max_length}.")
        if self.spm_model_type not in ("unigram", "bpe"):
            raise ValueError(f"--spm_model_type must be unigram or bpe, got {self.spm_model_type!r}.")
        if self.spm_sample_reviews < 0 or self.train_reviews < 0:
            raise ValueError(f"--spm_sample_reviews and --train_reviews must be >= 0 (0 = all), got "
                             f"{self.spm_sample_reviews} and {self.train_reviews}.")
        if self.valid_reviews < 0:
            raise ValueError(f"--valid_reviews must be >= 1 (default 1000), got {self.valid_reviews}.")


# --------------------------------------------------------------------------- text


def clean(text) -> str:
    """One review as plain text: ``<br />`` -> space, whitespace runs -> one space, stripped."""
    if isinstance(text, (bytes, np.bytes_)):  # real TFDS records hold bytes, mock_data str
        text = text.decode("utf-8", errors="replace")
    return _SPACE.sub(" ", _BR.sub(" ", str(text))).strip()


def word_count(text: str) -> int:
    """Whitespace words of an already cleaned review (its EOS not included)."""
    return len(text.split())


def read_reviews(splits: Sequence[str]) -> List[str]:
    """Cleaned review texts of the given ``imdb_reviews`` splits, concatenated in TFDS order."""
    return [clean(r["text"]) for split in splits for r in read_records(DATASET, split)]


def split_validation(num_reviews: int, valid_reviews: int):
    """``(train indices, validation indices)`` into the training reviews, both sorted and disjoint.

    The validation set is ``valid_reviews`` indices drawn without replacement
    with a fixed seed: a function of ``(num_reviews, valid_reviews)`` only
    (:func:`flax_attention.data.imdb.split_validation` with this corpus's seed).

    Raises:
      ValueError: ``valid_reviews`` leaves no review to train on.
    """
    return imdb.split_validation(num_reviews, valid_reviews, seed=_VALID_SEED, flag="--valid_reviews",
                                 what="training reviews")


# --------------------------------------------------------------------------- vocabulary


def spm_sample(texts: Sequence[str], n: int) -> List[str]:
    """The reviews the vocabulary is learned from: ``n`` drawn without replacement (all if ``n`` is 0 or more)."""
    if not n or n >= len(texts):
        return list(texts)
    idx = np.sort(np.random.default_rng(_SPM_SAMPLE_SEED).choice(len(texts), n, replace=False))
    return [texts[i] for i in idx]


def load_tokenizer(workdir, config: LMDataConfig, texts_fn: Optional[Callable[[], Sequence[str]]] = None,
                   train: bool = True) -> Tokenizer:
    """``WORKDIR/spm.model``; learned from the training reviews (and saved atomically) if absent and ``train``.

    ``texts_fn()``: the cleaned training reviews (default: read them), called only when learning.

    A damaged file is a ValueError telling to restore it or use a fresh
    workdir; it is never deleted or rewritten (the checkpoints use its ids).
    """
    path = Path(workdir) / SPM_FILE
    if path.exists():
        return Tokenizer.load(path)
    if not train:
        raise FileNotFoundError(f"{path} not found: train first with `python train.py --model lm --workdir {workdir}`.")
    texts = read_reviews(TRAIN_SPLITS) if texts_fn is None else texts_fn()
    sample = spm_sample(texts, config.spm_sample_reviews)
    longest = max((len(t.encode("utf-8")) for t in sample), default=1)
    # Whole reviews are SentencePiece "sentences": its default 4192-byte limit would skip the long ones.
    tok = Tokenizer.train(sample, config.vocab_size, config.spm_model_type, max_sentence_length=longest + 1)
    tok.save(path)
    return tok


# --------------------------------------------------------------------------- encoded corpus


@dataclasses.dataclass
class EncodedCorpus:
    """Reviews as SentencePiece ids: review ``d`` is ``ids[offsets[d]:offsets[d + 1]]`` (no BOS/EOS)."""

    ids: np.ndarray      # int32 [total pieces]
    offsets: np.ndarray  # int64 [D + 1]
    words: np.ndarray    # int64 [D], whitespace words per review (EOS not included)

    def __len__(self) -> int:
        return int(self.words.shape[0])

    def doc_lengths(self) -> np.ndarray:
        """Tokens per document, BOS and EOS included: ``[D]``."""
        return np.diff(self.offsets) + 2

    def select(self, docs: npt.ArrayLike) -> "EncodedCorpus":
        """The reviews ``docs`` (indices), in that order."""
        docs = np.asarray(docs, np.int64)
        lengths = np.diff(self.offsets)[docs]
        offsets = np.zeros(len(docs) + 1, np.int64)
        offsets[1:] = np.cumsum(lengths)
        pieces = [self.ids[self.offsets[d]:self.offsets[d + 1]] for d in docs]
        ids = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
        return EncodedCorpus(ids, offsets, self.words[docs])

    def first(self, n: int) -> "EncodedCorpus":
        """The first ``n`` reviews (all if ``n`` is 0)."""
        if not n or n >= len(self):
            return self
        return EncodedCorpus(self.ids[:self.offsets[n]], self.offsets[:n + 1], self.words[:n])


def encode_corpus(tok: Tokenizer, texts: Sequence[str]) -> EncodedCorpus:
    """Encodes cleaned reviews."""
    pieces = tok.encode(texts)
    offsets = np.zeros(len(pieces) + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in pieces])
    ids = np.fromiter((i for p in pieces for i in p), np.int32, count=int(offsets[-1]))
    return EncodedCorpus(ids, offsets, np.asarray([word_count(t) for t in texts], np.int64))


def load_encoded(workdir, name: str, tok: Tokenizer, texts_fn) -> EncodedCorpus:
    """``name``'s encoded reviews, cached as ``WORKDIR/lm_cache/<name>-<model hash>-<cleanup>.npz``.

    ``texts_fn()`` returns the cleaned texts; it is called only on a cache miss.
    """
    digest = hashlib.sha256(tok.proto).hexdigest()[:16]
    path = Path(workdir) / CACHE_DIR / f"{name}-{digest}-{CLEANUP_VERSION}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return EncodedCorpus(z["ids"], z["offsets"], z["words"])
        except (OSError, ValueError, KeyError, EOFError):  # a damaged cache is derived data: rebuilt below
            pass
    corpus = encode_corpus(tok, texts_fn())
    with atomic.atomic_open(path, "wb") as f:
        np.savez(f, ids=corpus.ids, offsets=corpus.offsets, words=corpus.words)
    return corpus


# --------------------------------------------------------------------------- packing


class PackedRows:
    """Documents of a corpus, in a given order, laid end to end and cut into rows (see the module docstring).

    Rows are computed on demand from the document table (no copy of the
    stream is made), so packing a new order each epoch costs one cumulative sum.

    Args:
      corpus: the encoded reviews.
      order: document indices in stream order (a permutation or subset).
      length: ``L``; rows hold ``L + 1`` tokens.
    """

    def __init__(self, corpus: EncodedCorpus, order: npt.ArrayLike, length: int):
        self.corpus, self.order, self.length = corpus, np.asarray(order, np.int64), int(length)
        n = corpus.doc_lengths()[self.order]
        self.starts = np.zeros(len(n) + 1, np.int64)
        self.starts[1:] = np.cumsum(n)
        self.total = int(self.starts[-1])

    def __len__(self) -> int:
        """Number of rows: every stream token after the first is the target of one row."""
        return max(0, -(-(self.total - 1) // self.length))

    def rows(self, row_ids: npt.ArrayLike) -> Batch:
        """Rows ``row_ids`` (``-1``: an all-padding row) as model inputs.

        Returns:
          ``inputs``, ``targets``, ``positions``, ``segment_ids`` int32 ``[R, L]``;
          ``weights`` float32 ``[R, L]`` (1 = a counted target); ``words``
          float32 ``[R, L]`` (a review's words + 1 at its EOS target, else 0).
        """
        r = np.asarray(row_ids, np.int64)[:, None]
        s = r * self.length + np.arange(self.length + 1)[None, :]  # stream positions [R, L + 1]
        valid = (s < self.total) & (r >= 0)
        s = np.where(valid, s, 0)
        k = np.searchsorted(self.starts, s, side="right") - 1  # position in `order`
        doc = self.order[np.minimum(k, len(self.order) - 1)]
        off = s - self.starts[k]
        n = self.corpus.doc_lengths()[doc]
        piece = self.corpus.ids[np.clip(self.corpus.offsets[doc] + off - 1, 0, max(len(self.corpus.ids) - 1, 0))] \
            if len(self.corpus.ids) else np.zeros_like(s, np.int32)
        tokens = np.where(off == 0, BOS_ID, np.where(off == n - 1, EOS_ID, piece))
        tokens = np.where(valid, tokens, PAD_ID).astype(np.int32)
        segments = np.where(valid, k - k[:, :1] + 1, 0).astype(np.int32)
        row_start = np.maximum(r, 0) * self.length
        positions = np.where(valid, s - np.maximum(self.starts[k], row_start), 0).astype(np.int32)
        counted = valid[:, 1:] & (k[:, 1:] == k[:, :-1])
        at_eos = counted & (off[:, 1:] == n[:, 1:] - 1)
        words = np.where(at_eos, self.corpus.words[doc[:, 1:]] + 1, 0)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions[:, :-1],
                "segment_ids": segments[:, :-1], "weights": counted.astype(np.float32),
                "words": words.astype(np.float32)}


def epoch_rows(corpus: EncodedCorpus, length: int, seed: int, epoch: int):
    """``(PackedRows, row order)`` of one training epoch: a pure function of ``(seed, epoch)``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 27, epoch]))
    packed = PackedRows(corpus, rng.permutation(len(corpus)), length)
    return packed, rng.permutation(len(packed))


def num_rows(corpus: EncodedCorpus, length: int) -> int:
    """Rows per packing of ``corpus`` (the same for every document order)."""
    total = int(corpus.doc_lengths().sum())
    return max(0, -(-(total - 1) // length))


def train_batches(corpus: EncodedCorpus, length: int, batch_size: int, seed: int, epoch: int,
                  start_step: int = 0) -> Iterator[Batch]:
    """Full batches of shuffled packed rows, from batch ``start_step`` (resume mid-epoch)."""
    packed, order = epoch_rows(corpus, length, seed, epoch)
    for step in range(start_step, len(order) // batch_size):
        yield packed.rows(order[step * batch_size:(step + 1) * batch_size])


def eval_batches(corpus: EncodedCorpus, length: int, batch_size: int) -> Iterator[Batch]:
    """Every row of the corpus in its own order once; the last batch is filled with all-padding rows."""
    packed = PackedRows(corpus, np.arange(len(corpus)), length)
    n = len(packed)
    for start in range(0, n, batch_size):
        ids = np.arange(start, start + batch_size)
        yield packed.rows(np.where(ids < n, ids, -1))
