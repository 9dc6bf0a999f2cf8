"""Synthetic sequence-to-sequence tasks: copy, reverse, sort, dedup, add.

Everything is generated from a seed (no download), as NumPy arrays with
static shapes so a jitted train step never retraces.

Token ids: ``PAD_ID = 0``, ``BOS_ID = 1``, ``EOS_ID = 2``; the task symbols
are ``3 .. 3 + num_symbols - 1`` (``vocab_size = 3 + num_symbols``).

A batch is a dict of int32 arrays (training and held-out batches are padded
to ``max_len``, a by-length set to its longest length, so short tasks do not
pay for the long test lengths):

* ``src``     ``[B, S]`` source symbols, right-padded with ``PAD_ID``;
* ``tgt_in``  ``[B, T]`` ``BOS + target`` (the decoder input, teacher forcing);
* ``tgt_out`` ``[B, T]`` ``target + EOS`` (what the decoder must predict);
* ``length``  ``[B]``    the source length (for exact match by length).

Random streams: training batch ``i`` draws from ``SeedSequence([seed, 0, i])``
(so a run can resume at any step and batches never depend on batch size of
earlier steps), the held-out test set from ``[seed, 1]`` and the
longer-than-training set of length ``L`` from ``[seed, 2, L]``. Short
sequences are few (10 of length 1 over 10 symbols), so the test set can
contain strings seen in training; long ones practically never repeat.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np

from flax_attention.linen.decoding import BOS_ID, EOS_ID, PAD_ID  # noqa: F401  (the decoders' token ids)

NUM_SPECIAL = 3

Batch = Dict[str, np.ndarray]


def _copy(rng, x):
    return x


def _reverse(rng, x):
    return x[::-1]


def _sort(rng, x):
    return np.sort(x)


def _dedup(rng, x):
    # Keep the first occurrence of every symbol, in order of appearance.
    _, first = np.unique(x, return_index=True)
    return x[np.sort(first)]


# The target of one source, per task (the rng is unused by these four).
TARGETS: Dict[str, Callable[[Optional[np.random.Generator], np.ndarray], np.ndarray]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "dedup": _dedup,
}
TASKS = (*TARGETS, "add")  # "add" builds its targets with its sources (_add_example)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """A synthetic task and its length ranges.

    Attributes:
      name: one of ``copy``, ``reverse``, ``sort``, ``dedup``, ``add``.
      num_symbols: task symbols (``add`` uses digits 0-9 plus a ``+``
        separator, so it needs ``num_symbols >= 11``).
      min_len: shortest training source.
      max_len: longest training source.
      test_max_len: longest source of the longer-than-training test sets.
      seed: root seed of all random streams.
    """

    name: str = "reverse"
    num_symbols: int = 10
    min_len: int = 1
    max_len: int = 20
    test_max_len: int = 30
    seed: int = 0

    def __post_init__(self):
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; choose one of {sorted(TASKS)}.")
        if not 1 <= self.min_len <= self.max_len <= self.test_max_len:
            raise ValueError(
                "need 1 <= min_len <= max_len <= test_max_len, got "
                f"{self.min_len}, {self.max_len}, {self.test_max_len}."
            )
        if self.num_symbols < 1:
            raise ValueError(f"num_symbols must be >= 1, got {self.num_symbols}.")
        if self.name == "add":
            if self.num_symbols < 11:
                raise ValueError("task 'add' needs num_symbols >= 11 (digits 0-9 and '+').")
            if self.min_len < 3:
                raise ValueError("task 'add' needs min_len >= 3 ('a+b' has at least 3 symbols).")

    @property
    def vocab_size(self) -> int:
        """``V``: specials plus symbols (the model's input and output vocabulary)."""
        return NUM_SPECIAL + self.num_symbols

    @property
    def longest_target(self) -> int:
        """Decoder positions needed by the longest test source (target + EOS)."""
        return self.test_max_len + 1

    # The seq2seq trainer reads data through these two methods (a translation
    # task, flax_attention.data.translate.TranslateConfig, has the same pair).
    def train_batch(self, batch_size: int, step: int) -> "Batch":
        return train_batch(self, batch_size, step)

    def test_set(self, num_examples: int) -> "Batch":
        return test_set(self, num_examples)


def _add_example(rng: np.random.Generator, length: int) -> Tuple[np.ndarray, np.ndarray]:
    """``a + b`` as digit symbols (most significant first); the target is the sum's digits."""
    len_a = int(rng.integers(1, length - 1))
    len_b = length - 1 - len_a

    def number(n):
        digits = rng.integers(0, 10, size=n)
        if n > 1:
            digits[0] = rng.integers(1, 10)  # no leading zeros
        return digits

    a, b = number(len_a), number(len_b)
    total = int("".join(map(str, a))) + int("".join(map(str, b)))
    out = np.array([int(c) for c in str(total)])
    plus = 10
    src = np.concatenate([a, [plus], b])
    return src + NUM_SPECIAL, out + NUM_SPECIAL


def target_for(config: TaskConfig, src_symbols: np.ndarray) -> np.ndarray:
    """The target of one unpadded source (symbol ids), for any task but ``add``.

    Used by the tests as the task's definition.
    """
    if config.name == "add":
        raise ValueError("target_for does not cover 'add'; its targets are built with the source.")
    return np.asarray(TARGETS[config.name](None, np.asarray(src_symbols)))


def sample_pairs(
    config: TaskConfig, rng: np.random.Generator, lengths: Iterable[int]
) -> list[Tuple[np.ndarray, np.ndarray]]:
    """One ``(src, tgt)`` pair of unpadded symbol ids per requested source length."""
    pairs = []
    for length in lengths:
        length = int(length)
        if config.name == "add":
            pairs.append(_add_example(rng, length))
            continue
        src = rng.integers(NUM_SPECIAL, config.vocab_size, size=length)
        pairs.append((src, TARGETS[config.name](rng, src)))
    return pairs


def pad_batch(pairs: Sequence[Tuple[np.ndarray, np.ndarray]], src_len: int, tgt_len: int) -> Batch:
    """Packs pairs into padded ``src``/``tgt_in``/``tgt_out``/``length`` arrays.

    Raises:
      ValueError: when a source is longer than ``src_len`` or a target plus
        EOS longer than ``tgt_len``.
    """
    n = len(pairs)
    src = np.full((n, src_len), PAD_ID, np.int32)
    tgt_in = np.full((n, tgt_len), PAD_ID, np.int32)
    tgt_out = np.full((n, tgt_len), PAD_ID, np.int32)
    length = np.zeros((n,), np.int32)
    for i, (s, t) in enumerate(pairs):
        if len(s) > src_len or len(t) + 1 > tgt_len:
            raise ValueError(
                f"example {i} has source length {len(s)} / target length {len(t)}, more than "
                f"src_len={src_len} / tgt_len-1={tgt_len - 1}; raise TaskConfig.test_max_len."
            )
        src[i, : len(s)] = s
        tgt_in[i, 0] = BOS_ID
        tgt_in[i, 1 : len(t) + 1] = t
        tgt_out[i, : len(t)] = t
        tgt_out[i, len(t)] = EOS_ID
        length[i] = len(s)
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out, "length": length}


def train_batch(config: TaskConfig, batch_size: int, step: int) -> Batch:
    """Training batch number ``step``: lengths uniform in ``[min_len, max_len]``."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0, int(step)]))
    lengths = rng.integers(config.min_len, config.max_len + 1, size=batch_size)
    return pad_batch(sample_pairs(config, rng, lengths), config.max_len, config.max_len + 1)


def train_batches(config: TaskConfig, batch_size: int, start_step: int = 0) -> Iterator[Batch]:
    """Endless, resumable stream of :func:`train_batch` from ``start_step`` on."""
    step = start_step
    while True:
        yield train_batch(config, batch_size, step)
        step += 1


def test_set(config: TaskConfig, num_examples: int) -> Batch:
    """Held-out set at the training lengths (every length equally often), own seed stream."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
    span = np.arange(config.min_len, config.max_len + 1)
    lengths = np.resize(span, num_examples)
    return pad_batch(sample_pairs(config, rng, lengths), config.max_len, config.max_len + 1)


def length_test_set(config: TaskConfig, lengths: Sequence[int], per_length: int) -> Batch:
    """``per_length`` examples at each given source length (e.g. longer than training)."""
    parts = []
    for length in lengths:
        if length > config.test_max_len:
            raise ValueError(f"length {length} > test_max_len={config.test_max_len}; raise test_max_len.")
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 2, int(length)]))
        parts.extend(sample_pairs(config, rng, [length] * per_length))
    longest = max(lengths)
    return pad_batch(parts, longest, longest + 1)


def decode_symbols(tokens: np.ndarray) -> list[list[int]]:
    """Cuts decoder output ``[B, L]`` at the first EOS -> one list of ids per row.

    Nothing else is stripped, so a stray PAD/BOS in a prediction stays visible.
    """
    out = []
    for row in np.asarray(tokens).tolist():
        out.append(row[: row.index(EOS_ID)] if EOS_ID in row else row)
    return out
