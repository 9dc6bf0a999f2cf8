"""Skip-gram training pairs from token id sequences, generated in NumPy (host side).

Follows word2vec (Mikolov et al. 2013, "Distributed Representations of Words
and Phrases and their Compositionality", and the reference C code):

* **Rare / reserved ids are removed first** (word2vec's ``min_count``): ids
  below ``first_word_id`` (IMDB: pad 0, start 1, out-of-vocabulary 2) never
  occupy a window position, so words around an unknown word become neighbours.
* **Subsampling of frequent words** (§2.3): a token of a word with corpus
  frequency ``f`` is kept with probability ``min(1, sqrt(t/f) + t/f)``, the
  formula of the C code (the paper's discard probability is ``1 - sqrt(t/f)``;
  the extra ``t/f`` keeps a few more mid-frequency tokens). It removes most
  "the"/"a"/"and" tokens: faster, and better vectors for the remaining words.
* **Dynamic window**: each kept centre draws its window ``b`` uniformly from
  ``1..window`` and pairs with the ``b`` kept tokens on each side *in the same
  review* — nearer words are sampled more often (weights ``(window-d+1)/window``).
* **Noise distribution** for negative sampling: unigram counts to the power
  0.75 (§2.2).

Pairs are shuffled within chunks of about ``chunk_tokens`` tokens (of shuffled
reviews), so a batch mixes many reviews while memory stays bounded.
Everything is a pure function of the random generator passed in.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import numpy as np


def flatten(sequences: Sequence[np.ndarray], first_word_id: int) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenates sequences, dropping ids ``< first_word_id``.

    Returns:
      ``(tokens int32 [N], offsets int64 [R + 1])``: sequence ``r`` is
      ``tokens[offsets[r]:offsets[r + 1]]``.
    """
    kept: List[np.ndarray] = []
    lengths = np.zeros((len(sequences),), np.int64)
    for r, seq in enumerate(sequences):
        seq = np.asarray(seq, np.int32)
        seq = seq[seq >= first_word_id]
        kept.append(seq)
        lengths[r] = seq.size
    tokens = np.concatenate(kept) if kept else np.zeros((0,), np.int32)
    return tokens, np.concatenate([[0], np.cumsum(lengths)])


def keep_probability(counts: np.ndarray, sample: float) -> np.ndarray:
    """Per-id probability of keeping a token: ``min(1, sqrt(t/f) + t/f)``; 1 everywhere if ``t <= 0``.

    Args:
      counts: int ``[V]`` token counts.
      sample: the threshold ``t`` (word2vec's ``-sample``; 1e-3 .. 1e-5).
    """
    counts = np.asarray(counts, np.float64)
    if sample <= 0:
        return np.ones(counts.shape, np.float64)
    ratio = sample * counts.sum() / np.maximum(counts, 1.0)  # t / f
    return np.minimum(1.0, np.sqrt(ratio) + ratio)


def noise_distribution(counts: np.ndarray, power: float = 0.75) -> np.ndarray:
    """Negative-sampling distribution ``counts^power / sum``, float64 ``[V]``."""
    weights = np.asarray(counts, np.float64) ** power
    total = weights.sum()
    if total <= 0:
        raise ValueError("no word has a positive count: the corpus is empty after removing reserved ids.")
    return weights / total


def expected_pairs(counts: np.ndarray, keep: np.ndarray, window: int) -> float:
    """Approximate pairs per epoch: kept tokens x ``window + 1`` (2 sides x mean window ``(window+1)/2``).

    Ignores review edges (a slight over-estimate); used for the learning-rate
    horizon and the progress bar.
    """
    return float(np.sum(np.asarray(counts, np.float64) * keep) * (window + 1))


def window_pairs(tokens: np.ndarray, doc: np.ndarray, window: int, rng: np.random.Generator
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """All (centre, context) pairs of already-subsampled tokens with dynamic windows.

    Args:
      tokens: int32 ``[M]`` kept tokens, reviews contiguous.
      doc: ``[M]`` review index of each token (pairs never cross reviews).
      window: maximum distance.
      rng: draws each centre's window ``b`` in ``1..window``.

    Returns:
      ``(centres int32 [P], contexts int32 [P])``.
    """
    b = rng.integers(1, window + 1, size=tokens.size)
    centres, contexts = [], []
    for d in range(1, min(window, max(tokens.size - 1, 0)) + 1):
        same = doc[:-d] == doc[d:]
        right = same & (b[:-d] >= d)  # centre i, context i + d
        left = same & (b[d:] >= d)  # centre i + d, context i
        centres += [tokens[:-d][right], tokens[d:][left]]
        contexts += [tokens[d:][right], tokens[:-d][left]]
    if not centres:
        return np.zeros((0,), np.int32), np.zeros((0,), np.int32)
    return np.concatenate(centres), np.concatenate(contexts)


def epoch_batches(tokens: np.ndarray, offsets: np.ndarray, keep: np.ndarray, window: int, batch_size: int,
                  rng: np.random.Generator, chunk_tokens: int = 1 << 20) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Shuffled batches of one epoch: ``(centres int32 [batch_size], contexts int32 [batch_size])``.

    Reviews are visited in a random order, subsampled, windowed and the pairs
    of each chunk of about ``chunk_tokens`` tokens shuffled. The last
    incomplete batch of the epoch is dropped (< ``batch_size`` pairs of tens
    of millions).
    """
    order = rng.permutation(offsets.size - 1)
    lengths = np.diff(offsets)[order]
    ends = np.cumsum(lengths)
    carry_c = carry_x = np.zeros((0,), np.int32)
    start = 0
    while start < order.size:
        # Reviews [start, stop) make the next chunk (at least one review).
        stop = max(int(np.searchsorted(ends, ends[start] - lengths[start] + chunk_tokens, side="right")), start + 1)
        reviews = order[start:stop]
        chunk = np.concatenate([tokens[offsets[r]:offsets[r + 1]] for r in reviews])
        doc = np.repeat(np.arange(reviews.size), lengths[start:stop])
        kept = rng.random(chunk.size) < keep[chunk]
        c, x = window_pairs(chunk[kept], doc[kept], window, rng)
        perm = rng.permutation(c.size)
        c, x = np.concatenate([carry_c, c[perm]]), np.concatenate([carry_x, x[perm]])
        n_full = c.size // batch_size
        for i in range(n_full):
            yield c[i * batch_size:(i + 1) * batch_size], x[i * batch_size:(i + 1) * batch_size]
        carry_c, carry_x = c[n_full * batch_size:], x[n_full * batch_size:]
        start = stop
