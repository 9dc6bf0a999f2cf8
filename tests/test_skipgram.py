"""Skip-gram with negative sampling: pair generation, the learner, the IMDB driver (mock data)."""

import numpy as np
import pytest

from flax_attention.data import imdb
from flax_attention.data.word_vectors import load_word_vectors
from flax_attention.embed import pairs, skipgram
from flax_attention.embed.skipgram import SkipGramConfig, learn_word_vectors, train_skipgram


def test_keep_probability_is_word2vecs_formula():
    counts = np.array([0, 1000, 10, 1])  # total 1011
    keep = pairs.keep_probability(counts, sample=1e-3)
    r = 1e-3 * 1011 / 1000  # t / f for the frequent word
    assert keep[1] == pytest.approx(np.sqrt(r) + r)
    assert 0 < keep[1] < keep[2] < 1.0 and keep[3] == 1.0  # words with f <= t are always kept
    np.testing.assert_array_equal(pairs.keep_probability(counts, 0.0), 1.0)
    noise = pairs.noise_distribution(counts)
    assert noise.sum() == pytest.approx(1.0) and noise[0] == 0.0
    assert noise[1] / noise[2] == pytest.approx(100 ** 0.75)


def test_window_pairs_stay_in_the_review_and_the_window():
    tokens = np.arange(100, 120, dtype=np.int32)  # token value = position + 100
    doc = np.repeat([0, 1, 2], [7, 1, 12])
    c, x = pairs.window_pairs(tokens, doc, window=3, rng=np.random.default_rng(0))
    pos_c, pos_x = c - 100, x - 100
    assert c.size > 0 and (doc[pos_c] == doc[pos_x]).all()  # never across reviews
    dist = np.abs(pos_c - pos_x)
    assert dist.min() >= 1 and dist.max() <= 3
    assert not np.isin(7, pos_c) and not np.isin(7, pos_x)  # a one-word review has no pairs
    # Dynamic window: distance 1 is sampled more often than distance 3.
    assert (dist == 1).sum() > (dist == 3).sum()
    c2, x2 = pairs.window_pairs(tokens, doc, window=3, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(c, c2)
    np.testing.assert_array_equal(x, x2)


def test_epoch_batches_drop_reserved_ids_and_cover_the_corpus():
    seqs = [np.array([1, 5, 2, 6, 7]), np.array([0, 8, 9]), np.array([5, 5, 5, 5])]
    tokens, offsets = pairs.flatten(seqs, first_word_id=3)
    np.testing.assert_array_equal(tokens, [5, 6, 7, 8, 9, 5, 5, 5, 5])
    np.testing.assert_array_equal(offsets, [0, 3, 5, 9])
    keep = np.ones(10)
    batches = list(pairs.epoch_batches(tokens, offsets, keep, 1, 2, np.random.default_rng(1), chunk_tokens=4))
    c = np.concatenate([b[0] for b in batches])
    x = np.concatenate([b[1] for b in batches])
    assert all(b[0].shape == (2,) and b[0].dtype == np.int32 for b in batches)
    # window 1, no subsampling: 2 * (2 + 1 + 3) = 12 pairs; 6 batches of 2, none crossing reviews.
    assert c.size == 12
    got = sorted(zip(c.tolist(), x.tolist()))
    assert got == sorted([(5, 6), (6, 5), (6, 7), (7, 6), (8, 9), (9, 8)] + [(5, 5)] * 6)


def _topic_corpus(n_reviews=300, n_topics=6, words_per_topic=5, length=30, seed=0):
    """Reviews that each use the words of one topic: topic-mates always co-occur."""
    rng = np.random.default_rng(seed)
    first = imdb.NUM_RESERVED
    topics = first + np.arange(n_topics * words_per_topic).reshape(n_topics, words_per_topic)
    seqs = [rng.choice(topics[rng.integers(n_topics)], size=length) for _ in range(n_reviews)]
    return seqs, topics, first + n_topics * words_per_topic


def _cos(v, a, b):
    return float(v[a] @ v[b] / (np.linalg.norm(v[a]) * np.linalg.norm(v[b])))


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.025), ("adam", 0.01)])
def test_learner_lowers_the_loss_and_groups_cooccurring_words(optimizer, lr):
    seqs, topics, vocab_size = _topic_corpus()
    cfg = SkipGramConfig(dim=16, window=3, negatives=4, epochs=4, sample=0.0, batch_size=512,
                         optimizer=optimizer, learning_rate=lr, seed=1)
    result = train_skipgram(seqs, vocab_size, cfg, progress=False, log_every=5)
    assert result.steps >= 4 * 30 and result.pairs == result.steps * 512
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    v = result.vectors
    same = np.mean([_cos(v, t[i], t[j]) for t in topics for i in range(5) for j in range(i + 1, 5)])
    other = np.mean([_cos(v, topics[a][0], topics[b][1]) for a in range(6) for b in range(6) if a != b])
    assert same > other + 0.5, (same, other)


def test_learning_is_deterministic_given_the_seed():
    seqs, _, vocab_size = _topic_corpus(n_reviews=60)
    kw = dict(dim=8, window=2, negatives=2, batch_size=256, sample=0.0, progress=False)
    a = learn_word_vectors(seqs, vocab_size, seed=3, **kw)
    b = learn_word_vectors(seqs, vocab_size, seed=3, **kw)
    c = learn_word_vectors(seqs, vocab_size, seed=4, **kw)
    assert a.shape == (vocab_size, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="vocab_size"):
        learn_word_vectors(seqs, vocab_size - 1, progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size=4096"):
        learn_word_vectors(seqs[:2], vocab_size, batch_size=4096, progress=False)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        learn_word_vectors(seqs, vocab_size, optimizer="sgd", learning_rate=1e30, **kw)
    with pytest.raises(ValueError, match="optimizer"):
        SkipGramConfig(optimizer="rmsprop")


def test_nearest_neighbours_excludes_self_and_reserved():
    v = np.array([[1, 0], [1, 0], [1, 0], [1, 0.1], [1, 0.2], [0, 1]], np.float32)
    np.testing.assert_array_equal(skipgram.nearest_neighbours(v, [3], k=2), [[4, 5]])


def test_imdb_driver_on_mock_data_never_reads_test(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    from flax_attention.embed import imdb_vectors

    read = []
    real_load_split = imdb.load_split
    monkeypatch.setattr(imdb, "load_split", lambda split: read.append(split) or real_load_split(split))
    data_cfg = imdb.IMDBConfig(vocab_size=60, max_length=12)
    cfg = SkipGramConfig(dim=8, window=2, negatives=2, batch_size=8, sample=0.0)
    out = tmp_path / "vec" / "v.txt"
    with tfds.testing.mock_data(num_examples=12):
        report = imdb_vectors.learn_imdb_vectors(tmp_path / "wd", out, data_cfg, cfg, progress=False)
    assert "test" not in read and set(read) == {"train", "unsupervised"}
    vocab = imdb.Vocabulary.load(tmp_path / "wd" / "vocab.json")
    rows, found, cov = load_word_vectors(out, vocab, dim=8)
    assert cov.word_fraction == 1.0 and found[imdb.NUM_RESERVED:].all() and not found[:imdb.NUM_RESERVED].any()
    assert report.vocab_words == len(vocab.words) and report.reviews == 24 and report.steps > 0
    assert np.isfinite(report.final_loss) and report.path == str(out)
    assert "vectors to" in report.summary()
    # Second call: the encoded reviews come from the cache (no mock data needed).
    read.clear()
    imdb_vectors.learn_imdb_vectors(tmp_path / "wd", tmp_path / "v2.txt", data_cfg, cfg, progress=False)
    assert read == []
