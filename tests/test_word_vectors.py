"""Word-vector files (read / write / match), writing them into params, freezing them under optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_attention.data import imdb
from flax_attention.data.word_vectors import load_word_vectors, save_word_vectors, token_counts
from flax_attention.embed.pretrained import EMBEDDING_PATH, freeze, init_embedding, path_is
from flax_attention.models import BiGRUClassifier, BiGRUConfig

from module_helpers import jinit


def _matrix(n, d, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, d)).astype(np.float32)
    m[0, :3] = [1e-38, -3.4e38, np.float32(1) / 3]  # extremes and a non-terminating decimal
    return m


@pytest.mark.parametrize("header", [True, False])
def test_round_trip_is_bit_identical(tmp_path, header):
    words = ["good", "bad", "don't", "film"]
    m = _matrix(4, 7)
    path = save_word_vectors(tmp_path / "sub" / "v.txt", words, m, header=header)
    assert (path.read_text().splitlines()[0] == "4 7") == header
    assert not list(path.parent.glob("*.tmp"))  # the temporary file was renamed
    rows, found, cov = load_word_vectors(path, words, dim=7)
    assert rows.dtype == np.float32 and found.all()
    np.testing.assert_array_equal(rows.view(np.int32), m.view(np.int32))
    assert cov.dim == 7 and cov.file_vectors == 4 and cov.word_fraction == 1.0


def test_coverage_against_a_keras_vocabulary(tmp_path):
    vocab = imdb.Vocabulary(["the", "good", "movie", "plot"])  # ids 3..6
    path = tmp_path / "v.txt"
    path.write_text("good 1 2\nzebra 9 9\nmovie 3 4\nmovie 7 7\nThe 5 6\nPLOT 8 8\nplot 0 1\n\n")
    counts = np.array([0, 0, 10, 50, 20, 20, 10])  # pad, start, OOV (10 tokens never covered), words
    rows, found, cov = load_word_vectors(path, vocab, dim=2, counts=counts)
    assert rows.shape == (7, 2)
    np.testing.assert_array_equal(found, [False, False, False, True, True, True, True])
    np.testing.assert_array_equal(rows[:3], 0.0)
    np.testing.assert_array_equal(rows[4], [1, 2])
    np.testing.assert_array_equal(rows[5], [3, 4])  # the first of duplicates wins
    np.testing.assert_array_equal(rows[3], [5, 6])  # "The" fills "the" (lowercase fallback)
    np.testing.assert_array_equal(rows[6], [0, 1])  # an exact match beats an earlier "PLOT"
    assert cov.found_words == 4 and cov.vocab_words == 4 and cov.lowercase_matches == 1
    assert cov.file_vectors == 7 and cov.token_fraction == pytest.approx(100 / 110)
    assert "4/4" in cov.summary() and "90.9% of training tokens" in cov.summary()
    tokens = np.array([[1, 3, 4, 2, 0, 0], [1, 6, 6, 6, 0, 0]])  # start, words, OOV, padding
    np.testing.assert_array_equal(token_counts(tokens, 7), [0, 0, 1, 1, 1, 0, 3])
    _, found, cov = load_word_vectors(path, vocab, counts=counts, lowercase_fallback=False)
    assert not found[3] and cov.found_words == 3 and cov.token_fraction == pytest.approx(50 / 110)
    _, found, _ = load_word_vectors(path, {"movie": 0, "zebra": 2})  # a plain mapping
    np.testing.assert_array_equal(found, [True, False, True])


@pytest.mark.parametrize("text, line, match", [
    ("", 1, "no vectors"),
    ("2 3\n", 1, "no vectors"),
    ("good 1 2 3 4\n", 1, "4-dim vectors, the model expects 3"),
    ("5 4\ngood 1 2 3 4\n", 1, "header says 4-dim"),
    ("good 1 2 3\nbad 1 x 3\n", 2, "non-numeric"),
    ("good 1 2 3\nbad 1 2 3\nthis is a garbage line with words\n", 3, "6 values where the file's vectors have 3"),
    ("good 1 2 3\nbad 1 2\n", 2, "2 values where"),
    ("good 1 nan 3\n", 1, "NaN"),
    ("3 3\ngood 1 2 3\nbad 1 2 3\n", 3, "announces 3 vectors but the file has 2"),
])
def test_bad_files_name_the_line_and_the_fix(tmp_path, text, line, match):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        load_word_vectors(path, ["good", "bad"], dim=3)
    msg = str(e.value)
    assert "\n" not in msg and f"{path}, line {line}:" in msg and "Fix:" in msg


def test_words_with_spaces_and_save_errors(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("good 1 2\n. . . 3 4\nbad 5 6\n")  # GloVe 840B has words like ". . ."
    rows, found, cov = load_word_vectors(path, ["good", ". . .", "bad"])
    assert found.all() and cov.file_vectors == 3
    np.testing.assert_array_equal(rows[1], [3, 4])
    with pytest.raises(ValueError, match="whitespace"):
        save_word_vectors(path, ["a b"], np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"\[len\(words\)=2, D\]"):
        save_word_vectors(path, ["a", "b"], np.zeros((3, 2)))


def _bigru(vocab_size=12, embed_dim=6):
    cfg = BiGRUConfig(vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=4, attention_size=3)
    model = BiGRUClassifier(cfg)
    tokens, lengths = jnp.ones((2, 5), jnp.int32), jnp.array([5, 3], jnp.int32)
    return model, jinit(model, tokens, lengths)["params"], (tokens, lengths)


def test_init_embedding_writes_found_rows_only_and_is_pure():
    _, params, _ = _bigru()
    before = np.array(params["embed"]["embedding"])
    rows = np.arange(10 * 6, dtype=np.float32).reshape(10, 6)  # 10 <= 12 model rows
    found = np.zeros(10, bool)
    found[[3, 7]] = True
    new = init_embedding(params, EMBEDDING_PATH, rows, found)
    table = np.array(new["embed"]["embedding"])
    np.testing.assert_array_equal(table[[3, 7]], rows[[3, 7]])
    keep = np.setdiff1d(np.arange(12), [3, 7])
    np.testing.assert_array_equal(table[keep], before[keep])
    np.testing.assert_array_equal(np.array(params["embed"]["embedding"]), before)  # input untouched
    assert new["bigru"] is params["bigru"]  # other subtrees shared, not copied
    scaled = np.array(init_embedding(params, "embed/embedding", rows, found, match_std=True)["embed"]["embedding"])
    assert np.std(scaled[[3, 7]]) == pytest.approx(np.std(before), rel=1e-4)
    with pytest.raises(ValueError, match="embed_dim"):
        init_embedding(params, EMBEDDING_PATH, rows[:, :5], found)
    with pytest.raises(ValueError, match="vocab_size >="):
        init_embedding(params, EMBEDDING_PATH, np.zeros((13, 6), np.float32), np.ones(13, bool))
    with pytest.raises(KeyError, match="embed/embedding"):
        init_embedding(params, ("params", "embed", "embedding"), rows, found)


def test_frozen_embedding_stays_bit_identical_under_adamw():
    model, params, (tokens, lengths) = _bigru()
    tx = freeze(optax.adamw(0.05, weight_decay=0.5), params, path_is(EMBEDDING_PATH))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss = lambda p: jnp.sum(model.apply({"params": p}, tokens, lengths)[0] ** 2)  # noqa: E731
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    new = params
    for _ in range(3):
        new, opt_state, grads = step(new, opt_state)
    assert np.abs(np.array(grads["embed"]["embedding"])).max() > 0  # it *would* move
    np.testing.assert_array_equal(np.array(new["embed"]["embedding"]), np.array(params["embed"]["embedding"]))
    for name in ("bigru", "attention", "head"):
        moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.array(a) != np.array(b))), new[name], params[name])
        assert all(jax.tree_util.tree_leaves(moved)), name
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze(optax.adam(1e-3), params, path_is("embedding"))
