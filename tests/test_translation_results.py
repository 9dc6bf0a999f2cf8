"""Translation evaluation anyone can reproduce (issue 19): official test2016 order, the committed
hypotheses scored by the ``sacrebleu`` command against the raw references, the literature's
lowercased tokenised BLEU, model selection and checkpoint averaging for the test decode."""

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "translate"
SHARED = ROOT.parent / "shared"
REAL_DATA = Path(os.environ.get("TFDS_DATA_DIR") or SHARED / "tensorflow_datasets")
RAW = REAL_DATA.parent / "multi30k" / "raw"  # beside the TFDS copy (../shared/)
HAS_MULTI30K = (REAL_DATA / "multi30k" / "1.0.0").is_dir()
needs_raw = pytest.mark.skipif(not RAW.is_dir(), reason="raw Multi30k files not found")
needs_multi30k = pytest.mark.skipif(not (HAS_MULTI30K and RAW.is_dir()), reason="prepared + raw multi30k needed")
DIRECTIONS = {"de→en": ("de", "en"), "en→de": ("en", "de")}


# The test2016 rows of docs/guides/results.md -> the committed hypotheses they score: the default runs, and the
# en->de recipe chosen on validation (issue 19).
ROWS = {"de→en": (r"de→en, beam 4, α 0\.6 \(the final evaluation", "multi30k_test2016_de-en.hyp.en"),
        "en→de": (r"en→de, beam 4, α 0\.6 \(the final evaluation", "multi30k_test2016_en-de.hyp.de"),
        "en→de recipe": (r"en→de, recipe chosen on validation", "multi30k_test2016_en-de.recipe.hyp.de")}


def _readme_figures():
    """``{row: (cased, literature)}`` from the test2016 table of the results page."""
    text = (ROOT / "docs" / "guides" / "results.md").read_text(encoding="utf-8")
    out = {}
    for name, (label, _) in ROWS.items():
        m = re.search(rf"\| \*\*{label}[^|]*\| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \|", text)
        assert m, f"docs/guides/results.md: table row for {name} not found"
        out[name] = (m.group(1), m.group(2))
    return out


def _raw_lines(lang, stem="test_2016_flickr"):
    with gzip.open(RAW / f"{stem}.{lang}.gz", "rt", encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("row", sorted(ROWS))
def test_committed_translations_score_the_readme_figures_with_the_sacrebleu_command(row):
    src, tgt = DIRECTIONS[row.split()[0]]
    hyp = RESULTS / ROWS[row][1]
    ref = RESULTS / f"test_2016_flickr.{tgt}"
    cased, literature = _readme_figures()[row]
    # No project code in the loop: the sacrebleu command line, default settings.
    out = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-b", "-w", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == cased
    # The literature's figure: lowercase, Moses punctuation normalisation + tokenisation, multi-bleu-style.
    from sacrebleu.metrics import BLEU
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    norm, tok = MosesPunctNormalizer(lang=tgt), MosesTokenizer(lang=tgt)

    def lc_tok(path):
        return [tok.tokenize(norm.normalize(line.lower()), escape=False, return_str=True)
                for line in path.read_text(encoding="utf-8").splitlines()]

    score = BLEU(tokenize="none", force=True).corpus_score(lc_tok(hyp), [lc_tok(ref)]).score
    assert f"{score:.2f}" == literature


@needs_raw
@pytest.mark.parametrize("lang", ["de", "en"])
def test_committed_references_are_the_official_raw_files(lang):
    assert (RESULTS / f"test_2016_flickr.{lang}").read_text(encoding="utf-8") == _raw_lines(lang)


def test_literature_bleu_matches_the_independent_computation():
    from flax_attention.training.bleu import literature_bleu

    hyp = (RESULTS / "multi30k_test2016_en-de.hyp.de").read_text(encoding="utf-8").splitlines()
    ref = (RESULTS / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()
    assert f"{literature_bleu(hyp, ref, 'de')['bleu_lc_tok']:.2f}" == _readme_figures()["en→de"][1]


@needs_multi30k
@pytest.mark.parametrize("split, stem", [("test", "test_2016_flickr"), ("validation", "val")])
def test_evaluation_splits_are_read_in_the_official_order(split, stem, monkeypatch):
    """TFDS's record order is a hash reshuffle; the trainer reads evaluation splits in raw-line order."""
    import tensorflow_datasets as tfds

    from flax_attention.data import multi30k
    from flax_attention.data.translate import sentence_pairs

    monkeypatch.setenv("TFDS_DATA_DIR", str(REAL_DATA))
    raw = {lang: [x.strip() for x in _raw_lines(lang, stem).splitlines()] for lang in ("de", "en")}
    sources, targets = sentence_pairs("multi30k", split, "de", "en")
    assert sources == raw["de"] and targets == raw["en"]
    assert sentence_pairs("multi30k", split, "en", "de") == (raw["en"], raw["de"])
    # The hash permutation agrees with matching each record's sentence pair to its raw line.
    records = tfds.data_source("multi30k", split=split, data_dir=str(REAL_DATA))
    line = {pair: i for i, pair in enumerate(zip(raw["de"], raw["en"]))}
    matched = [line[(records[i]["de"].decode(), records[i]["en"].decode())] for i in range(len(records))]
    assert multi30k.raw_line_numbers(split, len(records)) == matched
    assert matched[0] != 0  # the stored order really is a reshuffle (record 0 is raw line 164 in test)


def test_checkpoint_averaging_is_the_mean_of_the_newest_k_and_selection_picks_the_best(tmp_path):
    import flax.struct
    import jax.numpy as jnp

    from flax_attention.training.checkpointing import Checkpointer
    from flax_attention.training.selection import select_params

    @flax.struct.dataclass
    class State:
        step: jnp.ndarray
        params: dict

    ckpt = Checkpointer(tmp_path, keep=3)
    scores = {1: 0.2, 2: 0.9, 3: 0.5, 4: 0.4}
    for step, score in scores.items():
        state = State(jnp.int32(step), {"w": jnp.full((2, 3), float(step)), "b": jnp.arange(3.0) * step})
        ckpt.save(step, state, {"next_epoch": step, "next_step": 0, "accuracy": score}, metrics={"accuracy": score})
    ckpt.wait()
    template = State(jnp.int32(0), {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)})
    params, chosen = select_params(ckpt, template, average=0)
    assert chosen == {"selected_step": 2}  # the best on validation, not the last
    np.testing.assert_array_equal(params["w"], np.full((2, 3), 2.0))
    params, chosen = select_params(ckpt, template, average=3)
    assert chosen == {"averaged_steps": [2, 3, 4]}
    np.testing.assert_allclose(params["w"], np.full((2, 3), 3.0))
    np.testing.assert_allclose(params["b"], np.arange(3.0) * 3.0)
    assert params["w"].dtype == np.float32
    ckpt.close()


# The real-data run that selects / averages checkpoints and decodes the test split with them is
# tests/test_translate.py::test_real_data_run_selects_averages_and_scores_like_sacrebleu (one
# training serves every check of a finished translation workdir).
