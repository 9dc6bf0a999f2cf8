"""train.py and flax_attention.training: pmap equivalence, resume, end-to-end CLI runs."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
REAL_DATA = Path(os.environ.get("TFDS_DATA_DIR") or ROOT.parent / "shared" / "tensorflow_datasets")
HAS_IMDB = (REAL_DATA / "imdb_reviews" / "plain_text" / "1.0.0").is_dir()
TINY = ["--vocab_size", "60", "--embed_dim", "8", "--hidden_size", "6", "--attention_size", "4",
        "--max_length", "12", "--batch_size", "8"]


def _run(code, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    return out


_PMAP_SCRIPT = """
import json, jax, numpy as np
import flax_attention.training as training
from flax_attention.training import registry
from flax_attention.training.distributed import process_batch
from flax_attention.data import imdb
from flax_attention.models.bigru import BiGRUConfig
task = registry.get_task("bigru")
cfg = {"model": BiGRUConfig(vocab_size=50, embed_dim=8, hidden_size=6, attention_size=4, dropout_rate=0.0),
       "data": imdb.IMDBConfig(vocab_size=50, max_length=10), "train": training.TrainConfig(batch_size=8)}
rng = np.random.default_rng(0)
lengths = rng.integers(1, 11, 32).astype(np.int32)
tokens = np.where(np.arange(10) < lengths[:, None], rng.integers(1, 50, (32, 10)), 0).astype(np.int32)
data = imdb.EncodedSplit(tokens, lengths, rng.integers(0, 2, 32).astype(np.int32))
model = task.build_model(cfg, None)
state = training.create_train_state(model, task.init_inputs(cfg), cfg["train"], jax.random.PRNGKey(0))
step = training.make_train_step(task.loss_and_metrics)
rstate, n, losses = training.replicate(state), jax.local_device_count(), []
for epoch in range(2):
    for batch in imdb.train_batches(data, 8, seed=0, epoch=epoch):
        rstate, sums = step(rstate, process_batch(batch, 0, 1, n))
        losses.append(float(sums["loss"][0] / sums["weight"][0]))
print(json.dumps({"devices": n, "losses": losses}))
"""


@pytest.mark.slow
def test_pmap_four_devices_matches_one_device():
    """Same global batch on 1 and 4 simulated devices -> same loss trajectory.

    Dropout is off: its masks depend on the device layout by design (one key
    per device). Tolerance 1e-5 relative: only float32 summation order differs.
    """
    runs = {}
    for n in (1, 4):
        out = _run(_PMAP_SCRIPT, {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"})
        assert out.returncode == 0, out.stderr[-3000:]
        runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
        assert runs[n]["devices"] == n
    assert len(runs[1]["losses"]) == 8
    np.testing.assert_allclose(runs[4]["losses"], runs[1]["losses"], rtol=1e-5)
    assert runs[1]["losses"][-1] != runs[1]["losses"][0]  # it did train


def _params(workdir):
    """``(latest step, parameter leaves)`` of a workdir, restored without a target structure."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(workdir, "checkpoints").absolute(), item_names=("state", "meta")) as mgr:
        step = mgr.latest_step()
        state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    return step, jax.tree_util.tree_leaves(state["params"])


def test_valid_examples_selects_on_validation_and_tests_the_selected_checkpoint_once(tmp_path, capsys):
    """--valid_examples 8 of 24 mock reviews: per-epoch evaluation on them, one final test of the selected step."""
    tfds = pytest.importorskip("tensorflow_datasets")
    import json

    import train

    run = TINY + ["--lr_schedule", "constant", "--valid_examples", "8", "--workdir", str(tmp_path / "w"), "--keep_checkpoints", "1"]
    with tfds.testing.mock_data(num_examples=24):  # 16 train / 8 validation: 2 steps per epoch
        assert train.main(run + ["--num_epochs", "2"]) == 0
        out = capsys.readouterr().out
        assert "16 train / 8 validation / 24 test examples" in out and "(8 validation reviews)" in out
        assert "Final validation accuracy" in out and out.count("on all 24 test reviews") == 1
        assert "the reported model is the tested one above, step" in out
        assert train.main(run + ["--num_epochs", "3"]) == 0  # resume: one more epoch, the test once more
    records = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    tests = [r for r in records if r["event"] == "test"]
    assert [r["step"] for r in evals] == [2, 4, 6] and all(r["test_examples"] == 8 for r in evals)
    assert all(r["split"] == "validation" for r in evals)
    assert [t["step"] for t in tests] == [4, 6] and all(t["test_examples"] == 24 for t in tests)
    chosen = {r["step"]: r["test_accuracy"] for r in evals}[tests[-1]["selected_step"]]
    assert chosen == max(r["test_accuracy"] for r in evals)  # "test_accuracy" of an eval event: validation
    assert train.main(TINY + ["--average_checkpoints", "2", "--workdir", str(tmp_path / "never")]) == 2
    assert "needs a validation split" in capsys.readouterr().err and not (tmp_path / "never").exists()


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, schedule):
    """A crash after step 4 of 12, then a resume, ends with the uninterrupted run's parameters.

    The constant schedule also extends the run (1 epoch, then 2) on resume; the
    cosine one is laid out over the epoch count, so its run is 2 epochs throughout.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    import train

    tiny = TINY + ["--lr_schedule", schedule]
    first_epochs = "1" if schedule == "constant" else "2"
    with tfds.testing.mock_data(num_examples=48):  # 6 steps per epoch
        assert train.main(tiny + ["--workdir", str(tmp_path / "a"), "--num_epochs", "2"]) == 0
        assert train.main(tiny + ["--workdir", str(tmp_path / "b"), "--num_epochs", first_epochs,
                                  "--checkpoint_every", "4", "--keep_checkpoints", "9"]) == 0
        # Simulate a crash after step 4: keep only the mid-epoch checkpoint.
        for step_dir in (tmp_path / "b" / "checkpoints").iterdir():
            if step_dir.name.isdigit() and int(step_dir.name) > 4:
                shutil.rmtree(step_dir)
        assert train.main(tiny + ["--workdir", str(tmp_path / "b"), "--num_epochs", "2"]) == 0
    step_a, leaves_a = _params(tmp_path / "a")
    step_b, leaves_b = _params(tmp_path / "b")
    assert step_a == step_b == 12
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_cosine_schedule_decays_to_zero_and_fixes_the_epoch_count(tmp_path):
    import flax_attention.training as training
    from flax_attention.training import checkpointing

    # With a constant gradient Adam's normalised step is 1, so each update is -lr(t):
    # cosine from 1e-3 at t=0, half-way at t=5, zero at the end (t=10).
    tx = training.make_optimizer(training.TrainConfig(learning_rate=1e-3, lr_schedule="cosine"), 10)
    opt, steps = tx.init(np.zeros(())), []
    for _ in range(11):
        update, opt = tx.update(np.ones(()), opt)
        steps.append(-float(update))
    np.testing.assert_allclose([steps[0], steps[5], steps[10]], [1e-3, 5e-4, 0.0], rtol=1e-4, atol=1e-9)
    assert all(a > b for a, b in zip(steps[:10], steps[1:11]))
    cosine, constant = training.TrainConfig(), training.TrainConfig(lr_schedule="constant")
    assert cosine.lr_schedule == "cosine"
    assert "num_epochs" not in cosine.resumable_changes() and "num_epochs" in constant.resumable_changes()
    saved = {"model_name": "bigru", "train": {"num_epochs": 3, "lr_schedule": "cosine"}}
    checkpointing.check_or_write_config(tmp_path, saved)
    more = {"model_name": "bigru", "train": {"num_epochs": 5, "lr_schedule": "cosine"}}
    with pytest.raises(checkpointing.IncompatibleWorkdirError, match="num_epochs"):
        checkpointing.check_or_write_config(tmp_path, more, [f"train.{k}" for k in cosine.resumable_changes()])
    with pytest.raises(ValueError, match="--lr_schedule must be one of"):
        training.TrainConfig(lr_schedule="linear")


def test_rsqrt_run_length_may_change_on_resume_until_a_cooldown_begins():
    import flax_attention.training as training

    # rsqrt (Vaswani et al. Eq. 3) depends on the run's length only through the cooldown:
    # a 20-epoch run stopped at step s resumes as a 12-epoch run iff neither cooldown has begun.
    spe = 10
    long_ = training.TrainConfig(lr_schedule="rsqrt", warmup_steps=7, cooldown_fraction=0.2, num_epochs=20)
    short = dataclasses.replace(long_, num_epochs=12)
    assert "num_epochs" in long_.resumable_changes()
    start = short.cooldown_start(12 * spe)
    assert start == 96 and long_.cooldown_start(20 * spe) == 160
    a, b = training.learning_rate_schedule(long_, 20 * spe), training.learning_rate_schedule(short, 12 * spe)
    counts = np.arange(0, 12 * spe + 1)
    same = np.isclose(np.array([a(c) for c in counts]), np.array([b(c) for c in counts]), rtol=0, atol=0)
    assert same[:start + 1].all() and not same[start + 1:].any()  # equal up to the cooldown, then not
    short.check_epochs_change(20, start, spe)  # the updates made so far had the 12-epoch rates
    with pytest.raises(ValueError, match=r"--num_epochs 12 differs from the run's 20, and at step 97.*--num_epochs 20"):
        short.check_epochs_change(20, start + 1, spe)
    dataclasses.replace(long_, num_epochs=30).check_epochs_change(20, 150, spe)  # longer, before 160
    with pytest.raises(ValueError, match="cooldown"):
        dataclasses.replace(long_, num_epochs=30).check_epochs_change(20, 161, spe)
    flat = training.TrainConfig(lr_schedule="constant", num_epochs=2)
    flat.check_epochs_change(5, 50, spe)  # no cooldown: any length, as before


def test_workdir_from_before_the_schedule_field_resumes_as_constant(tmp_path):
    import flax_attention.training as training
    from flax_attention.training import checkpointing

    added = training.TrainConfig.added_fields()  # what train.py passes
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "bigru", "train": {"num_epochs": 3}}))
    assert checkpointing.load_config(tmp_path, added)["train"]["lr_schedule"] == "constant"
    checkpointing.check_or_write_config(  # every field added since takes the value older runs used
        tmp_path, {"model_name": "bigru", "train": {"num_epochs": 3, **training.TrainConfig.ADDED_FIELDS}},
        write=False, added_fields=added)


_E2E_SCRIPT = """
import sys, tensorflow_datasets as tfds, train
w = sys.argv[1]
tiny = {tiny}
with tfds.testing.mock_data(num_examples=20):
    print("RC", train.main(tiny + ["--workdir", w, "--num_epochs", "1"]))
    print("RC", train.main(tiny + ["--workdir", w, "--hidden_size", "7"]))  # incompatible -> refuse
    print("RC", train.main(["visualize", "--workdir", w, "--num_examples", "3"]))
print("RC", train.main(["predict", "--workdir", w, "--html", w + "/pred.html", "a great film", "awful"]))
print("RC", train.main(["predict", "--workdir", w, " "]))
print("RC", train.main(["--batch_size", "0", "--workdir", w]))
"""


@pytest.mark.slow
def test_train_py_end_to_end_on_mock_data(tmp_path):
    w = str(tmp_path / "run")
    out = subprocess.run([sys.executable, "-c", _E2E_SCRIPT.format(tiny=TINY), w], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rcs = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("RC ")]
    assert rcs == ["0", "2", "0", "0", "2", "2"], out.stdout + out.stderr[-2000:]
    assert "Final test accuracy" in out.stdout and "on all 20 test reviews" in out.stdout
    assert "different configuration" in out.stderr and "hidden_size" in out.stderr
    assert "non-empty review" in out.stderr and "--batch_size must be >= 1" in out.stderr
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "eval" and records[-1]["test_examples"] == 20 and records[-1]["split"] == "test"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["hidden_size"] == 6
    page = (tmp_path / "run" / "attention.html").read_text()
    assert page.count("class=card") == 3 and "rgba(255,0,0," in page
    assert (tmp_path / "run" / "pred.html").read_text().count("class=card") == 2
    assert "p(positive)" in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(not HAS_IMDB, reason="prepared IMDB not found (set TFDS_DATA_DIR)")
def test_train_py_few_real_steps(tmp_path):
    args = ["--workdir", str(tmp_path), "--max_length", "24", "--embed_dim", "8", "--hidden_size", "8",
            "--attention_size", "4", "--batch_size", "2500", "--eval_batch_size", "5000", "--num_epochs", "1"]
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TFDS_DATA_DIR": str(REAL_DATA)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on all 25000 test reviews" in out.stdout
    vocab = json.loads((tmp_path / "vocab.json").read_text())["words"]
    assert len(vocab) == 10_000 - 3 and vocab[0] == "the"


_EMBED_SCRIPT = """
import json, sys, numpy as np, tensorflow_datasets as tfds, train
from flax_attention.data.word_vectors import save_word_vectors
w = sys.argv[1]
tiny = {tiny}
with tfds.testing.mock_data(num_examples=16):
    print("RC", train.main(tiny + ["--workdir", w + "/plain", "--num_epochs", "1"]))
    words = json.load(open(w + "/plain/vocab.json"))["words"][:5]
    save_word_vectors(w + "/vec.txt", words, np.arange(5 * 8, dtype=np.float32).reshape(5, 8) / 10)
    open(w + "/bad.txt", "w").write(words[0] + " 1 2 3 4 5 6 7 8\\n" + words[1] + " 1 2 x 4 5 6 7 8\\n")
    print("RC", train.main(tiny + ["--workdir", w + "/frozen", "--num_epochs", "1", "--embeddings", w + "/vec.txt",
                                   "--freeze_embeddings", "true"]))
    print("RC", train.main(tiny + ["--workdir", w + "/bad", "--num_epochs", "1", "--embeddings", w + "/bad.txt"]))
print("WORDS", json.dumps(words))
"""


@pytest.mark.slow
def test_embeddings_flag_initialises_and_freezes_the_table_and_names_a_bad_line(tmp_path):
    import jax
    import orbax.checkpoint as ocp

    out = subprocess.run([sys.executable, "-c", _EMBED_SCRIPT.format(tiny=TINY), str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    rcs = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("RC ")]
    assert rcs == ["0", "0", "2"], out.stdout[-2000:] + out.stderr[-3000:]
    assert "bad.txt, line 2" in out.stderr
    vocab = json.loads((tmp_path / "frozen" / "vocab.json").read_text())["words"]
    words = json.loads(out.stdout.split("WORDS ")[1])
    with ocp.CheckpointManager((tmp_path / "frozen" / "checkpoints").absolute(), item_names=("state", "meta")) as m:
        state = m.restore(m.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    table = np.asarray(state["params"]["embed"]["embedding"])
    assert f"5/{len(vocab)} vocabulary words found" in out.stdout
    ids = [vocab.index(word) + 3 for word in words]  # ids start after pad/start/unknown
    np.testing.assert_array_equal(table[ids], np.arange(40, dtype=np.float32).reshape(5, 8) / 10)
    assert int(state["step"]) == 2  # it trained, yet the frozen table kept the file's rows exactly
    init = [json.loads(l) for l in (tmp_path / "frozen" / "metrics.jsonl").read_text().splitlines()][0]
    assert init["event"] == "init" and init["embedding_word_coverage"] == pytest.approx(5 / len(vocab))
    assert jax.tree_util.tree_leaves(state["params"])  # the rest of the model trained normally
