"""IMDB reviews: tokenizer, Keras-style vocabulary and a NumPy input pipeline.

Reads ``imdb_reviews`` with :func:`tensorflow_datasets.data_source` (ArrayRecord
files, random access, no TensorFlow needed). ``TFDS_DATA_DIR`` selects the data
directory (TFDS reads it when it is imported; the default is
``~/tensorflow_datasets``).

Choices (all documented so results are reproducible):

* Tokenisation: ``<br />`` markup becomes a space, text is lowercased and
  split on anything that is not a letter; an apostrophe *inside* a word is kept
  (``don't``, ``film's``), one at a word edge is dropped (quotes). Digits are
  dropped: numbers in reviews are mostly ratings/years that a 10k vocabulary
  cannot represent well anyway.
* Vocabulary (as ``keras.datasets.imdb``): the ``vocab_size - 3`` most frequent
  words of the **training** split, ranked by count (ties broken
  alphabetically so the vocabulary is deterministic); id ``0`` = padding,
  ``1`` = start marker, ``2`` = out-of-vocabulary, words from id ``3`` on.
* Sequences: ``[START] + words``, padded at the end with ``0`` to
  ``max_length``; the true length is kept for masking. Too-long reviews keep
  the start marker and the *last* ``max_length - 1`` words by default
  (``truncate="pre"``, as Keras ``pad_sequences`` does): reviews usually end
  with the verdict. ``truncate="post"`` keeps the first words instead.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from flax_attention.data import atomic
from flax_attention.data.tfds_source import DataUnavailableError, read_records  # noqa: F401 (re-exported)

PAD_ID, START_ID, OOV_ID = 0, 1, 2
NUM_RESERVED = 3
DATASET = "imdb_reviews"
TOKENIZER_VERSION = "v1"  # bump when tokenize() changes: it invalidates caches

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
# A word: letters, optionally joined by inner apostrophes (don't, o'neill).
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


@dataclasses.dataclass(frozen=True)
class IMDBConfig:
    """Input pipeline settings.

    Attributes:
      vocab_size: ``V``, including the 3 reserved ids (pad, start, OOV).
      max_length: padded sequence length ``S`` (start marker included).
      truncate: ``"pre"`` keeps the end of long reviews, ``"post"`` the start.
      embeddings: word-vector text file (GloVe / word2vec text, e.g. from
        ``train.py embed``) that initialises the embedding table at the start
        of training; words it lacks keep their random init ("" = none).
      freeze_embeddings: keep the embedding table fixed during training.
      init_from: ``--model transformer`` only: a ``--model lm`` workdir; the
        classifier becomes that language model plus a pooled head, starts
        from its best checkpoint and reads reviews with its SentencePiece
        vocabulary (see :mod:`flax_attention.training.init_from`) ("" = off).
      valid_examples: ``N > 0`` carves ``N`` labelled reviews from the
        training split (a fixed seeded sample, :func:`split_validation`;
        never trained on, not in the word vocabulary): every epoch is
        evaluated on them and the checkpoint selected by their accuracy, and
        the whole test split is evaluated once, after training, on the
        selected checkpoint. ``0`` (default, the original recipe): no
        validation split; every epoch is evaluated on the test split.
    """

    vocab_size: int = 10_000
    max_length: int = 250
    truncate: str = "pre"
    embeddings: str = ""
    freeze_embeddings: bool = False
    init_from: str = ""
    valid_examples: int = 0

    def __post_init__(self):
        if self.vocab_size <= NUM_RESERVED:
            raise ValueError(f"vocab_size must be > {NUM_RESERVED} (pad/start/OOV), got {self.vocab_size}.")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (start marker + a word), got {self.max_length}.")
        if self.truncate not in ("pre", "post"):
            raise ValueError(f"truncate must be 'pre' (keep the end) or 'post' (keep the start), got {self.truncate!r}.")
        if self.valid_examples < 0:
            raise ValueError(f"--valid_examples must be >= 0 (0 = no validation split), got {self.valid_examples}.")


# --------------------------------------------------------------------------- text


def _as_str(text) -> str:
    # Real TFDS records hold bytes, tfds.testing.mock_data yields str.
    if isinstance(text, (bytes, np.bytes_)):
        return text.decode("utf-8", errors="replace")
    return str(text)


def tokenize(text) -> List[str]:
    """Splits one review into lowercase words (see the module docstring)."""
    return _WORD.findall(_BR.sub(" ", _as_str(text)).lower())


class Vocabulary:
    """Keras-IMDB style word ids: 0 pad, 1 start, 2 OOV, words from 3 by frequency."""

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        self._ids: Dict[str, int] = {w: i + NUM_RESERVED for i, w in enumerate(self.words)}

    @property
    def size(self) -> int:
        """``V``: number of ids including the reserved ones."""
        return len(self.words) + NUM_RESERVED

    @classmethod
    def build(cls, texts, vocab_size: int, tokenized: bool = False) -> "Vocabulary":
        """Most frequent ``vocab_size - 3`` words of ``texts`` (ties alphabetical).

        ``tokenized=True``: ``texts`` are already word lists (skips :func:`tokenize`).
        """
        counts: collections.Counter[str] = collections.Counter()
        for t in texts:
            counts.update(t if tokenized else tokenize(t))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([w for w, _ in ranked[: vocab_size - NUM_RESERVED]])

    def encode_words(self, words: Sequence[str]) -> List[int]:
        get = self._ids.get
        return [get(w, OOV_ID) for w in words]

    def id_to_word(self, i: int) -> str:
        return {PAD_ID: "<pad>", START_ID: "<start>", OOV_ID: "<oov>"}.get(i) or self.words[i - NUM_RESERVED]

    def digest(self) -> str:
        """Short content hash; keys the encoded-array cache."""
        return hashlib.sha256("\n".join(self.words).encode()).hexdigest()[:16]

    def save(self, path) -> None:
        payload = {"format": "keras_imdb", "tokenizer": TOKENIZER_VERSION, "reserved": ["<pad>", "<start>", "<oov>"],
                   "words": self.words}
        atomic.write_text(path, json.dumps(payload))

    @classmethod
    def load(cls, path) -> "Vocabulary":
        try:
            payload = json.loads(Path(path).read_text())
            if not isinstance(payload, dict) or not isinstance(payload.get("words"), list):
                raise ValueError(f"expected a JSON object with a 'words' list, got {type(payload).__name__}")
            if payload.get("tokenizer") != TOKENIZER_VERSION:
                raise ValueError(f"tokenizer version {payload.get('tokenizer')!r} != {TOKENIZER_VERSION!r}")
            if not all(isinstance(w, str) for w in payload["words"]):
                raise ValueError("its 'words' must all be strings")
            return cls(payload["words"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Never deleted here: the workdir's checkpoints were trained with these ids.
            raise ValueError(f"cannot read vocabulary {path} ({e}); restore it (the checkpoints in that workdir "
                             "need its word ids), or use a fresh --workdir.") from None


def kept_words(text, config: IMDBConfig) -> List[str]:
    """The words :func:`encode` keeps for ``text`` (after truncation), start marker first."""
    words = tokenize(text)
    s = config.max_length
    words = words[-(s - 1):] if config.truncate == "pre" else words[: s - 1]
    return ["<start>"] + words


def encode(texts, vocab: Vocabulary, config: IMDBConfig, tokenized: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Encodes texts (or word lists, ``tokenized=True``) into padded ids.

    Returns:
      ``(tokens int32 [B, S], lengths int32 [B])`` with ``S = config.max_length``;
      ``tokens[b, lengths[b]:] == 0`` and ``tokens[b, 0] == START_ID``.
    """
    texts = list(texts)
    s = config.max_length
    tokens = np.zeros((len(texts), s), np.int32)
    lengths = np.zeros((len(texts),), np.int32)
    for b, t in enumerate(texts):
        ids = vocab.encode_words(t if tokenized else tokenize(t))
        ids = ids[-(s - 1):] if config.truncate == "pre" else ids[: s - 1]
        tokens[b, 0] = START_ID
        tokens[b, 1: len(ids) + 1] = ids
        lengths[b] = len(ids) + 1
    return tokens, lengths


# --------------------------------------------------------------------------- TFDS


def load_split(split: str) -> Tuple[List, np.ndarray]:
    """Reads all ``(texts, labels)`` of one split; downloads/prepares if possible."""
    records = read_records(DATASET, split)
    texts = [r["text"] for r in records]
    labels = np.asarray([int(r["label"]) for r in records], np.int32)
    return texts, labels


@dataclasses.dataclass
class EncodedSplit:
    """One split, fully encoded in memory: ``tokens [B, S]``, ``lengths [B]``, ``labels [B]``."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_vocabulary(workdir, config: IMDBConfig, train_texts=None, tokenized: bool = False) -> Vocabulary:
    """Loads ``workdir/vocab.json`` or builds it from the training split and saves it."""
    path = Path(workdir) / "vocab.json"
    if path.exists():
        vocab = Vocabulary.load(path)
        if vocab.size > config.vocab_size:
            raise ValueError(
                f"{path} has {vocab.size} ids but --vocab_size is {config.vocab_size}; "
                "use the vocab_size it was built with, or a fresh --workdir.")
        return vocab
    if train_texts is None:
        train_texts, _ = load_split("train")
    vocab = Vocabulary.build(train_texts, config.vocab_size, tokenized=tokenized)
    vocab.save(path)
    return vocab


def load_encoded(split: str, vocab: Vocabulary, config: IMDBConfig, cache_dir=None, texts_labels=None,
                 tokenized: bool = False) -> EncodedSplit:
    """Encoded split, cached as ``.npz`` keyed by vocabulary hash and pipeline settings.

    ``texts_labels``: already loaded ``(texts, labels)`` (word lists if ``tokenized``).
    """
    key = f"{DATASET}-{split}-{vocab.digest()}-{TOKENIZER_VERSION}-{config.max_length}-{config.truncate}"
    path = Path(cache_dir) / f"{key}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        with np.load(path) as z:
            return EncodedSplit(z["tokens"], z["lengths"], z["labels"])
    texts, labels = texts_labels if texts_labels is not None else load_split(split)
    tokens, lengths = encode(texts, vocab, config, tokenized=tokenized and texts_labels is not None)
    if path is not None:
        with atomic.atomic_open(path, "wb") as f:
            np.savez(f, tokens=tokens, lengths=lengths, labels=labels)
    return EncodedSplit(tokens, lengths, labels)


_VALID_SEED = 20_110_601  # fixed: the validation reviews depend on --valid_examples only, never on --seed


def split_validation(num_examples: int, valid_examples: int, *, seed: int = _VALID_SEED,
                     flag: str = "--valid_examples", what: str = "labelled training reviews",
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """``(train indices, validation indices)`` into the training split: sorted, disjoint, a fixed seeded draw.

    ``seed`` fixes the draw (a function of the two counts only); ``flag`` and
    ``what`` name the option and the examples in the error.

    Raises:
      ValueError: ``valid_examples`` leaves no example to train on.
    """
    if valid_examples >= num_examples:
        raise ValueError(f"{flag} {valid_examples} leaves none of the {num_examples} {what} to train on; "
                         f"lower it (e.g. {flag} {max(1, num_examples // 10)}).")
    valid = np.sort(np.random.default_rng(seed).choice(num_examples, valid_examples, replace=False))
    return np.setdiff1d(np.arange(num_examples), valid), valid


def select(data: EncodedSplit, idx) -> EncodedSplit:
    """The examples ``idx`` of an encoded split."""
    return EncodedSplit(data.tokens[idx], data.lengths[idx], data.labels[idx])


def carve_validation(train: EncodedSplit, valid_examples: int) -> Tuple[EncodedSplit, EncodedSplit]:
    """``(train, validation)``: the encoded training split less / only its :func:`split_validation` reviews."""
    keep, valid = split_validation(len(train), valid_examples)
    return select(train, keep), select(train, valid)


def prepare(workdir, config: IMDBConfig) -> Tuple[Vocabulary, EncodedSplit, EncodedSplit]:
    """Vocabulary + encoded (whole) train/test splits, everything cached under ``workdir``.

    With ``valid_examples`` the vocabulary is built from the training reviews
    outside the validation set (:func:`carve_validation` then splits ``train``).
    """
    cache = Path(workdir) / "data_cache"
    vocab_path = Path(workdir) / "vocab.json"
    train_raw, vocab_texts = None, None
    if not vocab_path.exists():  # tokenise the training split once, for vocabulary and encoding
        texts, labels = load_split("train")
        train_raw = ([tokenize(t) for t in texts], labels)
        vocab_texts = train_raw[0]
        if config.valid_examples:
            vocab_texts = [vocab_texts[i] for i in split_validation(len(labels), config.valid_examples)[0]]
    vocab = load_vocabulary(workdir, config, vocab_texts, tokenized=True)
    train = load_encoded("train", vocab, config, cache, train_raw, tokenized=True)
    test = load_encoded("test", vocab, config, cache)
    return vocab, train, test


# --------------------------------------------------------------------------- batches


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Shuffle order of one epoch; a pure function of (seed, epoch) so resuming replays it."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(data: EncodedSplit, batch_size: int, seed: int, epoch: int, start_step: int = 0
                  ) -> Iterator[Dict[str, np.ndarray]]:
    """Shuffled full batches of one epoch (the last partial batch is dropped).

    Yields dicts ``tokens [B, S]``, ``lengths [B]``, ``labels [B]``, ``weights [B]``,
    starting at batch ``start_step`` (to resume mid-epoch).
    """
    order = epoch_permutation(len(data), seed, epoch)
    for step in range(start_step, len(data) // batch_size):
        idx = order[step * batch_size: (step + 1) * batch_size]
        yield {"tokens": data.tokens[idx], "lengths": data.lengths[idx], "labels": data.labels[idx],
               "weights": np.ones((batch_size,), np.float32)}


def steps_per_epoch(data: EncodedSplit, batch_size: int) -> int:
    return len(data) // batch_size


def eval_batches(data: EncodedSplit, batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
    """Every example exactly once, in order; the last batch is padded with weight-0 rows.

    Padding rows are copies of example 0 with length 1 (valid input for the
    model); their weight 0 keeps them out of every metric.
    """
    n = len(data)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        pad = batch_size - idx.size
        weights = np.concatenate([np.ones(idx.size, np.float32), np.zeros(pad, np.float32)])
        idx = np.concatenate([idx, np.zeros(pad, idx.dtype)])
        yield {"tokens": data.tokens[idx], "lengths": data.lengths[idx], "labels": data.labels[idx],
               "weights": weights}
