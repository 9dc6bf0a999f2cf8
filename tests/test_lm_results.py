"""The language-model figures of the README and the results page are the committed run's records.

``benchmarks/results/lm/`` holds the ``config.json`` and ``metrics.jsonl`` of the reported runs
(``train.py --model lm`` and the classifier fine-tuned from it); these tests read the figures the
pages print and check them against the single ``test`` record of each run, so a re-run that is
not copied there, or a page edited by hand, fails. They also plot the committed curve.
"""

import json
import re
from pathlib import Path

import pytest

from benchmarks import training_curve

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "lm"


def _test_record(name):
    records = training_curve.read_records(RESULTS / f"metrics_{name}.jsonl")
    tests = [r for r in records if r["event"] == "test"]
    assert len(tests) == 1, f"metrics_{name}.jsonl should hold the one final test evaluation, has {len(tests)}"
    return tests[0], records


def test_lm_perplexities_on_the_pages_are_the_run_s_test_record():
    test, records = _test_record("lm")
    config = json.loads((RESULTS / "config_lm.json").read_text())
    assert config["model_name"] == "lm"
    token, word = f"{test['test_token_perplexity']:.2f}", f"{test['test_word_perplexity']:.2f}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = re.search(r"^\| IMDB language model.*$", readme, re.M)
    assert row and f"token perplexity **{token}**" in row.group(0) and f"word perplexity **{word}**" in row.group(0)
    page = (ROOT / "docs" / "guides" / "results.md").read_text(encoding="utf-8")
    assert f"token perplexity **{token}**, word perplexity **{word}**" in page
    # The whole test split, once, on the checkpoint selected on validation (the best validation log-likelihood).
    assert f"{int(test['test_examples']):,} tokens" in page
    evals = [r for r in records if r["event"] == "eval"]
    assert test["selected_step"] == max(evals, key=lambda r: r["log_likelihood"])["step"]
    minutes = sum(r["epoch_seconds"] for r in evals) / 60
    assert f"training **{minutes:.1f} min**" in page and f"training {minutes:.1f} min" in readme


def test_longer_pretraining_figures_on_the_results_page_are_its_test_record():
    test, records = _test_record("lm_all")
    config = json.loads((RESULTS / "config_lm_all.json").read_text())
    assert config["model_name"] == "lm" and config["data"]["train_reviews"] == 0
    page = (ROOT / "docs" / "guides" / "results.md").read_text(encoding="utf-8")
    section = page[page.index("### A longer pretraining"):page.index("### The IMDB classifier fine-tuned")]
    token, word = f"{test['test_token_perplexity']:.2f}", f"{test['test_word_perplexity']:.2f}"
    assert f"token perplexity **{token}**, word perplexity **{word}**" in section
    evals = [r for r in records if r["event"] == "eval"]
    best = max(evals, key=lambda r: r["log_likelihood"])
    assert test["selected_step"] == best["step"] and f"{best['token_perplexity']:.2f}" in section
    assert f"training **{sum(r['epoch_seconds'] for r in evals) / 60:.1f} min**" in section


def test_fine_tuned_classifier_accuracy_on_the_pages_is_the_run_s_test_record():
    test, records = _test_record("lm_clf")
    config = json.loads((RESULTS / "config_lm_clf.json").read_text())
    assert config["data"]["init_from"] and config["data"]["valid_examples"] == 2500
    assert test["test_examples"] == 25000  # all test reviews
    accuracy = f"{test['test_accuracy']:.4f}"
    evals = [r for r in records if r["event"] == "eval"]
    assert all(r.get("split", "validation") == "validation" for r in evals)  # older records have no split
    # The tested checkpoint is the epoch with the best validation accuracy; the pages print its figure.
    best = max(evals, key=lambda r: r["test_accuracy"])
    assert test["selected_step"] == best["step"]
    valid = f"{best['test_accuracy']:.4f}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = re.search(r"^\| IMDB, classifier fine-tuned from that LM.*$", readme, re.M)
    assert row and f"test accuracy **{accuracy}** (validation {valid})" in row.group(0)
    page = (ROOT / "docs" / "guides" / "results.md").read_text(encoding="utf-8")
    assert f"| {valid} | **{accuracy}** (loss {test['test_loss']:.4f}) |" in page


def test_samples_on_the_results_page_are_the_committed_output():
    samples = (RESULTS / "samples.txt").read_text(encoding="utf-8")
    page = " ".join((ROOT / "docs" / "guides" / "results.md").read_text(encoding="utf-8").split())
    header = samples.splitlines()[0]
    assert header.startswith("# checkpoints/lm,") and "top_p 0.9" in header and "seed 0" in header
    shown = [line.split(" ", 1)[1] for line in samples.splitlines()[1:] if line.startswith(("[1.2]", "[2.2]"))]
    assert len(shown) == 2 and all(" ".join(s.split()) in page for s in shown)


def test_the_curve_is_drawn_from_the_records(tmp_path):
    _, records = _test_record("lm")
    out = tmp_path / "curve.png"
    training_curve.plot(records, out, "lm")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no 'train' records"):
        training_curve.plot([r for r in records if r["event"] != "train"], tmp_path / "none.png", "lm")
    assert not (tmp_path / "none.png").exists()


# The workdirs named in the ensemble records and the committed records of those runs.
ENSEMBLE_MEMBERS = {"checkpoints/lm_clf": "lm_clf", "checkpoints/lm_clf_all": "lm_clf_lmall3",
                    "checkpoints/lm_clf_seed1": "lm_clf_seed1", "checkpoints/bigru_vectors": "bigru_vectors"}


def test_ensemble_on_the_pages_is_the_validation_best_one_and_its_members_are_the_committed_runs():
    records = training_curve.read_records(RESULTS / "metrics_lm_clf_ensemble.jsonl")
    assert records and all(r["event"] == "ensemble" for r in records)
    members = lambda r: tuple(m["workdir"] for m in r["members"])  # noqa: E731
    valid = [r for r in records if r["split"] == "validation"]
    best = max(valid, key=lambda r: (r["accuracy"], -len(r["members"])))  # chosen on validation (a tie: fewer members) ...
    tests = [r for r in records if r["split"] == "test" and members(r) == members(best)]
    assert len(tests) == 1 and tests[0]["examples"] == 25000 and best["examples"] == 2500
    test = tests[0]  # ... and the test split read for it
    for r in records:
        for m in r["members"]:  # each member at the checkpoint, and with the figure, its own run reported
            run = training_curve.read_records(RESULTS / f"metrics_{ENSEMBLE_MEMBERS[m['workdir']]}.jsonl")
            evals = {e["step"]: e for e in run if e["event"] == "eval"}
            run_tests = [e for e in run if e["event"] == "test"]  # none for a run stopped before its test
            top = max(e["test_accuracy"] for e in evals.values())
            assert evals[m["selected_step"]]["test_accuracy"] == top
            if run_tests:
                assert m["selected_step"] == run_tests[-1]["selected_step"]
            if r["split"] == "test":
                assert m["accuracy"] == pytest.approx(run_tests[-1]["test_accuracy"], abs=1e-9)
            else:
                assert m["accuracy"] == pytest.approx(evals[m["selected_step"]]["test_accuracy"], abs=1e-9)
    accuracy, valid_accuracy = f"{test['accuracy']:.4f}", f"{best['accuracy']:.4f}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = re.search(r"^\| IMDB, ensemble of .*$", readme, re.M)
    assert row and f"test accuracy **{accuracy}** (validation {valid_accuracy})" in row.group(0)
    page = (ROOT / "docs" / "guides" / "results.md").read_text(encoding="utf-8")
    assert f"| {valid_accuracy} | **{accuracy}** (loss {test['loss']:.4f}) |" in page
