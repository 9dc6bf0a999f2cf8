"""IMDB input pipeline: tokeniser, vocabulary, encoding, batching (mock + real data)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flax_attention.data import imdb

REAL_DATA = Path(os.environ.get("TFDS_DATA_DIR") or Path(__file__).parents[1].parent / "shared" / "tensorflow_datasets")
HAS_IMDB = (REAL_DATA / "imdb_reviews" / "plain_text" / "1.0.0").is_dir()


def test_tokenize_strips_markup_keeps_inner_apostrophes():
    text = "I didn't LIKE it.<br /><br />A 'quoted' film-noir, 10/10!"
    assert imdb.tokenize(text) == ["i", "didn't", "like", "it", "a", "quoted", "film", "noir"]
    assert imdb.tokenize(text.encode()) == imdb.tokenize(text)  # real TFDS text is bytes


def test_vocabulary_keras_ids_and_tie_order():
    vocab = imdb.Vocabulary.build(["b a a c", "c a b d"], vocab_size=5)
    # counts: a 3, b 2, c 2, d 1 -> keep 5 - 3 = 2 words: a, then b (tie with c, alphabetical)
    assert vocab.words == ["a", "b"]
    assert vocab.encode_words(["a", "b", "c"]) == [3, 4, imdb.OOV_ID]
    assert vocab.size == 5 and vocab.id_to_word(0) == "<pad>" and vocab.id_to_word(4) == "b"


@pytest.mark.parametrize("truncate,expected", [("pre", [1, 4, 3, 2]), ("post", [1, 3, 3, 4])])
def test_encode_pads_truncates_and_keeps_lengths(truncate, expected):
    vocab = imdb.Vocabulary(["x", "y"])  # x -> 3, y -> 4
    cfg = imdb.IMDBConfig(vocab_size=5, max_length=4, truncate=truncate)
    tokens, lengths = imdb.encode(["x x y x z", "y", ""], vocab, cfg)
    np.testing.assert_array_equal(tokens[0], expected)
    np.testing.assert_array_equal(tokens[1:], [[1, 4, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(lengths, [4, 2, 1])
    assert imdb.kept_words("x x y x z", cfg)[1:] == (["y", "x", "z"] if truncate == "pre" else ["x", "x", "y"])


def test_vocabulary_roundtrip_and_bad_file(tmp_path):
    vocab = imdb.Vocabulary(["good", "bad"])
    vocab.save(tmp_path / "vocab.json")
    assert imdb.Vocabulary.load(tmp_path / "vocab.json").words == ["good", "bad"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="restore it .* or use a fresh --workdir"):
        imdb.Vocabulary.load(tmp_path / "bad.json")


def _split(n, s=5):
    tokens = np.arange(n)[:, None] * np.ones((1, s), np.int32)  # row i holds i: identifies the example
    return imdb.EncodedSplit(tokens.astype(np.int32), np.full(n, s, np.int32), (np.arange(n) % 2).astype(np.int32))


def test_eval_batches_cover_every_example_exactly_once():
    data = _split(10)
    batches = list(imdb.eval_batches(data, 4))
    assert [b["tokens"].shape for b in batches] == [(4, 5)] * 3
    weights = np.concatenate([b["weights"] for b in batches])
    seen = np.concatenate([b["tokens"][:, 0] for b in batches])[weights > 0]
    np.testing.assert_array_equal(np.sort(seen), np.arange(10))
    assert weights.sum() == 10 and weights[-2:].tolist() == [0, 0]


def test_train_batches_shuffle_deterministic_and_resumable():
    data = _split(20)
    full = [b["tokens"][:, 0] for b in imdb.train_batches(data, 6, seed=1, epoch=2)]
    assert len(full) == 3  # 20 // 6, partial batch dropped
    resumed = [b["tokens"][:, 0] for b in imdb.train_batches(data, 6, seed=1, epoch=2, start_step=1)]
    np.testing.assert_array_equal(np.stack(full[1:]), np.stack(resumed))
    other = [b["tokens"][:, 0] for b in imdb.train_batches(data, 6, seed=1, epoch=3)]
    assert not np.array_equal(np.stack(full), np.stack(other))
    assert len(set(np.concatenate(full).tolist())) == 18  # no repeats within an epoch


def test_prepare_on_mock_data_builds_vocab_and_caches(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = imdb.IMDBConfig(vocab_size=40, max_length=12)
    with tfds.testing.mock_data(num_examples=9):
        texts, labels = imdb.load_split("train")
        vocab, train, test = imdb.prepare(tmp_path, cfg)
    assert isinstance(texts[0], str) and len(train) == len(test) == 9
    assert vocab.size <= 40 and (tmp_path / "vocab.json").exists()
    assert train.tokens.shape == (9, 12) and train.tokens.dtype == np.int32
    assert (train.tokens[:, 0] == imdb.START_ID).all() and train.tokens.max() < 40
    pos = np.arange(12)[None, :]
    assert (train.tokens[pos >= train.lengths[:, None]] == 0).all()
    assert (train.tokens[(pos < train.lengths[:, None])] != 0).all()
    np.testing.assert_array_equal(train.labels, labels)
    assert len(list((tmp_path / "data_cache").glob("*.npz"))) == 2
    vocab2, train2, _ = imdb.prepare(tmp_path, cfg)  # no mock: must come from the caches
    assert vocab2.words == vocab.words
    np.testing.assert_array_equal(train2.tokens, train.tokens)


def test_validation_split_is_fixed_disjoint_and_kept_out_of_the_vocabulary(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    keep, valid = imdb.split_validation(12, 4)
    assert len(valid) == 4 and sorted(np.concatenate([keep, valid]).tolist()) == list(range(12))
    np.testing.assert_array_equal(imdb.split_validation(12, 4)[1], valid)  # no seed flag: always the same
    with pytest.raises(ValueError, match="--valid_examples 12 leaves none of the 12 labelled training reviews"):
        imdb.split_validation(12, 12)
    with pytest.raises(ValueError, match="--valid_examples must be >= 0"):
        imdb.IMDBConfig(valid_examples=-1)
    cfg = imdb.IMDBConfig(vocab_size=40, max_length=12, valid_examples=4)
    with tfds.testing.mock_data(num_examples=12):
        texts, labels = imdb.load_split("train")
        vocab, whole, _ = imdb.prepare(tmp_path, cfg)
    train, held = imdb.carve_validation(whole, 4)
    assert len(train) == 8 and len(held) == 4
    np.testing.assert_array_equal(held.tokens, whole.tokens[valid])
    np.testing.assert_array_equal(held.labels, labels[valid])
    np.testing.assert_array_equal(train.labels, labels[keep])
    expected = imdb.Vocabulary.build([imdb.tokenize(texts[i]) for i in keep], 40, tokenized=True)
    assert vocab.words == expected.words  # built from the 8 training reviews only


def test_missing_data_gives_actionable_message(tmp_path):
    code = "from flax_attention.data.imdb import load_split; load_split('test')"
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[1])
    assert out.returncode != 0
    assert "DataUnavailableError" in out.stderr and "TFDS_DATA_DIR" in out.stderr and "pip install tensorflow" in out.stderr


@pytest.mark.skipif(not HAS_IMDB, reason="prepared IMDB not found (set TFDS_DATA_DIR)")
def test_real_imdb_records(monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(REAL_DATA))
    import tensorflow_datasets as tfds

    source = tfds.data_source("imdb_reviews", split="test", data_dir=str(REAL_DATA))
    assert len(source) == 25_000
    rec = source[0]
    assert isinstance(rec["text"], bytes) and int(rec["label"]) in (0, 1)
    assert len(imdb.tokenize(rec["text"])) > 5
