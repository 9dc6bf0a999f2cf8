"""train.py --model transformer (IMDB Transformer classifier); --help of every model; seq2seq in the one loop."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TINY_TRANSFORMER = ["--model", "transformer", "--vocab_size", "60", "--d_model", "8", "--num_heads", "2",
                    "--d_ff", "16", "--num_layers", "1", "--attention_size", "4", "--max_length", "12",
                    "--max_len", "12", "--batch_size", "8", "--pooling", "attention"]
TINY_SEQ2SEQ = ["--model", "seq2seq", "--task", "copy", "--num_symbols", "4", "--max_len", "3",
                "--test_max_len", "4", "--steps_per_epoch", "4", "--num_epochs", "1", "--batch_size", "8",
                "--warmup_steps", "2", "--eval_examples", "8", "--length_eval_per_length", "2", "--decode_batch", "8",
                "--eval_batch_size", "8"]


def test_help_documents_every_model_with_its_own_defaults(capsys):
    sys.path.insert(0, str(ROOT))
    import train

    def help_text(*args):
        with pytest.raises(SystemExit) as exit_:
            train.parse_args([*args, "--help"])
        assert exit_.value.code == 0
        return capsys.readouterr().out

    top = help_text()
    assert "--model transformer" in top and "--model seq2seq --task reverse" in top and "--model translate" in top
    assert "{bigru,lm,seq2seq,transformer,translate}" in top and "lm: decoder-only language model" in top
    lm = help_text("--model", "lm")
    assert "--valid_reviews" in lm and "--num_kv_heads" in lm and "(default: 192)" in lm
    tfm = help_text("--model", "transformer")
    assert "--pooling" in tfm and "--hidden_size" not in tfm
    s2s = help_text("--model", "seq2seq")
    assert "--cooldown_fraction" in s2s and "--steps_per_epoch" in s2s and "(default: rsqrt)" in s2s
    tr = help_text("--model", "translate")
    assert "--source_lang" in tr and "--beam_size" in tr and "(default: multi30k)" in tr
    # The same TrainConfig field, different per-model defaults:
    assert "(default: cosine)" in help_text("--model", "bigru")


_E2E_SCRIPT = """
import sys, tensorflow_datasets as tfds, train
w = sys.argv[1]
tiny = {tiny}
with tfds.testing.mock_data(num_examples=16):
    print("RC", train.main(tiny + ["--workdir", w, "--num_epochs", "1"]))
print("RC", train.main(["predict", "--workdir", w, "a great film", "awful"]))
"""


@pytest.mark.slow
def test_transformer_classifier_through_train_py(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    w = str(tmp_path / "run")
    out = subprocess.run([sys.executable, "-c", _E2E_SCRIPT.format(tiny=TINY_TRANSFORMER), w], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rcs = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("RC ")]
    assert rcs == ["0", "0"], out.stdout + out.stderr[-2000:]
    assert "transformer: 16 train / 16 test examples" in out.stdout and "on all 16 test reviews" in out.stdout
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model_name"] == "transformer" and saved["model"]["pooling"] == "attention"
    assert (tmp_path / "run" / "vocab.json").exists() and "p(positive)" in out.stdout


@pytest.mark.slow
def test_seq2seq_through_train_py_resumes_and_refuses_schedule_changes(tmp_path, capsys,
                                                                       in_process_compilation_cache):
    # In-process train.main with the CLI's argv: seven commands, no process start-ups, and the runs after
    # the first reuse its compiled programs (tests/conftest.py).
    sys.path.insert(0, str(ROOT))
    import train

    def train_py(*args):
        rc = train.main(list(args))
        out = capsys.readouterr()
        return rc, out.out, out.err

    w = str(tmp_path / "s2s")
    rc, out, err = train_py(*TINY_SEQ2SEQ, "--workdir", w)
    assert rc == 0, out[-2000:] + err[-2000:]
    saved = json.loads((tmp_path / "s2s" / "config.json").read_text())
    assert saved["model_name"] == "seq2seq" and saved["data"]["task"] == "copy"
    evals = [json.loads(l) for l in (tmp_path / "s2s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["event"] == "eval"] == [4]
    assert {f"exact_len{n}" for n in (1, 2, 3, 4)} <= set(evals[-1])
    # A finished run is found and not retrained; more epochs would bend the schedule -> refused.
    rc, out, err = train_py(*TINY_SEQ2SEQ, "--workdir", w)
    assert rc == 0 and "Resuming from step 4" in out, err[-2000:]
    rc, out, err = train_py(*TINY_SEQ2SEQ, "--num_epochs", "2", "--workdir", w)  # the last flag wins
    assert rc == 2 and "--num_epochs 1" in err and "cooldown" in err
    # Before any cooldown (here 10 % of 4 steps rounds to none in epoch 1), rsqrt may grow.
    w2 = str(tmp_path / "grow")
    rc, out, err = train_py(*TINY_SEQ2SEQ, "--cooldown_fraction", "0.1", "--workdir", w2)
    assert rc == 0, err[-2000:]
    rc, out, err = train_py(*TINY_SEQ2SEQ, "--cooldown_fraction", "0.1", "--num_epochs", "2", "--workdir", w2)
    assert rc == 0 and "Resuming from step 4" in out, err[-2000:]
    evals = [json.loads(l) for l in (tmp_path / "grow" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["event"] == "eval"] == [4, 8]
    assert json.loads((tmp_path / "grow" / "config.json").read_text())["train"]["num_epochs"] == 2
    rc, out, err = train_py("predict", "--workdir", w, "a great film")  # predict on seq2seq = translate: symbols
    assert rc == 2 and "symbol indices" in err
    rc, out, err = train_py(*TINY_SEQ2SEQ, "--workdir", str(tmp_path / "bad"), "--cooldown_fraction", "2")
    assert rc == 2 and "cooldown_fraction" in err


def test_a_task_takes_exactly_one_loss():
    import dataclasses

    from flax_attention.training.registry import get_task
    task = get_task("transformer")
    with pytest.raises(ValueError, match="exactly one of loss_and_metrics and make_loss"):
        dataclasses.replace(task, make_loss=lambda configs: task.loss_and_metrics)
    with pytest.raises(ValueError, match="exactly one of loss_and_metrics and make_loss"):
        dataclasses.replace(task, loss_and_metrics=None)
