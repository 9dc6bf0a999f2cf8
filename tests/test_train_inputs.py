"""train.py input handling (issue 19, items 11-15): every flag and input is checked before anything is
written; one ``error:`` line naming the problem and the fix, exit 2; nothing of a run is lost.

Most tests call ``train.main`` in-process and stop before any training step; the ones that need a
trained workdir are marked slow.
"""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from flax_attention.data.tfds_source import host_reachable
from flax_attention.training.config import TrainConfig, configs_to_json
from flax_attention.training.registry import get_task

ROOT = Path(__file__).parents[1]
BIGRU = ["--vocab_size", "60", "--embed_dim", "8", "--hidden_size", "6", "--attention_size", "4",
         "--max_length", "12", "--batch_size", "8"]
SEQ2SEQ = ["--model", "seq2seq", "--d_model", "16", "--num_heads", "2", "--d_ff", "32", "--steps_per_epoch", "2"]


def _fails(capsys, argv, fragment, code=2):
    """Runs ``train.main(argv)``; it must return ``code`` with exactly one ``error:`` line holding ``fragment``."""
    with _mock_data():
        rc = train.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == code and len(lines) == 1, err[-3000:]
    assert fragment in lines[0], lines[0]
    return lines[0]


def _mock_data():
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(num_examples=16)


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*")) if Path(path).exists() else None


# ------------------------------------------------------------------ item 11: flags checked before training


@pytest.mark.parametrize("argv, fragment", [
    (["--model", "translate", "--alpha", "-1", "--beam_size", "2"], "--alpha must be >= 0"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["--clip_norm", "inf"], "--clip_norm must be a finite number"),
    (["--model", "seq2seq", "--data_seed", "-3"], "--data_seed must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--average_checkpoints", "5", "--keep_checkpoints", "3"], "--average_checkpoints 5 needs 0 <= K <= "
                                                                 "--keep_checkpoints (3)"),
    (["--average_checkpoints", "2"], "--average_checkpoints 2 needs a validation split to judge it and a final test"),
    # Model-config errors surface before the workdir exists (they used to leave an empty one).
    ([*SEQ2SEQ, "--num_heads", "3"], "num_heads"),
    (["--model", "translate", "--d_model", "30", "--num_heads", "4"], "num_heads"),
])
def test_bad_flags_are_refused_before_anything_is_written(capsys, tmp_path, argv, fragment):
    _fails(capsys, [*argv, "--workdir", tmp_path / "w"], fragment)
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------ item 12 + "smaller": --embeddings first


@pytest.mark.parametrize("content, fragment", [
    ("good 1 2 3 4 5 6 7 8\nbad 1 2 x 4 5 6 7 8\n", "bad.txt, line 2: non-numeric value"),
    ("a 1 2 3\n", "bad.txt, line 1: 3-dim vectors, the model expects 8"),
    ("", "the file has no vectors"),
    (None, "--embeddings"),  # no such file
])
def test_bad_embeddings_file_is_refused_before_the_workdir_is_written(capsys, tmp_path, content, fragment):
    bad = tmp_path / "bad.txt"
    if content is not None:
        bad.write_text(content)
    _fails(capsys, [*BIGRU, "--embeddings", bad, "--workdir", tmp_path / "w"], fragment)
    assert not (tmp_path / "w").exists()  # no config.json, vocabulary or data cache: a corrected rerun is a fresh run


# ------------------------------------------------------------------ item 14: damaged side files


def _saved_config(workdir, model, argv=()):
    parsed = train.parse_args(["--model", model, *argv, "--workdir", str(workdir)])
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / "config.json").write_text(json.dumps(configs_to_json(model, parsed[3])))


@pytest.mark.parametrize("payload", ['["the", "a"]', '{"words": [1, 2], "tokenizer": 1}', "{"])
def test_damaged_vocab_json_is_one_error_line_and_kept(capsys, tmp_path, payload):
    w = tmp_path / "w"
    _saved_config(w, "bigru", BIGRU)
    (w / "vocab.json").write_text(payload)
    _fails(capsys, ["predict", "--workdir", w, "Great film"], f"cannot read vocabulary {w / 'vocab.json'}")
    assert (w / "vocab.json").read_text() == payload


def test_damaged_sentencepiece_model_is_one_error_line_and_kept(capsys, tmp_path):
    w = tmp_path / "w"
    _saved_config(w, "translate")
    (w / "spm.model").write_bytes(b"not a sentencepiece model")
    _fails(capsys, ["translate", "--workdir", w, "Ein Hund."], f"cannot read the SentencePiece model {w / 'spm.model'}")
    assert (w / "spm.model").read_bytes() == b"not a sentencepiece model"


# ------------------------------------------------------------------ item 15: config.json, offline data


@pytest.mark.parametrize("payload", ["{", "[1, 2]"])
def test_damaged_config_json_is_named_and_kept(capsys, tmp_path, payload):
    w = tmp_path / "w"
    w.mkdir()
    (w / "config.json").write_text(payload)
    for argv in ([*BIGRU, "--workdir", w], ["predict", "--workdir", w, "Great film"]):
        _fails(capsys, argv, str(w / "config.json"))
    assert _tree(w) == ["config.json"] and (w / "config.json").read_text() == payload


@pytest.mark.skipif(host_reachable("github.com"), reason="online: TFDS would really download Multi30k")
def test_offline_multi30k_fails_in_seconds(tmp_path):
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "empty"), "JAX_PLATFORMS": "cpu"}
    t0 = time.time()
    out = subprocess.run([sys.executable, "train.py", "--model", "translate", "--workdir", str(tmp_path / "w")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    line = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "github.com:443" in line[0] and "TFDS_DATA_DIR" in line[0], out.stderr[-3000:]
    assert time.time() - t0 < 100  # it used to retry downloads for ~3.5 minutes
    assert not (tmp_path / "w").exists()  # and no empty workdir is left behind


# ------------------------------------------------------------------ item 13: damaged newest checkpoint


def test_closed_event_loop_callbacks_are_not_printed(monkeypatch, tmp_path):
    """orbax's failed read leaves tensorstore replies for a closed loop: pages of unraisable tracebacks."""
    from flax_attention.training.checkpointing import Checkpointer

    shown = []
    monkeypatch.setattr(sys, "unraisablehook", lambda args: shown.append(str(args.exc_value)))
    Checkpointer(tmp_path / "w").close()  # installs the filter over the current hook
    loop = asyncio.new_event_loop()
    loop.close()
    for exc in (_closed_loop_error(loop), RuntimeError("something else")):
        sys.unraisablehook(type("Args", (), {"exc_type": type(exc), "exc_value": exc, "exc_traceback":
                                             exc.__traceback__, "err_msg": None, "object": None})())
    assert shown == ["something else"]  # every other unraisable error is still shown


def _closed_loop_error(loop):
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        return e
    raise AssertionError("a closed loop accepted a callback")


_MOCK_MAIN = ("import sys, tensorflow_datasets as tfds, train\n"
              "with tfds.testing.mock_data(num_examples=32):\n"
              "    rc = train.main(sys.argv[1:])\n"
              "sys.exit(rc)\n")
RUN = [*BIGRU, "--num_epochs", "2", "--checkpoint_every", "1", "--log_every", "1"]


def _train(workdir, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1"}
    return subprocess.run([sys.executable, "-c", _MOCK_MAIN, *RUN, "--workdir", str(workdir), *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    w = tmp_path_factory.mktemp("run") / "w"
    out = _train(w)
    assert out.returncode == 0, out.stderr[-3000:]
    return w


def _truncate_data(state_dir):
    # Every data file: which one holds the arrays read first depends on orbax's write order
    # (the largest alone was sometimes an unread top-level file, and the damage went unnoticed).
    for f in [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]:
        os.truncate(f, f.stat().st_size // 2)


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncate_data, lambda d: (d / "manifest.ocdbt").unlink(),
                                    lambda d: (d / "_METADATA").write_text("{")])
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(finished_run, tmp_path, damage):
    w = tmp_path / "w"
    shutil.copytree(finished_run, w)
    damage(w / "checkpoints" / "8" / "state")
    damaged = sorted(p.name for p in (w / "checkpoints" / "8").rglob("*"))
    out = _train(w)  # the same command: resumes from step 7 and trains step 8 again
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, out.stderr[-3000:]
    warning = [x for x in out.stderr.splitlines() if x.startswith("warning: checkpoint 8 ")]
    assert len(warning) == 1 and "fell back to the previous checkpoint" in warning[0], out.stderr[-3000:]
    assert "Resuming from step 7" in out.stdout
    kept = w / "checkpoints.damaged" / "8"
    assert sorted(p.name for p in kept.rglob("*")) == damaged  # kept as it was, for inspection
    assert 8 in [int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit()]  # step 8 trained again
