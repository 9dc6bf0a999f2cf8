"""Synthetic seq2seq tasks: definitions, batch layout, determinism, held-out streams."""

import numpy as np
import pytest

from flax_attention.data import synthetic as T


def unpad(batch, i):
    n = int(batch["length"][i])
    src = batch["src"][i, :n]
    out = list(batch["tgt_out"][i])
    tgt = np.asarray(out[: out.index(T.EOS_ID)])
    return src, tgt


@pytest.mark.parametrize("name", ["copy", "reverse", "sort", "dedup"])
def test_targets_follow_the_task_definition(name):
    cfg = T.TaskConfig(name=name, num_symbols=6, min_len=1, max_len=9, test_max_len=12)
    batch = T.train_batch(cfg, 32, step=3)
    reference = {
        "copy": lambda s: s,
        "reverse": lambda s: s[::-1],
        "sort": sorted,
        "dedup": lambda s: list(dict.fromkeys(s.tolist())),
    }[name]
    for i in range(32):
        src, tgt = unpad(batch, i)
        assert 1 <= len(src) <= 9 and np.all(src >= T.NUM_SPECIAL) and np.all(src < cfg.vocab_size)
        np.testing.assert_array_equal(tgt, reference(src))
        np.testing.assert_array_equal(T.target_for(cfg, src), tgt)


def test_add_task_sums_digit_strings():
    cfg = T.TaskConfig(name="add", num_symbols=11, min_len=3, max_len=9, test_max_len=9)
    batch = T.train_batch(cfg, 16, step=0)
    for i in range(16):
        src, tgt = unpad(batch, i)
        text = "".join("+" if s == T.NUM_SPECIAL + 10 else str(s - T.NUM_SPECIAL) for s in src)
        a, b = text.split("+")
        assert str(int(a) + int(b)) == "".join(str(d - T.NUM_SPECIAL) for d in tgt)


def test_batch_layout_bos_shift_eos_and_padding():
    cfg = T.TaskConfig(name="reverse", num_symbols=5, min_len=2, max_len=6, test_max_len=8)
    b = T.train_batch(cfg, 8, step=0)
    assert b["src"].shape == (8, 6) and b["tgt_in"].shape == (8, 7) and b["tgt_out"].shape == (8, 7)
    assert all(v.dtype == np.int32 for v in b.values())
    for i in range(8):
        n = int(b["length"][i])
        assert b["tgt_in"][i, 0] == T.BOS_ID
        np.testing.assert_array_equal(b["tgt_in"][i, 1:n + 1], b["tgt_out"][i, :n])  # right shift
        assert b["tgt_out"][i, n] == T.EOS_ID
        assert np.all(b["tgt_out"][i, n + 1:] == T.PAD_ID) and np.all(b["src"][i, n:] == T.PAD_ID)
        assert np.all(b["tgt_in"][i, n + 1:] == T.PAD_ID)


def test_deterministic_from_seed_and_distinct_streams():
    cfg = T.TaskConfig(name="copy", num_symbols=10, min_len=8, max_len=12)
    a, b = T.train_batch(cfg, 16, 5), T.train_batch(cfg, 16, 5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(T.train_batch(cfg, 16, 6)["src"], a["src"])
    other_seed = T.train_batch(T.TaskConfig(name="copy", min_len=8, max_len=12, seed=1), 16, 5)
    assert not np.array_equal(other_seed["src"], a["src"])
    # The held-out set is its own stream: none of its (long) sources is a training source.
    test = T.test_set(cfg, 64)
    train_rows = {tuple(r) for s in range(20) for r in T.train_batch(cfg, 16, s)["src"]}
    assert not train_rows & {tuple(r) for r in test["src"]}
    stream = T.train_batches(cfg, 16, start_step=5)
    np.testing.assert_array_equal(next(stream)["src"], a["src"])


def test_test_sets_cover_lengths_including_longer_than_training():
    cfg = T.TaskConfig(name="reverse", min_len=1, max_len=10, test_max_len=15)
    held_out = T.test_set(cfg, 50)
    assert sorted(set(held_out["length"].tolist())) == list(range(1, 11))
    longer = T.length_test_set(cfg, [11, 15], per_length=4)
    assert longer["length"].tolist() == [11] * 4 + [15] * 4 and longer["src"].shape == (8, 15)
    with pytest.raises(ValueError, match="test_max_len"):
        T.length_test_set(cfg, [16], per_length=1)


def test_bad_configs_and_decode_symbols():
    with pytest.raises(ValueError, match="unknown task"):
        T.TaskConfig(name="rotate")
    with pytest.raises(ValueError, match="min_len"):
        T.TaskConfig(min_len=5, max_len=3)
    with pytest.raises(ValueError, match="num_symbols >= 11"):
        T.TaskConfig(name="add", num_symbols=10, min_len=3)
    tokens = np.array([[5, 4, T.EOS_ID, T.PAD_ID], [3, T.PAD_ID, 6, 7]])
    assert T.decode_symbols(tokens) == [[5, 4], [3, T.PAD_ID, 6, 7]]
