"""HTML pages that highlight each word by its attention weight.

Colour intensity is the weight divided by the largest weight of that review,
so every review uses the full colour range; the exact weight is in each word's
tooltip. Everything is escaped: review text is untrusted input.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Dict, Optional, Sequence


def highlight_html(words: Sequence[str], weights: Sequence[float]) -> str:
    """One ``<p>`` with each word on a red background of alpha ``weight / max(weight)``."""
    if len(words) != len(weights):
        raise ValueError(f"need one weight per word; got {len(words)} words and {len(weights)} weights.")
    top = max(weights) if len(weights) else 0.0
    spans = []
    for w, a in zip(words, weights):
        alpha = (a / top) if top > 0 else 0.0
        spans.append(f'<span style="background-color: rgba(255,0,0,{alpha:.3f})" '
                     f'title="{a:.4f}">{html.escape(w)}</span>')
    return "<p class=review>" + " ".join(spans) + "</p>"


def review_block(result: Dict[str, Any], true_label: Optional[str] = None, title: str = "") -> str:
    """A review card: prediction, probability, optional true label, highlighted words."""
    verdict = f"predicted <b>{html.escape(result['label'])}</b> (p(positive) = {result['prob']:.3f})"
    if true_label is not None:
        ok = "correct" if true_label == result["label"] else "WRONG"
        verdict += f", true label <b>{html.escape(true_label)}</b> — {ok}"
    head = f"<h3>{html.escape(title)}</h3>" if title else ""
    return f"<div class=card>{head}<div class=verdict>{verdict}</div>{highlight_html(result['words'], result['weights'])}</div>"


def write_page(path, blocks: Sequence[str], heading: str = "Attention weights") -> Path:
    """Writes a self-contained HTML page of review blocks and returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    style = ("body{font-family:sans-serif;max-width:60em;margin:auto}"
             ".card{border:1px solid #ccc;padding:.5em 1em;margin:1em 0}"
             ".review{line-height:1.8}.verdict{color:#333}")
    path.write_text(f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(heading)}</title>"
                    f"<style>{style}</style></head><body><h1>{html.escape(heading)}</h1>"
                    "<p>Each word is shaded by its attention weight relative to the review's largest weight "
                    "(hover for the exact weight).</p>" + "\n".join(blocks) + "</body></html>",
                    encoding="utf-8")
    return path


def format_words(result: Dict[str, Any], top: int = 10) -> str:
    """Plain-text report: the prediction and the ``top`` words by weight."""
    pairs = sorted(zip(result["weights"], range(len(result["words"]))), reverse=True)[:top]
    lines = [f"{result['label']} (p(positive) = {result['prob']:.3f})"]
    lines += [f"  {result['words'][i]:<20s} {w:.4f}" for w, i in pairs]
    return "\n".join(lines)
