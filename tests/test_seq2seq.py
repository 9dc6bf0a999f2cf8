"""Seq2seq losses, metrics, the paper's schedule/optimiser, train/eval steps and the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention import seq2seq as S
from flax_attention import seq2seq_train as ST
from flax_attention.data import tasks as T
from flax_attention.layers import TransformerConfig
from flax_attention.transformer import Transformer


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
    # Predicting the smoothed target exactly costs zero.
    if eps > 0:
        np.testing.assert_allclose(S.smoothed_cross_entropy(jnp.log(jnp.asarray(q)), targets, eps), 0.0,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        S.smoothed_cross_entropy(logits, targets, 1.0)


def test_padding_excluded_from_loss_and_metrics():
    rng = np.random.default_rng(1)
    targets = np.array([[5, 4, 2, 0, 0], [3, 2, 0, 0, 0]])
    logits = rng.normal(size=(2, 5, 6)).astype(np.float32)
    loss, count = S.masked_loss(jnp.asarray(logits), jnp.asarray(targets))
    changed = logits.copy()
    changed[targets == 0] = 100.0 * rng.normal(size=(5, 6))  # garbage at padding
    loss2, _ = S.masked_loss(jnp.asarray(changed), jnp.asarray(targets))
    assert float(count) == 5.0
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)

    pred = np.array([[5, 4, 1, 0, 3], [3, 2, 4, 4, 4]])  # row 0: 2/3 right; row 1: exact
    onehot = jax.nn.one_hot(pred, 6) * 10.0
    m = S.summarize({"loss": jnp.float32(0.0), **S.token_metrics(onehot, jnp.asarray(targets))})
    assert m["token_acc"] == pytest.approx(4 / 5) and m["exact_match"] == pytest.approx(0.5)


def test_sequence_match_stops_at_eos():
    targets = jnp.array([[5, 4, 2, 0], [3, 2, 0, 0], [6, 2, 0, 0]])
    pred = jnp.array([[5, 4, 2, 7, 7, 7], [3, 3, 2, 0, 0, 0], [6, 6, 0, 0, 0, 0]])
    np.testing.assert_array_equal(S.sequence_match(pred, targets), [True, False, False])


def test_schedule_matches_equation_3():
    sched = S.transformer_schedule(d_model=512, warmup_steps=4000)
    for count in [0, 99, 3999, 4000, 15999]:
        step = count + 1
        expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
        np.testing.assert_allclose(float(sched(count)), expected, rtol=1e-5)
    assert float(sched(3999)) > float(sched(3000)) and float(sched(3999)) > float(sched(5000))
    assert float(S.transformer_schedule(512, 4000, scale=2.0)(10)) == pytest.approx(2 * float(sched(10)))


def test_linear_cooldown_follows_then_anneals_to_zero():
    base = S.transformer_schedule(d_model=64, warmup_steps=10)
    sched = S.with_linear_cooldown(base, total_steps=100, cooldown_fraction=0.2)  # c = 20, s0 = 80
    for count in [0, 9, 50, 79]:
        assert float(sched(count)) == pytest.approx(float(base(count)), rel=1e-6)
    peak = float(base(80))
    for count in [80, 90, 99]:
        assert float(sched(count)) == pytest.approx(peak * (100 - count) / 20, rel=1e-5)
    assert float(sched(100)) == 0.0 and float(sched(150)) == 0.0
    assert S.with_linear_cooldown(base, 100, 0.0) is base
    with pytest.raises(ValueError, match="cooldown_fraction"):
        S.with_linear_cooldown(base, 100, 1.5)
    with pytest.raises(ValueError, match="cooldown_fraction"):
        ST.Seq2SeqTrainConfig(cooldown_fraction=-0.1)


def test_optimizer_is_adam_098_1e9():
    # Two steps of Adam(lr, 0.9, 0.98, 1e-9) by hand, in float64.
    g1, g2, lr = np.array([0.3, -2.0]), np.array([-0.1, 1.0]), 0.01
    tx = S.transformer_optimizer(lr)
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
        expected = -lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.98**t)) + 1e-9)
        np.testing.assert_allclose(updates[t - 1], expected, rtol=1e-5)


def tiny_setup(dropout=0.0):
    task = T.TaskConfig(name="copy", num_symbols=4, min_len=1, max_len=4, test_max_len=5)
    config = TransformerConfig(vocab_size=task.vocab_size, d_model=32, num_heads=2, d_ff=64,
                               num_encoder_layers=1, num_decoder_layers=1, dropout_rate=dropout, max_len=8)
    model = Transformer(config)
    batch = {k: jnp.asarray(v) for k, v in T.train_batch(task, 16, 0).items() if k != "length"}
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["src"], batch["tgt_in"])["params"]
    tx = S.transformer_optimizer(S.transformer_schedule(32, warmup_steps=20, scale=2.0))
    state = S.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                dropout_rng=jax.random.PRNGKey(1))
    return task, model, state, batch


def test_short_training_lowers_the_loss():
    task, model, state, _ = tiny_setup(dropout=0.1)
    step = jax.jit(S.make_train_step(model, 0.1))
    evaluate = jax.jit(S.make_eval_step(model, 0.1))
    held_out = {k: jnp.asarray(v) for k, v in T.test_set(task, 64).items() if k != "length"}
    before = S.summarize(evaluate(state.params, held_out))
    for i in range(40):
        batch = {k: jnp.asarray(v) for k, v in T.train_batch(task, 16, i).items() if k != "length"}
        state, _ = step(state, batch)
    after = S.summarize(evaluate(state.params, held_out))
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    assert int(state.step) == 40


def test_data_parallel_step_equals_single_device():
    # vmap with an axis name runs the same psum code path as pmap over 2 devices.
    _, model, state, batch = tiny_setup()
    single, m1 = jax.jit(S.make_train_step(model, 0.1))(state, batch)
    halves = {k: v.reshape(2, 8, *v.shape[1:]) for k, v in batch.items()}
    step = jax.vmap(S.make_train_step(model, 0.1, axis_name="batch"), in_axes=(None, 0), axis_name="batch")
    split, m2 = jax.jit(step)(state, halves)
    for a, b in zip(jax.tree_util.tree_leaves(single.params), jax.tree_util.tree_leaves(split.params)):
        np.testing.assert_allclose(b[0], a, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(b[1], a, rtol=2e-5, atol=2e-6)
    for k in m1:
        np.testing.assert_allclose(m2[k][0], m1[k], rtol=1e-5)


@pytest.mark.slow
def test_train_seq2seq_loop_reports_metrics_by_length():
    task = T.TaskConfig(name="reverse", num_symbols=4, min_len=1, max_len=3, test_max_len=5)
    config = TransformerConfig(vocab_size=task.vocab_size, d_model=16, num_heads=2, d_ff=32,
                               num_encoder_layers=1, num_decoder_layers=1, max_len=8)
    train = ST.Seq2SeqTrainConfig(steps=6, batch_size=8, warmup_steps=3, eval_every=3, eval_examples=12,
                                 length_eval_per_length=2, decode_batch=8)
    lines = []
    params, history = ST.train_seq2seq(config, task, train, log=lines.append)
    assert [h["step"] for h in history] == [3, 6] and len(lines) == 3
    assert set(history[-1]["length_eval"]["exact_by_length"]) == {1, 2, 3, 4, 5}
    for key in ("train_loss", "test_token_acc", "test_exact_match"):
        assert np.isfinite(history[-1][key])
    with pytest.raises(ValueError, match="vocab"):
        ST.train_seq2seq(config.replace(vocab_size=9, output_vocab_size=None), task, train)


@pytest.mark.slow
def test_seq2seq_resume_equals_uninterrupted_and_loads_best(tmp_path):
    import shutil

    from flax_attention.seq2seq_checkpoint import load_trained

    task = T.TaskConfig(name="reverse", num_symbols=4, min_len=1, max_len=3, test_max_len=4)
    config = TransformerConfig(vocab_size=task.vocab_size, d_model=16, num_heads=2, d_ff=32,
                               num_encoder_layers=1, num_decoder_layers=1, max_len=8, dropout_rate=0.1)
    train = ST.Seq2SeqTrainConfig(steps=6, batch_size=8, warmup_steps=3, eval_every=3, eval_examples=8,
                                 length_eval_per_length=1, decode_batch=8)
    quiet = lambda line: None  # noqa: E731
    full, _ = ST.train_seq2seq(config, task, train, log=quiet, workdir=tmp_path / "a")
    ST.train_seq2seq(config, task, train, log=quiet, workdir=tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")  # "crash" after the step-3 checkpoint
    lines = []
    resumed, history = ST.train_seq2seq(config, task, train, log=lines.append, workdir=tmp_path / "b")
    assert lines[0].startswith("resuming from step 3") and [h["step"] for h in history] == [3, 6]
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    model, params, task2, train2, step = load_trained(tmp_path / "a")
    assert task2 == task and train2 == train and model.config == config and step in (3, 6)
    with pytest.raises(Exception, match="different configuration"):
        ST.train_seq2seq(config.replace(d_ff=64), task, train, log=quiet, workdir=tmp_path / "a")
