"""Seq2seq losses, the paper's schedule/optimiser, and the seq2seq tasks in the one training loop."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_attention.training as training
from flax_attention.training import seq2seq as Q
from flax_attention.training import seq2seq_loss as S

ROOT = Path(__file__).parents[1]
TINY = ["--model", "seq2seq", "--task", "reverse", "--num_symbols", "4", "--max_len", "3", "--test_max_len", "4",
        "--d_model", "16", "--num_heads", "2", "--d_ff", "32", "--num_encoder_layers", "1",
        "--num_decoder_layers", "1", "--batch_size", "8", "--warmup_steps", "3", "--steps_per_epoch", "3",
        "--num_epochs", "2", "--eval_examples", "8", "--length_eval_per_length", "2", "--decode_batch", "8",
        "--eval_batch_size", "8"]


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_smoothed_cross_entropy_is_kl_to_smoothed_target(eps):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(3, 4))
    q = np.full((3, 4, 7), eps / 6)
    np.put_along_axis(q, targets[..., None], 1 - eps, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q_log_q = np.where(q > 0, q * np.log(q), 0.0)
    kl = (q_log_q - q * np_log_softmax(logits)).sum(-1)
    got = S.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), eps)
    np.testing.assert_allclose(got, kl, rtol=1e-5, atol=1e-5)
    if eps > 0:  # predicting the smoothed target exactly costs zero
        np.testing.assert_allclose(S.smoothed_cross_entropy(jnp.log(jnp.asarray(q)), targets, eps), 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        S.smoothed_cross_entropy(logits, targets, 1.0)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_smoothed_cross_entropy_gradient_is_softmax_minus_target_in_float64(eps):
    # d/dx of the smoothed cross-entropy is softmax(x) - q (q the smoothed
    # target); float64 in, float64 out, checked against NumPy.
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 9)) * 4
    targets = rng.integers(0, 9, size=5)
    q = np.full((5, 9), eps / 8)
    np.put_along_axis(q, targets[:, None], 1 - eps, axis=-1)
    with jax.enable_x64(True):
        loss, grad = jax.value_and_grad(lambda x: S.smoothed_cross_entropy(x, jnp.asarray(targets), eps).sum())(
            jnp.asarray(logits))
        assert grad.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(grad), np.exp(np_log_softmax(logits)) - q, rtol=1e-12, atol=1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = (np.where(q > 0, q * np.log(q), 0.0) - q * np_log_softmax(logits)).sum()
    np.testing.assert_allclose(float(loss), kl, rtol=1e-12)
    # bfloat16 logits are scored in float32.
    assert S.smoothed_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), eps).dtype == jnp.float32


def _fake_apply(logits):
    return lambda variables, src, tgt_in, deterministic, rngs: jnp.asarray(logits)


def test_seq2seq_loss_ignores_padding_and_sums_split_exactly():
    rng = np.random.default_rng(1)
    targets = np.array([[5, 4, 2, 0, 0], [3, 2, 0, 0, 0]])
    logits = rng.normal(size=(2, 5, 6)).astype(np.float32)
    loss_fn = Q.seq2seq_loss(0.1)
    batch = {"src": targets, "tgt_in": targets, "tgt_out": targets}
    loss, sums = loss_fn(None, _fake_apply(logits), batch, {}, False)
    garbage = logits.copy()
    garbage[targets == 0] = 100.0 * rng.normal(size=(5, 6))  # padding positions change nothing
    loss2, _ = loss_fn(None, _fake_apply(garbage), batch, {}, False)
    assert float(sums["weight"]) == 5.0
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    # Hand value: row 0 gets 2 of 3 right, row 1 both -> 4 of 5 tokens.
    pred = np.array([[5, 4, 1, 0, 3], [3, 2, 4, 4, 4]])
    _, s = loss_fn(None, _fake_apply(jax.nn.one_hot(pred, 6) * 10.0), batch, {}, False)
    assert float(s["accuracy"]) == 4.0
    # Sums over halves add up to the whole: the psum over devices is exact.
    halves = [loss_fn(None, _fake_apply(logits[i:i + 1]), {k: v[i:i + 1] for k, v in batch.items()}, {}, False)
              for i in (0, 1)]
    np.testing.assert_allclose(float(halves[0][0] + halves[1][0]), float(loss), rtol=1e-6)


def test_sequence_match_stops_at_eos():
    targets = jnp.array([[5, 4, 2, 0], [3, 2, 0, 0], [6, 2, 0, 0]])
    pred = jnp.array([[5, 4, 2, 7, 7, 7], [3, 3, 2, 0, 0, 0], [6, 6, 0, 0, 0, 0]])
    np.testing.assert_array_equal(S.sequence_match(pred, targets), [True, False, False])


def test_rsqrt_schedule_is_equation_3_with_its_peak_as_learning_rate():
    d, w = 512, 4000
    cfg = training.TrainConfig(learning_rate=(d * w) ** -0.5, lr_schedule="rsqrt", warmup_steps=w)
    sched = training.learning_rate_schedule(cfg, 100_000)
    for count in [0, 99, 3999, 4000, 15999]:
        step = count + 1
        np.testing.assert_allclose(float(sched(count)), d**-0.5 * min(step**-0.5, step * w**-1.5), rtol=1e-5)
    assert float(sched(3999)) > float(sched(3000)) and float(sched(3999)) > float(sched(5000))
    with pytest.raises(ValueError, match="warmup_steps"):
        training.TrainConfig(lr_schedule="rsqrt", warmup_steps=0)


def test_linear_cooldown_follows_then_anneals_to_zero():
    cfg = training.TrainConfig(learning_rate=0.01, lr_schedule="rsqrt", warmup_steps=10)
    base = training.learning_rate_schedule(cfg, 100)
    sched = training.learning_rate_schedule(cfg.__class__(**{**cfg.__dict__, "cooldown_fraction": 0.2}), 100)
    for count in [0, 9, 50, 79]:  # c = 20 cooldown updates from s0 = 80
        assert float(sched(count)) == pytest.approx(float(base(count)), rel=1e-6)
    peak = float(base(80))
    for count in [80, 90, 99]:
        assert float(sched(count)) == pytest.approx(peak * (100 - count) / 20, rel=1e-5)
    assert float(sched(100)) == 0.0 and float(sched(150)) == 0.0
    with pytest.raises(ValueError, match="cooldown_fraction"):
        training.TrainConfig(cooldown_fraction=1.5)


def test_optimizer_is_adam_098_1e9():
    # Two steps of Adam(lr, 0.9, 0.98, 1e-9) by hand, in float64.
    g1, g2, lr = np.array([0.3, -2.0]), np.array([-0.1, 1.0]), 0.01
    tx = training.make_optimizer(training.TrainConfig(learning_rate=lr, lr_schedule="constant", adam_b2=0.98,
                                                      adam_eps=1e-9))
    params = jnp.zeros(2)
    opt = tx.init(params)
    updates = []
    for g in (g1, g2):
        u, opt = tx.update(jnp.asarray(g, jnp.float32), opt, params)
        updates.append(np.asarray(u))
    m = v = 0.0
    for t, g in enumerate((g1, g2), start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.98 * v + 0.02 * g * g
        np.testing.assert_allclose(updates[t - 1], -lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.98**t)) + 1e-9),
                                   rtol=1e-5)


def test_short_training_through_the_common_step_lowers_the_loss():
    from flax_attention.training.registry import get_task

    task = get_task("seq2seq")
    configs = {"model": Q.Seq2SeqModelConfig(d_model=32, num_heads=2, d_ff=64, num_encoder_layers=1,
                                             num_decoder_layers=1, dropout_rate=0.1),
               "data": Q.SyntheticConfig(task="copy", num_symbols=4, max_len=4, test_max_len=5, eval_examples=64),
               "decode": Q.DecodeConfig(),
               "train": training.TrainConfig(learning_rate=3e-3, lr_schedule="constant", batch_size=16)}
    data = task.prepare(None, configs)
    from flax_attention.training.loop import create_train_state, eval_step, evaluate, train_step
    model, state = create_train_state(task, configs, data.extras, 40)
    rstate, step, ev = training.replicate(state), train_step(task, configs), eval_step(task, configs)
    before = evaluate(ev, rstate, data, 64)
    for i, batch in zip(range(40), data.train_batches(16, 0, 0)):
        rstate, _ = step(rstate, {k: v[None] for k, v in batch.items()})
    after = evaluate(ev, rstate, data, 64)
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    assert int(training.unreplicate(rstate).step) == 40


def _train_py(*args, timeout=600):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _params(workdir, step):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(workdir, "checkpoints").absolute(), item_names=("state", "meta")) as mgr:
        state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    return jax.tree_util.tree_leaves(state["params"])


@pytest.mark.slow
def test_seq2seq_resume_refusal_translate_and_visualize_through_the_common_loop(tmp_path, capsys,
                                                                                in_process_compilation_cache):
    """With dropout on: a run cut after epoch 1 and resumed ends with the uninterrupted parameters; a changed
    model is refused; the finished workdir translates and visualizes (heatmaps), and refuses bad symbols.

    All in-process (``train.main`` with the CLI's argv): one trained workdir serves every check, and the
    runs after the first reuse its compiled programs (tests/conftest.py)."""
    import train

    tiny = TINY + ["--dropout_rate", "0.1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert train.main(tiny + ["--workdir", a]) == 0
    out = capsys.readouterr().out
    assert "exact match by length: 1:" in out and "Final evaluation" in out
    assert train.main(tiny + ["--workdir", b]) == 0
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")  # "crash" after the epoch-1 checkpoint
    assert train.main(tiny + ["--workdir", b]) == 0
    assert "Resuming from step 3" in capsys.readouterr().out
    for x, y in zip(_params(a, 6), _params(b, 6)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and "exact_match" in evals[-1] and "exact_len4" in evals[-1]
    # A changed model is refused with the field named; nothing is overwritten.
    before = (tmp_path / "a" / "config.json").read_text()
    assert train.main(tiny + ["--workdir", a, "--d_ff", "64"]) == 2
    assert "model.d_ff" in capsys.readouterr().err
    assert (tmp_path / "a" / "config.json").read_text() == before
    # translate / visualize on the finished workdir: cross-attention and encoder self-attention heatmaps.
    assert train.main(["translate", "--workdir", a, "1 2 3", "0 0"]) == 0
    assert "1 2 3 ->" in capsys.readouterr().out
    assert (tmp_path / "a" / "heatmaps" / "input_1" / "cross_layer0.png").stat().st_size > 1000
    assert train.main(["visualize", "--workdir", a, "--num_examples", "2"]) == 0
    assert len(list((tmp_path / "a" / "heatmaps").glob("example_*/encoder_self_layer0.png"))) == 2
    assert train.main(["translate", "--workdir", a, "7 x"]) == 2
    assert "symbol indices" in capsys.readouterr().err


def test_workdir_of_the_retired_seq2seq_trainer_is_refused_untouched(tmp_path):
    import train

    old = {"model_name": "seq2seq", "task": {"name": "reverse"}, "model": {"d_model": 64}, "train": {"steps": 2000}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert train.main(TINY + ["--workdir", str(tmp_path)]) == 2
    assert json.loads((tmp_path / "config.json").read_text()) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert train.main(["visualize", "--workdir", str(tmp_path)]) == 2


@pytest.mark.slow
def test_seq2seq_sigterm_checkpoints_the_step_and_resume_matches_uninterrupted(tmp_path):
    """SIGTERM mid-epoch through the common loop: exit 143, checkpoint of that step, bit-identical resume."""
    import signal
    import time

    run = TINY + ["--steps_per_epoch", "12", "--log_every", "1", "--dropout_rate", "0.1"]
    assert _train_py(*run, "--workdir", str(tmp_path / "ref")).returncode == 0
    w = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *run, "--workdir", str(w)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, t_end = w / "metrics.jsonl", time.time() + 300
    while proc.poll() is None and time.time() < t_end:
        steps = [json.loads(l).get("step", 0) for l in log.read_text().splitlines()] if log.exists() else []
        if any(3 <= s < 10 for s in steps):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    stopped = [x for x in err.splitlines() if x.startswith("stopped: SIGTERM received")]
    saved = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    assert len(stopped) == 1 and saved and 3 <= saved[-1] < 12 and f"after step {saved[-1]}" in stopped[0]
    out = _train_py(*run, "--workdir", str(w))
    assert out.returncode == 0 and f"Resuming from step {saved[-1]}" in out.stdout, out.stderr[-2000:]
    for a, b in zip(_params(tmp_path / "ref", 24), _params(w, 24)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
