"""train.py --model transformer (IMDB Transformer classifier) and --model seq2seq (dispatch)."""

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
                "--test_max_len", "4", "--steps", "4", "--batch_size", "8", "--warmup_steps", "2",
                "--eval_every", "0", "--eval_examples", "8", "--length_eval_per_length", "2", "--decode_batch", "8"]


def _train_py(*args, timeout=600):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # three interpreter starts importing jax: ~30 s on the shared 2-core CPU
def test_help_documents_transformer_and_seq2seq():
    top = _train_py("--help")
    assert top.returncode == 0, top.stderr[-2000:]
    assert "--model transformer" in top.stdout and "--model seq2seq --task reverse" in top.stdout
    assert "{bigru,seq2seq,transformer}" in top.stdout
    tfm = _train_py("--model", "transformer", "--help")
    assert tfm.returncode == 0 and "--pooling" in tfm.stdout and "--hidden_size" not in tfm.stdout
    s2s = _train_py("--model", "seq2seq", "--help")
    assert s2s.returncode == 0, s2s.stderr[-2000:]
    assert "train.py --model seq2seq" in s2s.stdout and "--cooldown_fraction" in s2s.stdout


def test_without_model_flag():
    sys.path.insert(0, str(ROOT))
    import train

    assert train._without_model_flag(["--model", "seq2seq", "--task", "sort"]) == ["--task", "sort"]
    assert train._without_model_flag(["--steps", "3", "--model=seq2seq"]) == ["--steps", "3"]


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
def test_seq2seq_dispatch_trains_resumes_draws_heatmaps_and_rejects_bad_flags(tmp_path):
    path, w = tmp_path / "history.json", str(tmp_path / "s2s")
    out = _train_py(*TINY_SEQ2SEQ, "--workdir", w, "--metrics_json", str(path))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    history = json.loads(path.read_text())
    assert [h["step"] for h in history] == [4]
    assert set(history[-1]["length_eval"]["exact_by_length"]) == {"1", "2", "3", "4"}
    saved = json.loads((tmp_path / "s2s" / "config.json").read_text())
    assert saved["model_name"] == "seq2seq" and saved["task"]["name"] == "copy"
    # A finished run is found and not retrained; more steps would change the schedule -> refused.
    again = _train_py(*TINY_SEQ2SEQ, "--workdir", w)
    assert again.returncode == 0 and "resuming from step 4" in again.stdout, again.stderr[-2000:]
    longer = _train_py(*TINY_SEQ2SEQ, "--steps", "5", "--workdir", w)  # the last --steps wins
    assert longer.returncode == 2 and "different configuration" in longer.stderr and "steps" in longer.stderr
    vis = _train_py("visualize", "--workdir", w, "--num_examples", "2")
    assert vis.returncode == 0, vis.stderr[-2000:]
    pngs = sorted(p.relative_to(tmp_path / "s2s" / "heatmaps") for p in (tmp_path / "s2s" / "heatmaps").rglob("*.png"))
    assert len(pngs) == 2 * 3 * 2, pngs  # 2 examples x (encoder self, decoder self, cross) x 2 layers
    assert " -> " in vis.stdout
    pred = _train_py("predict", "--workdir", w, "a great film")
    assert pred.returncode == 2 and "holds a seq2seq run" in pred.stderr
    bad = _train_py(*TINY_SEQ2SEQ, "--workdir", str(tmp_path / "bad"), "--cooldown_fraction", "2")
    assert bad.returncode == 2 and "cooldown_fraction" in bad.stderr
