"""Word vectors in the usual text format (GloVe / word2vec ``.txt``): read, match, write.

Format, one vector per line, fields separated by spaces::

    [count dim]            <- optional word2vec header: two integers
    word v1 v2 ... v_dim
    ...

GloVe files have no header; word2vec's ``-binary 0`` output and gensim's
``save_word2vec_format(binary=False)`` have one. Both are read by
:func:`load_word_vectors`; :func:`save_word_vectors` writes the header by
default (tools that expect GloVe skip nothing, so pass ``header=False`` for
them).

Reading streams the file line by line: GloVe files are gigabytes, and only the
lines whose word is in our vocabulary are converted to numbers (every line's
field count is still checked, so a truncated or mixed-dimension file fails
with the offending line number instead of loading half a table).

This module is NumPy-only; putting the rows into a model and freezing them is
:mod:`flax_attention.embed.pretrained`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from flax_attention.data.imdb import NUM_RESERVED, PAD_ID, START_ID, Vocabulary
from flax_attention.data import atomic

VocabLike = Union[Vocabulary, Mapping[str, int], Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Coverage:
    """How much of a vocabulary a vector file covers.

    Attributes:
      path: the vector file.
      dim: vector size ``D``.
      vocab_words: number of word ids that could be matched (reserved ids excluded).
      found_words: how many of them the file has.
      file_vectors: vectors (data lines) in the file.
      token_fraction: fraction of training tokens (counts given to
        :func:`load_word_vectors`) whose id was found; ``None`` without counts.
      lowercase_matches: ids filled from a differently-cased word of the file
        (``Good`` for ``good``) because the exact form was absent.
    """

    path: str
    dim: int
    vocab_words: int
    found_words: int
    file_vectors: int
    token_fraction: Optional[float] = None
    lowercase_matches: int = 0

    @property
    def word_fraction(self) -> float:
        """Fraction of vocabulary words found in the file."""
        return self.found_words / max(self.vocab_words, 1)

    def summary(self) -> str:
        """One line for logs, e.g. ``vectors.txt: 9812/9997 words (98.1%), 99.6% of tokens``."""
        s = (f"{self.path}: {self.found_words}/{self.vocab_words} vocabulary words found "
             f"({100 * self.word_fraction:.1f}%), {self.dim}-dim, {self.file_vectors} vectors in the file")
        if self.token_fraction is not None:
            s += f"; {100 * self.token_fraction:.1f}% of training tokens covered"
        return s


def _word_ids(vocab: VocabLike) -> Tuple[Dict[str, int], int, np.ndarray]:
    """``(word -> id, number of ids V, bool [V] ids that are words)``."""
    if isinstance(vocab, Vocabulary):
        ids = {w: i + NUM_RESERVED for i, w in enumerate(vocab.words)}
        size = vocab.size
    elif isinstance(vocab, Mapping):
        ids = {str(w): int(i) for w, i in vocab.items()}
        size = max(ids.values(), default=-1) + 1
    else:  # a sequence: the word at position i has id i
        ids = {}
        for i, w in enumerate(vocab):
            ids.setdefault(str(w), i)
        size = len(vocab)
    is_word = np.zeros((size,), bool)
    is_word[list(ids.values())] = True
    return ids, size, is_word


def token_counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Counts per id of encoded text, for :func:`load_word_vectors`'s token coverage.

    Padding and start markers are not words and count 0; out-of-vocabulary
    tokens do count (no vector file can cover them).

    Args:
      tokens: int ids of any shape (e.g. an encoded split's ``tokens [B, S]``).
      vocab_size: ``V``.

    Returns:
      int64 ``[V]``.
    """
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=vocab_size).astype(np.int64)
    counts[[PAD_ID, START_ID]] = 0
    return counts


def _fail(path, line_no: int, what: str, fix: str) -> ValueError:
    return ValueError(f"{path}, line {line_no}: {what}. Fix: {fix}")


def _is_header(fields) -> bool:
    return len(fields) == 2 and all(f.isdigit() for f in fields)


def load_word_vectors(path, vocab: VocabLike, dim: Optional[int] = None,
                      counts: Optional[np.ndarray] = None, lowercase_fallback: bool = True,
                      check_all: bool = False) -> Tuple[np.ndarray, np.ndarray, Coverage]:
    """Reads the vectors of ``vocab``'s words from a GloVe / word2vec text file.

    Args:
      path: the vector file (see the module docstring for the format).
      vocab: a :class:`~flax_attention.data.imdb.Vocabulary` (ids from 3 on,
        0/1/2 reserved), a ``{word: id}`` mapping, or a sequence of words
        whose position is the id.
      dim: expected vector size ``D`` (the model's ``embed_dim``); ``None``
        accepts the file's.
      counts: optional int ``[V]`` token counts per id (e.g. of the training
        split) to report the fraction of tokens covered.
      lowercase_fallback: a vocabulary word absent from the file in exactly
        this form takes the vector of its first differently-cased occurrence
        (word2vec's GoogleNews vectors are cased, our vocabulary is lowercase).
      check_all: also parse the numbers of lines whose word is not in
        ``vocab`` (validates a whole file before a vocabulary exists).

    Returns:
      ``(rows float32 [V, D], found bool [V], coverage)``. Rows of ids not
      found (and of reserved ids) are zero: write only ``rows[found]`` into a
      model (:func:`flax_attention.embed.pretrained.init_embedding` does) so
      the others keep their random initialisation.

    Raises:
      ValueError: one line naming the file, the line number and the fix, for
        an empty file, a wrong dimension, a non-numeric or non-finite value,
        or a header whose count disagrees with the file.
      FileNotFoundError: no such file.
    """
    ids, size, is_word = _word_ids(vocab)
    lower_ids: Dict[str, int] = {}
    if lowercase_fallback:
        for w, j in ids.items():
            lower_ids.setdefault(w.lower(), j)
    rows: Optional[np.ndarray] = None
    found = np.zeros((size,), bool)
    fallback: Dict[int, np.ndarray] = {}
    header_count, file_dim, n_vectors, line_no = None, dim, 0, 0
    # Binary mode: splitting bytes on ASCII whitespace is fast, and only the
    # word is decoded (errors="replace": a stray byte in some other word of a
    # multi-GB file must not abort the load).
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            fields = raw.split()
            if not fields:
                continue  # blank lines (e.g. a trailing newline) carry nothing
            if line_no == 1 and _is_header(fields):
                header_count, header_dim = int(fields[0]), int(fields[1])
                if dim is not None and header_dim != dim:
                    raise _fail(path, 1, f"header says {header_dim}-dim vectors, the model expects {dim}",
                                f"set the embedding size to {header_dim}, or use a {dim}-dim vector file")
                file_dim = header_dim
                continue
            if file_dim is None:
                file_dim = len(fields) - 1  # the first vector fixes the dimension
                if file_dim < 1:
                    raise _fail(path, line_no, f"{raw[:60]!r} is a word without numbers",
                                "each line must be 'word v1 v2 ...' (GloVe / word2vec text format)")
            if len(fields) != file_dim + 1:
                word, nums = _split_spaced_word(fields, file_dim)
                if word is None:
                    got = len(fields) - 1
                    if n_vectors == 0 and dim is not None:
                        raise _fail(path, line_no, f"{got}-dim vectors, the model expects {dim}",
                                    f"set the embedding size to {got}, or use a {dim}-dim vector file")
                    raise _fail(path, line_no, f"{got} values where the file's vectors have {file_dim} "
                                f"({raw[:60]!r}...)", "the file is truncated or mixes formats; re-create it")
            else:
                word, nums = fields[0], fields[1:]
            n_vectors += 1
            if check_all:
                _parse(nums, path, line_no)
            w = word.decode("utf-8", errors="replace")
            i = ids.get(w)
            if i is None and lowercase_fallback:
                i = lower_ids.get(w.lower())
                if i is None or found[i] or i in fallback:
                    continue
                fallback[i] = _parse(nums, path, line_no)
                continue
            if i is None or found[i]:
                continue  # not ours, or a duplicate (the first vector wins, as in gensim)
            if rows is None:
                rows = np.zeros((size, file_dim), np.float32)
            rows[i] = _parse(nums, path, line_no)
            found[i] = True
    if n_vectors == 0:
        raise _fail(path, max(line_no, 1), "the file has no vectors" + (" (only a header)" if header_count else ""),
                    "pass a GloVe / word2vec text file ('word v1 v2 ...' per line); "
                    "`train.py embed --out PATH` writes one")
    if header_count is not None and header_count != n_vectors:
        raise _fail(path, line_no, f"the header announces {header_count} vectors but the file has {n_vectors}",
                    "the file is truncated (re-download / re-create it), or fix the header's count")
    assert file_dim is not None  # set by the header or the first vector (n_vectors > 0 here)
    if rows is None:
        rows = np.zeros((size, file_dim), np.float32)
    lower_used = 0
    for i, vec in fallback.items():
        if not found[i]:
            rows[i], found[i] = vec, True
            lower_used += 1
    token_fraction = None
    if counts is not None:
        counts = np.asarray(counts, np.float64)[:size]
        token_fraction = float(counts[found[:counts.size]].sum() / max(counts.sum(), 1.0))
    coverage = Coverage(str(path), int(file_dim), int(is_word.sum()), int(found.sum()), n_vectors,
                        token_fraction, lower_used)
    return rows, found, coverage


def _split_spaced_word(fields, dim: int):
    """``(word, numbers)`` for a line whose word itself contains spaces, else ``(None, None)``.

    A few GloVe 840B lines have such words (``". . ."``): the last ``dim``
    fields are the vector when there are more fields than ``dim + 1`` and the
    second field is not a number.
    """
    if len(fields) <= dim + 1:
        return None, None
    try:
        float(fields[1])
        return None, None  # a number: the line really has too many values
    except ValueError:
        pass
    try:  # rare lines: checking that the tail is numeric is cheap and tells them from garbage
        np.array(fields[-dim:], dtype=np.float32)
    except ValueError:
        return None, None
    return b" ".join(fields[:-dim]), fields[-dim:]


def _parse(nums, path, line_no: int) -> np.ndarray:
    try:
        vec = np.array(nums, dtype=np.float32)
    except ValueError as e:
        raise _fail(path, line_no, f"non-numeric value ({e})", "the values must be decimal numbers") from None
    if not np.isfinite(vec).all():
        raise _fail(path, line_no, "NaN or infinite value", "re-create the vectors (the training diverged?)")
    return vec


def save_word_vectors(path, words: Sequence[str], matrix: np.ndarray, header: bool = True) -> Path:
    """Writes ``words[i]`` with ``matrix[i]`` in the word2vec / GloVe text format.

    Values are written with 9 significant digits, enough for every float32 to
    read back bit-identical. The file appears atomically (a temporary file is
    renamed), so a crash never leaves a half-written vector file.

    Args:
      path: output file; parent directories are created.
      words: ``N`` words without whitespace.
      matrix: float ``[N, D]``.
      header: write the word2vec header line ``N D`` (``False``: GloVe style).

    Returns:
      ``path`` as a :class:`~pathlib.Path`.
    """
    matrix = np.asarray(matrix, np.float32)
    words = [str(w) for w in words]
    if matrix.ndim != 2 or matrix.shape[0] != len(words):
        raise ValueError(f"matrix must be [len(words)={len(words)}, D], got shape {matrix.shape}.")
    for w in words:
        if not w or len(w.split()) != 1 or w != w.strip():
            raise ValueError(f"word {w!r} is empty or contains whitespace; the text format cannot hold it.")
    if not np.isfinite(matrix).all():
        raise ValueError("matrix has NaN/inf values; refusing to write vectors nobody can use.")
    path = Path(path)
    fmt = " ".join(["%.9g"] * matrix.shape[1])
    with atomic.atomic_open(path, "w") as f:
        if header:
            f.write(f"{matrix.shape[0]} {matrix.shape[1]}\n")
        for w, row in zip(words, matrix.tolist()):
            f.write(f"{w} {fmt % tuple(row)}\n")
    return path
