"""The IMDB language-modelling corpus: cleanup, counts, packing, resume, SentencePiece vocabulary and caches."""

import numpy as np
import pytest

from flax_attention.data import lm_corpus as C
from flax_attention.data.synthetic import BOS_ID, EOS_ID, PAD_ID


def _corpus(lengths, words=None, seed=0):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(4, 50, int(offsets[-1])).astype(np.int32)
    words = np.asarray(words if words is not None else rng.integers(0, 9, len(lengths)), np.int64)
    return C.EncodedCorpus(ids, offsets, words)


def test_clean_and_word_count_by_hand():
    text = "Great<br /><br />film!  10/10\n<BR>A\tmust-see "
    assert C.clean(text) == "Great film! 10/10 A must-see"
    assert C.word_count(C.clean(text)) == 5
    assert C.clean(b"a<br/>b") == "a b"


def test_packing_by_hand():
    # Three reviews: pieces [10 11 12] (2 words), [20] (1 word), [30..34] (4 words); rows of L=4 (+1).
    c = C.EncodedCorpus(np.array([10, 11, 12, 20, 30, 31, 32, 33, 34], np.int32), np.array([0, 3, 4, 9]),
                        np.array([2, 1, 4]))
    p = C.PackedRows(c, np.arange(3), 4)
    assert p.total == 15 and len(p) == 4  # stream: 5 + 3 + 7 tokens; 14 targets / 4 per row
    b = p.rows([0, 1, 2, 3, -1])
    np.testing.assert_array_equal(b["inputs"], [[1, 10, 11, 12], [2, 1, 20, 2], [1, 30, 31, 32], [33, 34, 2, 0],
                                                [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["targets"], [[10, 11, 12, 2], [1, 20, 2, 1], [30, 31, 32, 33], [34, 2, 0, 0],
                                                 [0, 0, 0, 0]])
    # Row 1 starts with review 0's EOS (the target row 0 ended with): a continuation, position 0, segment 1.
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 1, 1], [1, 1, 1, 0],
                                                     [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 0],
                                                   [0, 0, 0, 0]])
    # EOS -> next BOS never counts; every review's EOS does; padding never.
    np.testing.assert_array_equal(b["weights"], [[1, 1, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0],
                                                 [0, 0, 0, 0]])
    # words + 1 (EOS) credited at each review's EOS target.
    np.testing.assert_array_equal(b["words"], [[0, 0, 0, 3], [0, 0, 2, 0], [0, 0, 0, 0], [0, 5, 0, 0], [0, 0, 0, 0]])
    assert b["weights"].sum() == 9 + 3 and b["words"].sum() == 7 + 3


@pytest.mark.parametrize("length", [3, 7, 16])
def test_every_target_once_and_rows_respect_documents(length):
    c = _corpus(np.random.default_rng(length).integers(0, 12, 23))  # includes empty reviews
    batches = list(C.eval_batches(c, length, batch_size=5))
    b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
    n = C.num_rows(c, length)
    assert len(b["inputs"]) == -(-n // 5) * 5 and (b["segment_ids"][n:] == 0).all() and b["weights"][n:].sum() == 0
    # The counted targets, row after row, are exactly each review's pieces followed by its EOS.
    expected = np.concatenate([np.append(c.ids[c.offsets[d]:c.offsets[d + 1]], EOS_ID) for d in range(len(c))])
    np.testing.assert_array_equal(b["targets"][b["weights"] > 0], expected)
    assert b["words"].sum() == c.words.sum() + len(c)
    for row in range(n):
        seg, pos, inp = b["segment_ids"][row], b["positions"][row], b["inputs"][row]
        real = seg > 0
        assert (np.diff(seg[real]) >= 0).all() and seg[0] == 1  # contiguous documents numbered from 1
        starts = np.flatnonzero(real & np.r_[True, seg[1:] != seg[:-1]])
        assert (pos[starts] == 0).all() and (inp[starts[1:]] == BOS_ID).all()  # new documents begin with BOS
        for a, z in zip(starts, list(starts[1:]) + [int(real.sum())]):
            np.testing.assert_array_equal(pos[a:z], np.arange(z - a))  # positions count up inside a segment
        # A target counts iff input and target are in the same document (never EOS -> next BOS).
        same_doc = real & np.r_[seg[1:] == seg[:-1], False]
        np.testing.assert_array_equal(b["weights"][row][:-1] > 0, same_doc[:-1])
        assert (inp[~real] == PAD_ID).all()


def test_train_epochs_are_shuffled_deterministic_and_resume_exactly():
    c = _corpus(np.random.default_rng(1).integers(1, 20, 40))
    all_b = list(C.train_batches(c, 8, 4, seed=3, epoch=0))
    assert len(all_b) == C.num_rows(c, 8) // 4 > 3
    again = list(C.train_batches(c, 8, 4, seed=3, epoch=0, start_step=2))
    assert len(again) == len(all_b) - 2
    for x, y in zip(again, all_b[2:]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = next(C.train_batches(c, 8, 4, seed=3, epoch=1))
    assert not np.array_equal(other["inputs"], all_b[0]["inputs"])
    # A whole epoch's rows (all of them, not just the full batches) hold every target exactly once.
    packed, order = C.epoch_rows(c, 8, seed=3, epoch=0)
    rows = packed.rows(order)
    assert rows["weights"].sum() == len(c.ids) + len(c)
    got = np.sort(rows["targets"][rows["weights"] > 0])
    np.testing.assert_array_equal(got, np.sort(np.concatenate([c.ids, np.full(len(c), EOS_ID)])))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_length"):
        C.LMDataConfig(max_length=1)
    with pytest.raises(ValueError, match="spm_model_type"):
        C.LMDataConfig(spm_model_type="word")
    with pytest.raises(ValueError, match="train_reviews"):
        C.LMDataConfig(train_reviews=-1)


def test_validation_split_is_fixed_disjoint_and_select_copies_reviews_by_hand():
    train, valid = C.split_validation(20, 5)
    assert len(valid) == 5 and len(train) == 15 and not set(train) & set(valid)
    assert sorted(set(train) | set(valid)) == list(range(20))
    np.testing.assert_array_equal(C.split_validation(20, 5)[1], valid)  # no seed flag: always the same reviews
    with pytest.raises(ValueError, match="--valid_reviews 20 leaves none of the 20 training reviews"):
        C.split_validation(20, 20)
    # Reviews [10 11 12] (2 words), [20] (1 word), [30..34] (4 words); pick the third then the first.
    c = C.EncodedCorpus(np.array([10, 11, 12, 20, 30, 31, 32, 33, 34], np.int32), np.array([0, 3, 4, 9]),
                        np.array([2, 1, 4]))
    s = c.select([2, 0])
    np.testing.assert_array_equal(s.ids, [30, 31, 32, 33, 34, 10, 11, 12])
    np.testing.assert_array_equal(s.offsets, [0, 5, 8])
    np.testing.assert_array_equal(s.words, [4, 2])
    with pytest.raises(ValueError, match="valid_reviews"):
        C.LMDataConfig(valid_reviews=-1)


def test_vocabulary_and_caches_on_mock_data_and_a_damaged_vocabulary(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = C.LMDataConfig(vocab_size=30, max_length=16, spm_sample_reviews=6)
    with tfds.testing.mock_data(num_examples=8):
        texts = C.read_reviews(C.TRAIN_SPLITS)
        tok = C.load_tokenizer(tmp_path, cfg, lambda: texts)
        train = C.load_encoded(tmp_path, "train+unsupervised", tok, lambda: texts)
    assert len(texts) == 16 and (tmp_path / "spm.model").exists()
    assert (tok.sp.pad_id(), tok.sp.bos_id(), tok.sp.eos_id()) == (PAD_ID, BOS_ID, EOS_ID)
    assert len(train) == 16 and train.ids.min() > EOS_ID and train.ids.max() < tok.vocab_size
    np.testing.assert_array_equal(train.words, [len(t.split()) for t in texts])
    assert len(list((tmp_path / C.CACHE_DIR).glob("*.npz"))) == 1

    def no_read():
        raise AssertionError("the cache should have been used")
    again = C.load_encoded(tmp_path, "train+unsupervised", C.load_tokenizer(tmp_path, cfg, no_read), no_read)
    np.testing.assert_array_equal(again.ids, train.ids)
    # Same sample, same model: the vocabulary is a function of the data flags.
    assert C.load_tokenizer(tmp_path / "other", cfg, lambda: texts).proto == tok.proto

    (tmp_path / "spm.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="restore it .* or use a fresh --workdir"):
        C.load_tokenizer(tmp_path, cfg, no_read)
    assert (tmp_path / "spm.model").read_bytes() == b"not a model"  # never deleted or rewritten
