"""train.py ensemble: members read as their runs reported them, the mean probability, the cache, bad input."""

import json
import math

import numpy as np
import pytest

from tests.test_train import TINY

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny BiGRU runs (seeds 0 and 1) on 24 mock reviews, 8 held out; one holding out 6; one holding out none."""
    import train

    root = tmp_path_factory.mktemp("ensemble")
    flags = {"a": ["--seed", "0", "--valid_examples", "8"], "b": ["--seed", "1", "--valid_examples", "8"],
             "six": ["--valid_examples", "6"], "none": []}
    with tfds.testing.mock_data(num_examples=24):
        for name, extra in flags.items():
            assert train.main(TINY + extra + ["--num_epochs", "2", "--lr_schedule", "constant",
                                              "--workdir", str(root / name)]) == 0
    return root


def _records(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_scores_by_hand():
    from flax_attention.training.ensemble import _scores

    s = _scores(np.array([0.9, 0.2, 0.6], np.float32), np.array([1, 0, 0]))
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3, rel=1e-6)


def test_members_score_as_their_runs_logged_and_the_ensemble_averages_their_probabilities(runs, capsys):
    from flax_attention.training.ensemble import ensemble

    members = [runs / "a", runs / "b"]
    with tfds.testing.mock_data(num_examples=24):
        valid = ensemble(members, "validation", batch_size=3)  # 8 reviews: a padded last batch
        test = ensemble(members, "test", batch_size=5)
    assert valid["examples"] == 8 and test["examples"] == 24
    for w, v, t in zip(members, valid["members"], test["members"]):
        records = _records(w)
        final = [r for r in records if r["event"] == "test"][-1]
        logged = {r["step"]: r for r in records if r["event"] == "eval"}[final["selected_step"]]
        assert v["selected_step"] == t["selected_step"] == final["selected_step"]
        # The trainer's own validation and test figures for the same checkpoint.
        assert v["accuracy"] == pytest.approx(logged["test_accuracy"]) and t["accuracy"] == pytest.approx(final["test_accuracy"])
        assert v["loss"] == pytest.approx(logged["test_loss"], rel=1e-4)
        assert t["loss"] == pytest.approx(final["test_loss"], rel=1e-4)
    for split, record in (("validation", valid), ("test", test)):
        cached = [np.load(w / "predictions" / f"{split}-step{m['selected_step']}.npz")
                  for w, m in zip(members, record["members"])]
        mean = (cached[0]["probs"] + cached[1]["probs"]) / 2
        assert record["accuracy"] == pytest.approx(np.mean((mean >= 0.5) == cached[0]["labels"].astype(bool)))
    out = capsys.readouterr().out
    assert "ensemble" in out and f"validation accuracy {valid['accuracy']:.4f}" in out


def test_a_member_s_cached_probabilities_are_read_instead_of_the_split(runs):
    from flax_attention.training.ensemble import ensemble

    members = [runs / "a", runs / "b"]
    with tfds.testing.mock_data(num_examples=24):
        before = ensemble(members, "validation")
        path = runs / "a" / "predictions" / f"validation-step{before['members'][0]['selected_step']}.npz"
        with np.load(path) as z:
            probs, labels = z["probs"], z["labels"]
        np.savez(path, probs=1 - probs, labels=labels)  # flipped: every prediction of member a reversed
        try:
            after = ensemble(members, "validation")
        finally:
            np.savez(path, probs=probs, labels=labels)
    assert after["members"][0]["accuracy"] == pytest.approx(1 - before["members"][0]["accuracy"])
    assert after["members"][0]["cached"] and after["members"][1]["cached"]
    assert {k: after["members"][1][k] for k in ("accuracy", "loss")} == {k: before["members"][1][k] for k in ("accuracy", "loss")}


def test_train_py_ensemble_appends_one_json_record(runs, tmp_path):
    import train

    out = tmp_path / "records" / "ensemble.jsonl"
    with tfds.testing.mock_data(num_examples=24):
        for _ in range(2):
            assert train.main(["ensemble", "--workdir", str(runs / "a"), "--workdir", str(runs / "b"),
                               "--split", "test", "--out", str(out)]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 2 and records[0]["event"] == "ensemble" and records[0]["split"] == "test"
    assert [m["workdir"] for m in records[0]["members"]] == [str(runs / "a"), str(runs / "b")]
    assert records[0]["accuracy"] == records[1]["accuracy"]


@pytest.mark.parametrize("members, message", [
    (["a"], "at least two members"),
    (["a", "a"], "given twice"),
    (["a", "six"], "different validation splits"),
    (["a", "none"], "trained without --valid_examples"),
])
def test_members_that_cannot_be_combined_are_refused_before_reading_anything(runs, capsys, members, message):
    import train

    argv = ["ensemble"] + [x for m in members for x in ("--workdir", str(runs / m))]
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    assert train.main(argv) == 2
    assert message in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == before  # nothing written


def test_a_workdir_of_another_model_family_is_refused(runs, tmp_path, capsys):
    import train

    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({**json.loads((runs / "a" / "config.json").read_text()),
                                                "model_name": "seq2seq"}))
    assert train.main(["ensemble", "--workdir", str(runs / "a"), "--workdir", str(lm)]) == 2
    assert "--model seq2seq run" in capsys.readouterr().err
