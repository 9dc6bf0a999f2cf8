"""train.py under failure: SIGKILL + resume, incompatible workdirs, divergence, bad input.

Everything runs ``train.py`` in real subprocesses. Training runs use
``tfds.testing.mock_data`` inside the child (``_MOCK_MAIN``): it generates the
same reviews in every process, so a killed and a fresh process see the same
data, and no prepared IMDB is needed.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
TINY = ["--vocab_size", "60", "--embed_dim", "8", "--hidden_size", "6", "--attention_size", "4",
        "--max_length", "12", "--batch_size", "8"]
NUM_EXAMPLES = 32  # 4 steps per epoch
RUN = TINY + ["--num_epochs", "2", "--checkpoint_every", "1", "--log_every", "1"]
_MOCK_MAIN = ("import sys, tensorflow_datasets as tfds, train\n"
              "with tfds.testing.mock_data(num_examples=int(sys.argv[1])):\n"
              "    rc = train.main(sys.argv[2:])\n"
              "sys.exit(rc)\n")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1"}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(_child_compilation_cache):
    """Child processes share the worker's compilation cache (tests/conftest.py): same HLO -> same numerics."""
    ENV.update(_child_compilation_cache)


def _mock_cmd(*args):
    return [sys.executable, "-c", _MOCK_MAIN, str(NUM_EXAMPLES), *args]


def _train(workdir, *extra, timeout=300):
    return subprocess.run(_mock_cmd(*RUN, "--workdir", str(workdir), *extra), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _cli(*args, env_extra=None, timeout=120):
    """Plain ``python train.py ARGS`` (no mock data)."""
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env={**ENV, **(env_extra or {})},
                          capture_output=True, text=True, timeout=timeout)


def _state(workdir, step=None):
    """``(step, {path: array})`` of the latest (or given) checkpoint, restored without a target."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(workdir, "checkpoints").absolute(), item_names=("state", "meta")) as mgr:
        step = mgr.latest_step() if step is None else step
        state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state)}


def _checksums(workdir):
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(workdir).rglob("*")) if p.is_file()}


def _error_line(out):
    """The single ``error:`` line; fails on a Python traceback."""
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: 2 epochs x 4 steps, a checkpoint after every step."""
    w = tmp_path_factory.mktemp("reference") / "run"
    out = _train(w)
    assert out.returncode == 0, out.stderr[-3000:]
    return w


def _tmp_dirs(workdir):
    d = Path(workdir, "checkpoints")
    return sorted(p.name for p in d.iterdir() if ".orbax-checkpoint-tmp" in p.name) if d.is_dir() else []


def _finished_steps(workdir):
    d = Path(workdir, "checkpoints")
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _kill_when(workdir, condition, delay=0.0, timeout=240):
    """Starts training, SIGKILLs it ``delay`` s after ``condition(workdir)`` holds; returns its exit status."""
    proc = subprocess.Popen(_mock_cmd(*RUN, "--workdir", str(workdir)), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_end = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < t_end:
            if condition(workdir):
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigkill_mid_save_and_mid_step_then_resume_matches_uninterrupted(reference, tmp_path):
    """Kill -9 while orbax writes step >= 2, then at a random moment after a later step;
    the third start finishes. Same data order and dropout keys -> bit-identical parameters."""
    rng = random.Random(0)
    w = tmp_path / "run"
    first = rng.randint(2, 4)
    rc = _kill_when(w, lambda d: any(n.split(".")[0] == str(first) for n in _tmp_dirs(d)))
    assert rc == -signal.SIGKILL, "training ended before the kill"
    left = _tmp_dirs(w)
    assert left, "the kill did not hit a save in progress"  # a partial step-`first` folder is on disk
    assert max(_finished_steps(w)) < first  # ... and it is not a finished checkpoint

    second = rng.randint(first + 1, 6)
    delay = rng.uniform(0.0, 0.3)  # somewhere inside the following step(s) or save
    rc = _kill_when(w, lambda d: bool(_finished_steps(d)) and max(_finished_steps(d)) >= second, delay)
    assert rc == -signal.SIGKILL, "training ended before the kill"
    resumed_from = max(_finished_steps(w))

    out = _train(w)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Resuming from step {resumed_from}" in out.stdout, (first, second, delay, out.stdout[-2000:])
    assert _tmp_dirs(w) == []  # partial folders were cleaned up
    step_a, a = _state(reference)
    step_b, b = _state(w)
    assert step_a == step_b == 8
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    # metrics.jsonl: replayed steps are not duplicated, no torn lines.
    steps = [(r["event"], r["step"]) for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())]
    assert len(steps) == len(set(steps)) and ("eval", 8) in steps


def _logged_steps(workdir):
    path = Path(workdir, "metrics.jsonl")
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return [r["step"] for r in map(json.loads, lines) if r["event"] == "train"]


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resume_matches_uninterrupted(tmp_path):
    """A preemption notice (SIGTERM) mid-epoch: exit 143 after checkpointing the finished step."""
    # 6 epochs x 4 steps: the signal goes out after step 5 or 6 is logged, and the run must
    # still be going when it lands, even when a loaded machine delays the handler by steps.
    epochs = ["--num_epochs", "6", "--log_every", "1"]
    reference = _train(tmp_path / "reference", *epochs[:2])
    assert reference.returncode == 0, reference.stderr[-3000:]
    w = tmp_path / "run"
    run = TINY + epochs  # no periodic checkpoints: the stop must save
    proc = subprocess.Popen(_mock_cmd(*run, "--workdir", str(w)), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t_end = time.time() + 240
    while proc.poll() is None and time.time() < t_end and not any(s in (5, 6) for s in _logged_steps(w)):
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("stopped: ")]
    assert len(line) == 1 and "SIGTERM received" in line[0] and "rerun the same command" in line[0], err[-2000:]
    stopped_at = max(_finished_steps(w))
    assert 5 <= stopped_at < 24 and f"after step {stopped_at}" in line[0]

    out = _train(w, *epochs[:2])  # same flags but periodic checkpoints: allowed to change on resume
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Resuming from step {stopped_at}" in out.stdout
    step_a, a = _state(tmp_path / "reference")
    step_b, b = _state(w)
    assert step_a == step_b == 24
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)


@pytest.mark.slow
def test_incompatible_workdir_is_refused_and_untouched(reference, tmp_path):
    w = tmp_path / "run"
    shutil.copytree(reference, w)
    before = _checksums(w)
    for flags, named in ((["--hidden_size", "7"], "model.hidden_size: saved 6, requested 7"),
                         (["--vocab_size", "70"], "data.vocab_size: saved 60, requested 70")):
        out = _train(w, *flags)
        assert out.returncode == 2
        line = _error_line(out)
        assert "different configuration" in line and named in line
        assert _checksums(w) == before
    # Without config.json (e.g. deleted) the checkpoint's own shapes still catch the mismatch.
    (w / "config.json").unlink()
    before = _checksums(w)
    out = _train(w, "--hidden_size", "7")
    assert out.returncode == 2
    line = _error_line(out)
    assert "does not fit the requested model" in line and "params/" in line and "(2, 18)" in line
    after = _checksums(w)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing rewritten
    assert "config.json" not in after  # and no config claiming the other model


@pytest.mark.slow
def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    """lr 1e30: Adam's first update is ~lr in size, so by step 2 the state holds Inf/NaN."""
    w = tmp_path / "run"
    out = _train(w, "--learning_rate", "1e30")
    assert out.returncode == 3, out.stderr[-3000:]
    line = _error_line(out)
    assert "diverged" in line and "--learning_rate" in line
    kept = _finished_steps(w)
    assert kept and f"last good checkpoint (step {max(kept)})" in line
    assert max(kept) < 8  # it stopped early
    _, leaves = _state(w)
    assert all(np.isfinite(v).all() for v in leaves.values() if v.dtype.kind == "f")


# ----------------------------------------------------------------------------- bad input


BAD_FLAGS = [
    (["--model", "transformerx"], "unknown --model 'transformerx'; choose one of"),
    (["--batch_size", "7"], "--batch_size 7 is not divisible by the 2 devices; use a multiple of 2"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--truncate", "middle"], "truncate must be 'pre'"),
    (["--num_processes", "2"], "need a coordinator: pass --coordinator_address"),
    (["--num_processes", "2", "--process_id", "2", "--coordinator_address", "127.0.0.1:1"],
     "--process_id must be in 0..1"),
]
# One process checks every bad command line (one start-up, not one per case): each train.main call's
# stderr is captured on its own; an exception escaping main would end the child with a traceback.
_BAD_FLAGS_CHILD = """
import contextlib, io, json, sys, train
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train.main(argv)
    results.append((rc, err.getvalue()))
print("RESULTS " + json.dumps(results))
"""


def test_bad_flags_fail_with_one_line(tmp_path):
    """Bad flags, an unwritable workdir, predict without a trained workdir: exit 2, one error line, nothing written."""
    argvs = [[*TINY, "--workdir", str(tmp_path / f"w{i}"), *args] for i, (args, _) in enumerate(BAD_FLAGS)]
    blocker = tmp_path / "file.txt"  # a regular file where a directory must go (works even as root)
    blocker.write_text("precious")
    argvs += [[*TINY, "--workdir", str(blocker / "run")], ["predict", "--workdir", str(tmp_path / "nothing"), "Great film"]]
    expected = [e for _, e in BAD_FLAGS] + ["is not a writable directory", "config.json not found"]
    env = {**ENV, "XLA_FLAGS": ENV["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2"}  # for the divisibility case
    out = subprocess.run([sys.executable, "-c", _BAD_FLAGS_CHILD, json.dumps(argvs)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    results = json.loads(out.stdout.split("RESULTS ")[-1])
    assert len(results) == len(argvs)
    for (rc, err), argv, fragment in zip(results, argvs, expected):
        assert rc == 2, (argv, err)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and fragment in errors[0], (argv, err)
    assert not any((tmp_path / f"w{i}").exists() for i in range(len(BAD_FLAGS)))  # refused before writing
    assert blocker.read_text() == "precious" and not (tmp_path / "nothing").exists()


def test_missing_dataset_fails_with_one_line(tmp_path):
    empty = tmp_path / "no_tfds"
    out = _cli(*TINY, "--workdir", str(tmp_path / "w"), env_extra={"TFDS_DATA_DIR": str(empty)})
    assert out.returncode == 2
    line = _error_line(out)
    assert "imdb_reviews (split 'train') is not prepared" in line and "TFDS_DATA_DIR" in line


@pytest.mark.slow
@pytest.mark.parametrize("texts, expected", [
    ([" "], "non-empty review text"),
    (["Great film", "1234 !!!"], "text 2 has no words to classify"),
])
def test_malformed_predict_text_fails_with_one_line(reference, texts, expected):
    before = _checksums(reference)
    out = _cli("predict", "--workdir", str(reference), *texts)
    assert out.returncode == 2
    assert expected in _error_line(out)
    assert _checksums(reference) == before
