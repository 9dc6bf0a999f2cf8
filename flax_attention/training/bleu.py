"""Corpus BLEU two ways: cased sacreBLEU (the default report) and the Multi30k literature's figure.

* :func:`bleu_score`: sacreBLEU on detokenised, cased text with its default
  ``13a`` tokenisation (Post 2018) -- comparable across papers that use it.
* :func:`literature_bleu`: what the Multi30k papers report (``multi-bleu.perl``
  on the official ``*.lc.norm.tok.*`` files): both sides lowercased, Moses
  punctuation-normalised and Moses-tokenised (sacremoses, the Python port of
  ``lowercase.perl | normalize-punctuation.perl -l L | tokenizer.perl -l L``),
  then scored with sacreBLEU's ``tokenize="none"`` (multi-bleu's plain
  whitespace split; same n-gram and brevity arithmetic). It reads ~0.3-0.4
  higher than cased sacreBLEU.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Sequence


def bleu_score(hypotheses: Sequence[str], references: Sequence[str]) -> Dict[str, Any]:
    """sacreBLEU corpus BLEU (default 13a tokenisation, cased) and its signature."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    result = bleu.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": float(result.score), "bleu_signature": str(bleu.get_signature()),
            "bleu_brevity_penalty": float(result.bp)}


@functools.lru_cache(maxsize=4)
def _moses(lang: str):
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    return MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang)


def moses_lc_tokenize(lines: Sequence[str], lang: str) -> List[str]:
    """Lowercase, Moses-normalise punctuation, Moses-tokenise (no XML escaping): the ``.lc.norm.tok`` form."""
    normalizer, tokenizer = _moses(lang)
    return [tokenizer.tokenize(normalizer.normalize(line.lower()), escape=False, return_str=True) for line in lines]


def literature_bleu(hypotheses: Sequence[str], references: Sequence[str], lang: str) -> Dict[str, Any]:
    """BLEU as the Multi30k literature reports it (see the module docstring); ``lang`` is the target language."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(tokenize="none", force=True)  # force: the input is tokenised on purpose
    result = bleu.corpus_score(moses_lc_tokenize(hypotheses, lang), [moses_lc_tokenize(references, lang)])
    return {"bleu_lc_tok": float(result.score),
            "bleu_lc_tok_signature": f"lowercase+moses-norm+moses-tok({lang})|{bleu.get_signature()}"}
