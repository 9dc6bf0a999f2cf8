"""A TFDS translation dataset as byte-level seq2seq batches (``train.py --model seq2seq --task translate``).

Any TFDS dataset whose records map two language codes to sentences works
(``ted_hrlr_translate/pt_to_en``, ``wmt14_translate/de-en``, ...); the source
and target languages are the dataset's ``supervised_keys``.

Vocabulary: UTF-8 bytes, so nothing has to be learned or stored and any
language works: token ``= byte + 3`` (``PAD_ID 0``, ``BOS_ID 1``, ``EOS_ID 2``
as in :mod:`flax_attention.data.tasks`), ``vocab_size = 259``. Sentences longer
than ``max_bytes`` are cut (a training choice; the BLEU references are always
the full test sentences).

Batches have the layout of :mod:`flax_attention.data.tasks` (``src``,
``tgt_in``, ``tgt_out``, ``length``). Training batch ``i`` samples examples
uniformly with replacement from ``SeedSequence([seed, 0, i])``, so a resumed
run sees the same batches; the held-out set is the start of the test split.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Sequence, Tuple

import numpy as np

from flax_attention.data.tasks import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID
from flax_attention.data.tfds_source import read_records

Batch = Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TranslateConfig:
    """A byte-level translation task read from TFDS.

    Attributes:
      dataset: TFDS name with config, e.g. ``ted_hrlr_translate/pt_to_en``.
      max_bytes: longest source/target kept, in bytes (longer ones are cut).
      seed: seeds the training batches.
      train_split: TFDS split to train on.
      test_split: TFDS split for held-out metrics and BLEU.
      name: always ``"translate"`` (tells saved configs apart from synthetic tasks).
    """

    dataset: str = "ted_hrlr_translate/pt_to_en"
    max_bytes: int = 128
    seed: int = 0
    train_split: str = "train"
    test_split: str = "test"
    name: str = "translate"

    def __post_init__(self):
        if self.max_bytes < 1:
            raise ValueError(f"--max_bytes must be >= 1, got {self.max_bytes}.")
        if self.name != "translate":
            raise ValueError(f"TranslateConfig.name must be 'translate', got {self.name!r}.")

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + 256

    @property
    def longest_target(self) -> int:
        """Decoder positions: ``max_bytes`` + EOS."""
        return self.max_bytes + 1

    def train_batch(self, batch_size: int, step: int) -> Batch:
        data = encoded_split(self, self.train_split)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0, int(step)]))
        idx = rng.integers(0, len(data["src"]), size=batch_size)
        return {k: v[idx] for k, v in data.items()}

    def test_set(self, num_examples: int) -> Batch:
        data = encoded_split(self, self.test_split)
        return {k: v[:num_examples] for k, v in data.items()}

    def references(self) -> Tuple[List[str], List[str]]:
        """Full (uncut) ``(sources, targets)`` of the test split, as text."""
        return sentence_pairs(self, self.test_split)


def _text(value) -> str:
    # Real TFDS records hold bytes, tfds.testing.mock_data yields str.
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def encode_bytes(text: str, max_bytes: int) -> np.ndarray:
    """UTF-8 bytes of ``text`` (cut at ``max_bytes``) as token ids ``byte + 3``."""
    raw = text.encode("utf-8")[:max_bytes]
    return np.frombuffer(raw, np.uint8).astype(np.int32) + NUM_SPECIAL


def decode_bytes(tokens: Sequence[int]) -> str:
    """Token ids -> text; stops at EOS, skips PAD/BOS, replaces invalid UTF-8 (a cut character)."""
    out = bytearray()
    for t in tokens:
        t = int(t)
        if t == EOS_ID:
            break
        if t >= NUM_SPECIAL:
            out.append(t - NUM_SPECIAL)
    return out.decode("utf-8", "replace")


def _languages(dataset: str, record: Dict) -> Tuple[str, str]:
    import tensorflow_datasets as tfds

    keys = tfds.builder(dataset).info.supervised_keys
    if not keys or len(keys) != 2 or any(k not in record for k in keys):
        raise ValueError(f"{dataset} has no (source, target) supervised_keys naming two record fields "
                         f"(got {keys}, fields {sorted(record)}); choose a TFDS translation dataset such as "
                         "ted_hrlr_translate/pt_to_en.")
    return keys[0], keys[1]


@functools.lru_cache(maxsize=4)
def sentence_pairs(config: TranslateConfig, split: str) -> Tuple[List[str], List[str]]:
    """``(sources, targets)`` text of one split (read once per process)."""
    records = read_records(config.dataset, split)
    if not records:
        raise ValueError(f"{config.dataset} split {split!r} is empty.")
    src_key, tgt_key = _languages(config.dataset, records[0])
    return [_text(r[src_key]) for r in records], [_text(r[tgt_key]) for r in records]


@functools.lru_cache(maxsize=4)
def encoded_split(config: TranslateConfig, split: str) -> Batch:
    """Padded int32 ``src [M, max_bytes]``, ``tgt_in``/``tgt_out [M, max_bytes + 1]``, ``length [M]``."""
    sources, targets = sentence_pairs(config, split)
    n, s = len(sources), config.max_bytes
    out = {"src": np.full((n, s), PAD_ID, np.int32), "tgt_in": np.full((n, s + 1), PAD_ID, np.int32),
           "tgt_out": np.full((n, s + 1), PAD_ID, np.int32), "length": np.zeros((n,), np.int32)}
    for i, (a, b) in enumerate(zip(sources, targets)):
        x, y = encode_bytes(a, s), encode_bytes(b, s)
        out["src"][i, :len(x)] = x
        out["tgt_in"][i, 0], out["tgt_in"][i, 1:len(y) + 1] = BOS_ID, y
        out["tgt_out"][i, :len(y)], out["tgt_out"][i, len(y)] = y, EOS_ID
        out["length"][i] = len(x)
    return out
