"""train.py --model lm: loss and counts by hand, document isolation, flags, end-to-end run, resume, generate."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_attention.data import lm_corpus as C
from flax_attention.training import lm as T
from flax_attention.training.steps import summarize


def _hand_batch():
    # Reviews [10 11 12] (2 words), [20] (1 word), [30..34] (4 words) in rows of L = 4: see test_lm_data.
    c = C.EncodedCorpus(np.array([10, 11, 12, 20, 30, 31, 32, 33, 34], np.int32), np.array([0, 3, 4, 9]),
                        np.array([2, 1, 4]))
    return C.PackedRows(c, np.arange(3), 4).rows([0, 1, 2, 3, -1])


def test_loss_token_and_word_counts_by_hand():
    v = 40
    batch = _hand_batch()

    def uniform(variables, tokens, **kw):  # every token equally likely: NLL log V per target
        return jnp.zeros(tokens.shape + (v,), jnp.float32)

    loss_sum, sums = T.lm_loss({}, uniform, batch, {}, False)
    # 12 targets = 9 pieces + 3 EOS; 10 words = (2 + 1) + (1 + 1) + (4 + 1); argmax 0 is never a counted target.
    assert float(sums["weight"]) == 12 and float(sums["words"]) == 10 and float(sums["accuracy"]) == 0
    np.testing.assert_allclose(float(loss_sum), 12 * math.log(v), rtol=1e-6)
    m = summarize({k: float(x) for k, x in sums.items()})
    p = T.perplexities(m)
    np.testing.assert_allclose(p["token_perplexity"], v, rtol=1e-5)
    np.testing.assert_allclose(p["word_perplexity"], math.exp(12 * math.log(v) / 10), rtol=1e-5)
    np.testing.assert_allclose(p["log_likelihood"], -math.log(v), rtol=1e-6)
    assert m["examples"] == 12


def test_no_target_depends_on_another_review():
    """Changing review 1's tokens leaves every per-target loss of review 2 (same packed row) unchanged."""
    from flax_attention.models.lm import LanguageModel, LMConfig

    model = LanguageModel(LMConfig(vocab_size=40, max_length=8, d_model=16, num_heads=2, num_layers=2, d_ff=32,
                                   dropout_rate=0.0))
    c = C.EncodedCorpus(np.array([5, 6, 7, 8, 9, 10], np.int32), np.array([0, 3, 6]), np.array([1, 1]))
    batch = C.PackedRows(c, np.arange(2), 8).rows([0])  # [BOS 5 6 7 EOS BOS 8 9] -> [5 6 7 EOS BOS 8 9 10]
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(batch["inputs"]))["params"]

    @jax.jit
    def nll(b):
        logits = model.apply({"params": params}, b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"])
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)[..., 0]

    def per_target(b):
        return np.asarray(nll({k: b[k] for k in ("inputs", "targets", "positions", "segment_ids")}))

    changed = {k: v.copy() for k, v in batch.items()}
    changed["inputs"][0, 1:4] = [20, 21, 22]
    changed["targets"][0, 0:3] = [20, 21, 22]
    a, b = per_target(batch), per_target(changed)
    second = batch["segment_ids"][0] == 2
    assert second.sum() == 3 and batch["weights"][0, 4] == 0  # EOS -> BOS is not a target
    np.testing.assert_array_equal(a[0, second], b[0, second])
    assert not np.allclose(a[0, :3], b[0, :3])


def test_flag_defaults_and_bad_generate_flags_fail_before_loading(tmp_path, capsys):
    import train

    _, _, task, configs = train.parse_args(["--model", "lm"])
    assert task.name == "lm" and configs["model"].d_model == T.FLAG_DEFAULTS["d_model"]
    assert configs["data"].max_length == configs["model"].max_length == T.FLAG_DEFAULTS["max_length"]
    missing = str(tmp_path / "nothing")
    for flags, message in [(["--temperature", "-1"], "--temperature -1.0 must be >= 0"),
                           (["--top_k", "0"], "--top_k 0 must be >= 1"),
                           (["--top_p", "1.5"], "--top_p 1.5 must be in (0, 1]"),
                           (["--max_new_tokens", "-2"], "--max_new_tokens -2 must be >= 0"),
                           (["--num_samples", "0"], "--num_samples 0 must be >= 1"),
                           ([], "config.json not found")]:
        assert train.main(["generate", "--workdir", missing, "--prompt", "a", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "nothing").exists()  # nothing written
    (tmp_path / "bigru").mkdir()
    (tmp_path / "bigru" / "config.json").write_text(json.dumps({"model_name": "bigru", "model": {}}))
    assert train.main(["generate", "--workdir", str(tmp_path / "bigru"), "--prompt", "a"]) == 2
    assert "holds a --model bigru run; generate needs a --model lm workdir" in capsys.readouterr().err
    assert train.main(["--model", "lm", "--eos_id", "3", "--workdir", missing]) == 2
    assert "the SentencePiece model of --model lm uses 0/1/2" in capsys.readouterr().err
    assert configs["data"].valid_reviews == 1000
    assert train.main(["--model", "lm", "--valid_reviews", "0", "--workdir", missing]) == 2
    err = capsys.readouterr().err
    assert "--valid_reviews 0: model selection needs validation reviews" in err and err.count("\n") == 1, err
    assert not (tmp_path / "nothing").exists()


def test_default_warmup_longer_than_a_short_run_is_named_and_inference_builds_the_state(tmp_path, capsys):
    import tensorflow_datasets as tfds

    import train
    from flax_attention.training.loop import create_train_state

    tiny = TINY_LM[:TINY_LM.index("--learning_rate")] + ["--spm_sample_reviews", "0", "--valid_reviews", "2"]
    _, _, task, configs = train.parse_args(tiny)
    assert configs["train"].lr_schedule == "cosine" and configs["train"].warmup_steps == 200
    create_train_state(task, configs)  # what generate/--init_from do: a 1-epoch horizon must still build
    with tfds.testing.mock_data(num_examples=8):
        assert train.main(tiny + ["--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "--warmup_steps 200 leaves the cosine schedule no steps to decay over" in err and err.count("\n") == 1
    assert not (tmp_path / "w" / "config.json").exists()


TINY_LM = ["--model", "lm", "--vocab_size", "40", "--max_length", "16", "--d_model", "16", "--num_heads", "2",
           "--num_layers", "1", "--d_ff", "32", "--batch_size", "4", "--eval_batch_size", "8", "--learning_rate", "0.01",
           "--lr_schedule", "constant", "--warmup_steps", "0", "--spm_sample_reviews", "0", "--train_reviews", "0",
           "--valid_reviews", "6"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny LM trained for 2 epochs on mock IMDB (20 reviews per split): ``(workdir, stdout)``."""
    import contextlib
    import io

    import tensorflow_datasets as tfds

    import train

    w = tmp_path_factory.mktemp("lm") / "run"
    out = io.StringIO()
    with tfds.testing.mock_data(num_examples=20), contextlib.redirect_stdout(out):
        assert train.main(TINY_LM + ["--workdir", str(w), "--num_epochs", "2"]) == 0
    return w, out.getvalue()


@pytest.mark.slow
def test_train_py_lm_end_to_end_resume_and_generate(lm_run, tmp_path, capsys):
    import shutil

    import tensorflow_datasets as tfds

    import train

    w = tmp_path / "run"
    shutil.copytree(lm_run[0], w)
    with tfds.testing.mock_data(num_examples=20):  # resume for a third epoch, on the jit/mesh path
        assert train.main(TINY_LM + ["--workdir", str(w), "--num_epochs", "3", "--mesh", "data=1"]) == 0
    out = capsys.readouterr().out
    evals = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["event"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2, 3]
    ppl = [r["token_perplexity"] for r in evals]
    assert ppl[0] > ppl[1] > ppl[2] and ppl[0] < 40, ppl  # below uniform over the 40 ids, and falling
    assert all(r["word_perplexity"] > r["token_perplexity"] for r in evals)  # > 1 token per word on mock text
    described = re.search(r"20 test reviews \((\d+) tokens", out)
    assert "Resuming from step 12" in out and described, out
    assert f"on all {described.group(1)} test tokens" in out  # the whole test split, every token once
    assert "6 validation reviews" in out and "34 training reviews" in out  # 40 mock reviews, 6 carved off
    # Model selection on validation; the test split evaluated once per run, on the selected checkpoint.
    records = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in records if r["event"] == "test"]
    assert len(tests) == 2 and [t["step"] for t in tests] == [12, 18]  # the fixture's run, then this resume
    best = max(evals, key=lambda r: r["log_likelihood"])["step"]
    assert tests[-1]["selected_step"] == best
    assert tests[-1]["test_examples"] == int(described.group(1))
    np.testing.assert_allclose(tests[-1]["test_token_perplexity"], math.exp(tests[-1]["test_loss"]), rtol=1e-6)
    assert out.count("test: token perplexity") == 1

    assert train.main(["generate", "--workdir", str(w), "--prompt", "ab", "--prompt", "", "--num_samples", "2",
                       "--max_new_tokens", "6", "--top_k", "5", "--seed", "1"]) == 0
    samples = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [s.split()[0] for s in samples] == ["[1.1]", "[1.2]", "[2.1]", "[2.2]"]
    assert all(s.split(" ", 1)[1].startswith("ab") for s in samples[:2])

    assert train.main(["generate", "--workdir", str(w), "--prompt", "abc " * 20]) == 2
    assert "exceeds the model's max_length 16" in capsys.readouterr().err
    assert train.main(["predict", "--workdir", str(w), "a film"]) == 2
    assert "holds a --model lm run, which predict does not apply to" in capsys.readouterr().err
    # A workdir written before --valid_reviews existed (it selected on test) is refused for training, still loads.
    old = tmp_path / "old"
    shutil.copytree(w, old)
    saved = json.loads((old / "config.json").read_text())
    del saved["data"]["valid_reviews"]
    (old / "config.json").write_text(json.dumps(saved))
    assert train.main(TINY_LM + ["--workdir", str(old), "--num_epochs", "4"]) == 2
    assert "data.valid_reviews: saved 0, requested 6" in capsys.readouterr().err
    assert train.main(TINY_LM[:-1] + ["0", "--workdir", str(old), "--num_epochs", "4"]) == 2
    assert "retrain in a fresh --workdir" in capsys.readouterr().err
    assert train.main(["generate", "--workdir", str(old), "--prompt", "ab", "--max_new_tokens", "2"]) == 0
    capsys.readouterr()
    (w / "spm.model").write_bytes(b"damaged")
    assert train.main(TINY_LM + ["--workdir", str(w), "--num_epochs", "4"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the SentencePiece model" in err and "restore it" in err and err.count("\n") == 1
    assert (w / "spm.model").read_bytes() == b"damaged"


@pytest.mark.slow
def test_init_from_copies_the_lm_and_refuses_bad_workdirs_before_writing(lm_run, tmp_path, capsys):
    import shutil

    import tensorflow_datasets as tfds

    import train
    from flax_attention.training import init_from
    from flax_attention.training.inspector import load_for_inference

    lm = str(lm_run[0])
    clf = ["--model", "transformer", "--max_length", "16", "--batch_size", "4", "--num_epochs", "1",
           "--dropout_rate", "0.0"]
    (tmp_path / "bigru").mkdir()
    (tmp_path / "bigru" / "config.json").write_text(json.dumps({"model_name": "bigru", "model": {}}))
    shutil.copytree(lm, tmp_path / "wider")
    saved = json.loads((tmp_path / "wider" / "config.json").read_text())
    saved["model"]["d_model"] = 32
    (tmp_path / "wider" / "config.json").write_text(json.dumps(saved))
    with tfds.testing.mock_data(num_examples=12):
        for source, extra, message in [
                (tmp_path / "nothing", [], "no config.json there"),
                (tmp_path / "bigru", [], "holds a --model bigru run; give a --model lm workdir"),
                (tmp_path / "wider", [], "arrays differ, e.g. params/embedding/embedding: checkpoint (40, 16), "
                                         "model (40, 32)"),
                (lm, ["--pooling", "cls"], "with --pooling mean or concat (got 'cls')")]:
            assert train.main(clf + ["--init_from", str(source), "--workdir", str(tmp_path / "never")] + extra) == 2
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1, err
            assert not (tmp_path / "never").exists()  # refused before anything was written
        assert train.main(clf + ["--lm_lr_decay", "2", "--workdir", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert "--lm_lr_decay 2.0 sets per-layer rates" in err and "add --init_from W" in err and err.count("\n") == 1
        assert not (tmp_path / "never").exists()
        run = str(tmp_path / "clf")  # trained (and restored by predict) with discriminative rates
        assert train.main(clf + ["--init_from", lm, "--workdir", run, "--lm_lr_decay", "2.6"]) == 0
    assert "classifier body initialised from" in capsys.readouterr().out
    init = [json.loads(x) for x in (tmp_path / "clf" / "metrics.jsonl").read_text().splitlines()][0]
    assert init["event"] == "init" and init["init_from_tensors"] > 5
    assert (tmp_path / "clf" / "spm.model").read_bytes() == (lm_run[0] / "spm.model").read_bytes()
    assert train.main(["predict", "--workdir", run, "a great film"]) == 0

    # The shared part, tree-equal: the classifier's "lm" subtree after init_params is the LM's best checkpoint.
    _, _, _, configs = train.parse_args(clf + ["--init_from", lm, "--workdir", run])
    model = init_from.build_classifier(configs)
    fresh = model.init(jax.random.PRNGKey(1), jnp.ones((1, 16), jnp.int32), jnp.ones((1,), jnp.int32))["params"]
    params, report = init_from.init_params(fresh, configs, None)
    lm_params = load_for_inference(lm)[3]
    assert jax.tree_util.tree_structure(params["lm"]) == jax.tree_util.tree_structure(lm_params)
    for a, b in zip(jax.tree_util.tree_leaves(params["lm"]), jax.tree_util.tree_leaves(lm_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(params["head"]["kernel"], fresh["head"]["kernel"])  # the head stays fresh
    assert report["init_from_tensors"] == len(jax.tree_util.tree_leaves(lm_params))
    # Longer reviews than the LM's rows: the same tree (positions carry no parameters), a longer body.
    _, _, _, longer = train.parse_args(clf[:2] + ["--max_length", "40"] + clf[4:] + ["--init_from", lm])
    body = init_from.build_classifier(longer)
    assert body.config.max_length == 40 and model.config.max_length == 16
    shapes = jax.eval_shape(lambda k: body.init(k, jnp.ones((1, 40), jnp.int32), jnp.ones((1,), jnp.int32)),
                            jax.random.PRNGKey(0))["params"]
    init_from.check_compatible(shapes["lm"], lm_params, lm)
    # Fine-tuning's options: ULMFiT's concat pooling (a 3E-wide head) and dropout inside the body.
    _, _, _, tuned = train.parse_args(clf + ["--init_from", lm, "--pooling", "concat", "--lm_dropout_rate", "0.25"])
    concat = init_from.build_classifier(tuned)
    assert concat.pooling == "concat" and concat.config.dropout_rate == 0.25 and model.config.dropout_rate == 0.0
    shapes = jax.eval_shape(lambda k: concat.init(k, jnp.ones((1, 16), jnp.int32), jnp.ones((1,), jnp.int32)),
                            jax.random.PRNGKey(0))["params"]
    assert shapes["head"]["kernel"].shape == (3 * model.config.d_model, 1)
    init_from.check_compatible(shapes["lm"], lm_params, lm)
    # Discriminative rates (ULMFiT eq. 2): with SGD(1) and unit gradients each update is -decay^-depth,
    # depth 0 for the head and final norm, 1 for the top block ... L + 1 for the embedding.
    assert init_from.layer_rates(configs) is None  # --lm_lr_decay 1: plain Adam, earlier runs' state
    _, _, _, discr = train.parse_args(clf + ["--init_from", lm, "--lm_lr_decay", "2"])
    tx = init_from.layer_rates(discr)(optax.sgd(1.0), fresh)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, fresh), tx.init(fresh), fresh)
    layers = model.config.num_layers
    expected = {"head": 0, "lm/final_norm": 0, f"lm/layers_{layers - 1}": 1, "lm/layers_0": layers,
                "lm/embedding": layers + 1}
    seen = set()
    for keys, u in jax.tree_util.tree_leaves_with_path(updates):
        name = "/".join(k.key for k in keys)
        for prefix, depth in expected.items():
            if name.startswith(prefix + "/"):
                np.testing.assert_array_equal(np.asarray(u), -(2.0 ** -depth), err_msg=name)
                seen.add(prefix)
    assert seen == set(expected)
