"""Corpus BLEU (Papineni et al., 2002), one reference per sentence.

``BLEU = BP · exp(Σ_n ¼ log p_n)`` over n = 1..4, where ``p_n`` is the clipped
n-gram precision summed over the corpus (Eq. 1 of the paper) and the brevity
penalty ``BP = exp(1 - r / c)`` when the hypotheses (``c`` tokens) are shorter
than the references (``r`` tokens), else 1. No smoothing: a corpus without a
single matching 4-gram scores 0, as in sacreBLEU's default.

Tokenisation: words (``\\w+``) and single punctuation marks, case kept. That is
close to sacreBLEU's ``13a`` tokeniser but not identical, so compare scores
with each other, and with published figures only loosely.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import List, Sequence

_TOKEN = re.compile(r"\w+|[^\w\s]")
MAX_ORDER = 4


def tokenize(text: str) -> List[str]:
    """Words and punctuation marks of ``text``."""
    return _TOKEN.findall(text)


@dataclasses.dataclass(frozen=True)
class BleuScore:
    """``score`` in [0, 100] and its parts.

    Attributes:
      score: corpus BLEU x 100.
      precisions: clipped n-gram precisions ``p_1 .. p_4`` in [0, 1].
      brevity_penalty: ``BP``.
      hyp_length: ``c``, tokens in all hypotheses.
      ref_length: ``r``, tokens in all references.
    """

    score: float
    precisions: tuple
    brevity_penalty: float
    hyp_length: int
    ref_length: int


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> BleuScore:
    """Corpus-level BLEU of detokenised strings.

    Args:
      hypotheses: one system output per sentence.
      references: the reference translation of each sentence.

    Raises:
      ValueError: when the two lists differ in length.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; pass one of each per "
                         "sentence.")
    matches, totals = [0] * MAX_ORDER, [0] * MAX_ORDER
    c = r = 0
    for hyp, ref in zip(hypotheses, references):
        h, t = tokenize(hyp), tokenize(ref)
        c, r = c + len(h), r + len(t)
        for n in range(1, MAX_ORDER + 1):
            hyp_counts, ref_counts = _ngrams(h, n), _ngrams(t, n)
            # Clipping (Sec. 2.1): an n-gram counts at most as often as in the reference.
            matches[n - 1] += sum(min(k, ref_counts[g]) for g, k in hyp_counts.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    precisions = tuple(m / t if t else 0.0 for m, t in zip(matches, totals))
    bp = 0.0 if c == 0 else (1.0 if c > r else math.exp(1.0 - r / c))
    if min(precisions) == 0.0:
        return BleuScore(0.0, precisions, bp, c, r)
    score = 100.0 * bp * math.exp(sum(math.log(p) for p in precisions) / MAX_ORDER)
    return BleuScore(score, precisions, bp, c, r)
