"""Tests for flax_attention.functional.masks: hand-written cases and NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention import (
    causal_mask,
    causal_mask_from_positions,
    combine_masks,
    key_mask,
    padding_mask,
    query_key_mask,
    segment_mask,
    sliding_window_mask,
    token_mask,
)


def _np_window(t, s, left, right, alignment):
    """Reference: query i (absolute position i + offset) sees keys j with -right <= pos - j <= left."""
    offset = s - t if alignment == "bottom_right" else 0
    pos = np.arange(t)[:, None] + offset
    j = np.arange(s)[None, :]
    return (pos - j <= left) & (j - pos <= right)


# ---------------------------------------------------------------- padding / tokens


def test_padding_mask_hand_values():
    got = padding_mask(jnp.array([0, 2, 4]), 4)
    want = np.array([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    assert got.dtype == jnp.bool_
    np.testing.assert_array_equal(got, want)


def test_padding_mask_multiple_batch_dims():
    lengths = np.array([[1, 3], [0, 2]])
    got = padding_mask(lengths, 3)
    assert got.shape == (2, 2, 3)
    np.testing.assert_array_equal(got, np.arange(3) < lengths[..., None])


def test_padding_mask_rejects_float_lengths():
    with pytest.raises(ValueError, match="integers"):
        padding_mask(jnp.array([1.0, 2.0]), 3)


def test_padding_mask_new_length_values_do_not_retrace():
    traces = []

    @jax.jit
    def f(lengths):
        traces.append(None)  # Python side effect: runs once per trace only.
        return padding_mask(lengths, 5)

    for lengths in ([1, 2], [5, 0], [3, 3]):
        np.testing.assert_array_equal(f(jnp.array(lengths)), np.arange(5) < np.array(lengths)[:, None])
    assert len(traces) == 1


@pytest.mark.parametrize("pad_id", [0, 7])
def test_token_mask(pad_id):
    ids = np.array([[5, 3, pad_id, pad_id], [pad_id, 1, 2, 9]])
    np.testing.assert_array_equal(token_mask(ids, pad_id=pad_id), ids != pad_id)


# ---------------------------------------------------------------- key / query-key


def test_key_mask_shape_and_values():
    valid = np.array([[True, False, True], [False, False, True]])
    got = key_mask(valid)
    assert got.shape == (2, 1, 1, 3)
    np.testing.assert_array_equal(got[:, 0, 0], valid)


def test_query_key_mask_is_outer_and():
    q = np.array([[True, True, False]])
    k = np.array([[True, False, True, True]])
    got = query_key_mask(q, k)
    assert got.shape == (1, 1, 3, 4)
    np.testing.assert_array_equal(got[0, 0], np.logical_and.outer(q[0], k[0]))
    assert not got[0, 0, 2].any()  # padded query row sees nothing


@pytest.mark.parametrize("fn", [key_mask, lambda m: query_key_mask(m, m), lambda m: combine_masks(m)])
def test_float_masks_rejected(fn):
    with pytest.raises(ValueError, match="boolean"):
        fn(jnp.ones((2, 3)))


# ---------------------------------------------------------------- causal


def test_causal_mask_square_is_lower_triangular():
    for alignment in ("bottom_right", "top_left"):
        np.testing.assert_array_equal(causal_mask(4, alignment=alignment), np.tril(np.ones((4, 4), bool)))


def test_causal_mask_bottom_right_hand_values():
    # T=2 queries are the last two of S=4 positions: query 0 is position 2.
    want = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(causal_mask(2, 4), want)


def test_causal_mask_top_left_hand_values():
    want = np.array([[1, 0, 0, 0], [1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(causal_mask(2, 4, alignment="top_left"), want)


def test_causal_mask_more_queries_than_keys():
    got = np.asarray(causal_mask(4, 2))  # bottom_right: first T - S rows see nothing
    np.testing.assert_array_equal(got, [[0, 0], [0, 0], [1, 0], [1, 1]])
    np.testing.assert_array_equal(causal_mask(4, 2, alignment="top_left"), np.tril(np.ones((4, 2), bool)))


@pytest.mark.parametrize("t,s", [(3, 5), (5, 3), (4, 4)])
@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
def test_causal_mask_matches_reference(t, s, alignment):
    np.testing.assert_array_equal(causal_mask(t, s, alignment=alignment), _np_window(t, s, s + t, 0, alignment))


def test_causal_mask_bad_alignment():
    with pytest.raises(ValueError, match="alignment"):
        causal_mask(3, 4, alignment="bottom-right")


def test_causal_mask_from_positions_under_jit():
    # KV-cache decoding: queries are positions cache_index + arange(T), a traced value.
    @jax.jit
    def f(index):
        return causal_mask_from_positions(index + jnp.arange(2), jnp.arange(6))

    got = f(3)
    assert got.shape == (1, 2, 6)
    np.testing.assert_array_equal(got[0], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(causal_mask_from_positions(jnp.arange(4) + 2, jnp.arange(6))[0], causal_mask(4, 6))


# ---------------------------------------------------------------- sliding window


@pytest.mark.parametrize("window", [0, 2, (1, 1), (0, 2), (3, 1)])
@pytest.mark.parametrize("t,s,alignment", [(5, 5, "bottom_right"), (3, 6, "bottom_right"), (3, 6, "top_left")])
def test_sliding_window_matches_reference(window, t, s, alignment):
    left, right = (window, 0) if isinstance(window, int) else window
    got = sliding_window_mask(t, s, window=window, alignment=alignment)
    np.testing.assert_array_equal(got, _np_window(t, s, left, right, alignment))


def test_sliding_window_hand_values():
    # Causal window 1: each token sees itself and its one predecessor.
    want = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(sliding_window_mask(4, window=1), want)
    np.testing.assert_array_equal(sliding_window_mask(4, window=np.int64(1)), want)


def test_sliding_window_huge_equals_causal():
    np.testing.assert_array_equal(sliding_window_mask(3, 7, window=100), causal_mask(3, 7))


@pytest.mark.parametrize("window", [-1, (2, -1), (1, 2, 3)])
def test_sliding_window_rejects_bad_window(window):
    with pytest.raises(ValueError, match="window"):
        sliding_window_mask(4, window=window)


# ---------------------------------------------------------------- segments


def test_segment_mask_hand_values():
    ids = jnp.array([1, 1, 2, 2, 2, 0])
    got = segment_mask(ids)
    assert got.shape == (1, 6, 6)
    want = np.zeros((6, 6), bool)
    want[:2, :2] = True
    want[2:5, 2:5] = True  # padding (id 0) row and column stay False
    np.testing.assert_array_equal(got[0], want)


def test_segment_mask_separate_key_ids():
    q = np.array([[1, 2]])
    k = np.array([[2, 2, 1, 0]])
    got = segment_mask(q, k)
    assert got.shape == (1, 1, 2, 4)
    np.testing.assert_array_equal(got[0, 0], [[0, 0, 1, 0], [1, 1, 0, 0]])


# ---------------------------------------------------------------- combine


def test_combine_masks_and_broadcast():
    a = np.array([[True, False, True]])  # [1, S]
    b = np.array([[True], [False]])  # [T, 1]
    got = combine_masks(a, None, b)
    np.testing.assert_array_equal(got, a & b)
    assert got.shape == (2, 3)


def test_combine_masks_all_none():
    assert combine_masks(None, None) is None
    assert combine_masks() is None


def test_combine_masks_rejects_non_broadcastable_and_names_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4,\)"):
        combine_masks(jnp.ones((2, 3), bool), jnp.ones((4,), bool))
