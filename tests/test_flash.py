"""Chunked (flash-style) attention: agreement with the dense path, edge cases, block skipping."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from flax_attention.kernels import backend_select
from flax_attention.functional.attention import scaled_dot_product_attention as dense_sdpa
from flax_attention.kernels._blocks import full_block_plan
from flax_attention.kernels.flash import block_plan, chunked_attention, computed_blocks
from flax_attention.functional.masks import combine_masks, sliding_window_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _value_and_grads(fn, *args):
    """Output and the gradients of sum(output²), from one jitted forward/backward."""
    def run(*args):
        out, pullback = jax.vjp(fn, *args)
        # Cotangent 2·out: differs per element, so every gradient path is exercised.
        return out, pullback(2 * out)
    return jax.jit(run)(*args)


# batch, T, S, N, K, H, D, causal, alignment, window, with mask, blocks
CASES = {
    # GQA, D != H, T and S not multiples of the block, T > S, two batch dims, mask + bias.
    "gqa_mask_bias_causal_bottom_right": ((2, 2), 21, 13, 4, 2, 8, 5, True, "bottom_right", None, True, 8),
    # T < S, top-left causal combined with a two-sided window, MQA (K = 1).
    "mqa_top_left_window": ((2,), 13, 30, 2, 1, 4, 6, True, "top_left", (3, 4), True, 8),
    # Non-causal sliding window, no mask, exact block multiples (no padding path).
    "two_sided_window_no_mask": ((1,), 16, 16, 2, 2, 4, 4, False, "bottom_right", (2, 3), False, 4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_matches_dense_values_and_grads(name):
    batch, t, s, n, kh, h, d, causal, align, window, with_mask, blk = CASES[name]
    rng = np.random.default_rng(0)
    q, k, v = _normal(rng, (*batch, t, n, h)), _normal(rng, (*batch, s, kh, h)), _normal(rng, (*batch, s, kh, d))
    bias = _normal(rng, (n, t, s))
    mask = jnp.asarray(rng.random((*batch, 1, t, s)) > 0.25) if with_mask else None
    dense_mask = mask if window is None else combine_masks(mask, sliding_window_mask(t, s, window=window, alignment=align))
    common = dict(is_causal=causal, causal_alignment=align)

    def dense(q, k, v, b):
        return dense_sdpa(q, k, v, mask=dense_mask, bias=b, implementation="dense", **common)

    def chunked(q, k, v, b):
        return chunked_attention(q, k, v, mask=mask, bias=b, window=window, block_q=blk, block_k=blk, **common)

    out_dense, grads_dense = _value_and_grads(dense, q, k, v, bias)
    out_chunked, grads_chunked = _value_and_grads(chunked, q, k, v, bias)
    np.testing.assert_allclose(out_chunked, out_dense, atol=2e-6, rtol=1e-5)
    for name_, gd, gc in zip("qkvb", grads_dense, grads_chunked):
        np.testing.assert_allclose(gc, gd, atol=2e-5, rtol=1e-4, err_msg=f"d{name_}")


def test_padded_keys_do_not_enter_the_softmax():
    # S = 10 with 8-key blocks: the second block holds 6 zero-padded keys. Were they
    # counted (the published reference does), each would add exp(0 - max) to the
    # normaliser and a zero value to the sum. Float64 NumPy reference.
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 10, 1, 4)) for _ in range(3))
    logits = np.einsum("tnh,snh->nts", q[0], k[0]) / 2.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    expected = np.einsum("nts,snd->tnd", p / p.sum(-1, keepdims=True), v[0])
    out = chunked_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), block_q=8, block_k=8)
    np.testing.assert_allclose(np.asarray(out[0], np.float64), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_fully_masked_rows_are_zero_with_finite_grads(dtype):
    rng = np.random.default_rng(2)
    t, s = 12, 9
    q, k, v = _normal(rng, (2, t, 2, 4), dtype), _normal(rng, (2, s, 2, 4), dtype), _normal(rng, (2, s, 2, 4), dtype)
    mask = np.ones((2, 1, t, s), bool)
    mask[0, :, 10] = False  # one row sees nothing; bottom-right causal also blinds rows 0..2
    mask = jnp.asarray(mask)

    def f(q, k, v):
        return chunked_attention(q, k, v, mask=mask, is_causal=True, block_q=4, block_k=4)

    out, grads = _value_and_grads(f, q, k, v)
    assert out.dtype == dtype
    assert np.all(np.asarray(out[0, 10], np.float32) == 0) and np.all(np.asarray(out[:, :3], np.float32) == 0)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
    assert np.all(np.asarray(grads[0][0, 10], np.float32) == 0)
    dense = dense_sdpa(q, k, v, mask=mask, is_causal=True, implementation="dense")
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(dense, np.float32), atol=tol)


def test_block_plan_counts():
    # Causal self-attention, 4x4 blocks: the lower triangle incl. diagonal = 4·5/2 = 10.
    assert computed_blocks(64, 64, is_causal=True, block_q=16, block_k=16) == (10, 16)
    assert computed_blocks(64, 64, block_q=16, block_k=16) == (16, 16)
    # Causal window of 16 predecessors: each query block needs its diagonal block and
    # the one before it (except the first): 1 + 2 + 2 + 2 = 7.
    assert computed_blocks(64, 64, is_causal=True, window=16, block_q=16, block_k=16) == (7, 16)
    # Bottom-right with T=16 < S=64: the single query block sees all 4 key blocks.
    assert computed_blocks(16, 64, is_causal=True, block_q=16, block_k=16) == (4, 4)
    # The backward plan is the transpose of the forward plan.
    kv_lo, kv_hi, q_lo, q_hi = block_plan(50, 70, 16, 8, offset=20, left=9, right=3)
    fwd = {(i, j) for i in range(len(kv_lo)) for j in range(kv_lo[i], kv_hi[i])}
    bwd = {(i, j) for j in range(len(q_lo)) for i in range(q_lo[j], q_hi[j])}
    brute = {(r // 16, c // 8) for r in range(50) for c in range(70) if -3 <= r + 20 - c <= 9}
    assert fwd == bwd == brute


@pytest.mark.parametrize("t,s,bq,bk,offset,left,right", [
    (50, 70, 16, 8, 20, 9, 3),        # two-sided band, padded keys and rows
    (64, 64, 16, 16, 0, None, 0),      # causal self-attention
    (21, 13, 8, 8, -8, None, 0),       # causal, T > S (bottom right), padding on both sides
    (40, 40, 8, 8, 0, 12, None),       # left window only
    (32, 48, 8, 16, 0, None, None),    # no band: every block full
    (32, 44, 8, 16, 0, None, None),    # no band, padded keys: the last key block is not full
])
def test_full_block_plan_is_exactly_the_unmasked_blocks(t, s, bq, bk, offset, left, right):
    # A block is "full" iff every real query row sees every key of the block
    # (padded keys count as unseen); full blocks sit inside the computed range
    # and are contiguous, so [lo, full_lo), [full_lo, full_hi), [full_hi, hi) partition it.
    lo_, hi_ = (-10**9 if right is None else -right), (10**9 if left is None else left)
    kv_lo, kv_hi, q_lo, q_hi = block_plan(t, s, bq, bk, offset=offset, left=left, right=right)
    f = full_block_plan(t, s, bq, bk, offset=offset, left=left, right=right)
    nq, nk = len(kv_lo), len(q_lo)

    def brute_full(i, j):
        rows = range(i * bq, min((i + 1) * bq, t))
        cols = range(j * bk, (j + 1) * bk)
        return all(c < s and lo_ <= r + offset - c <= hi_ for r in rows for c in cols)

    for lo, hi, f_lo, f_hi, count, full in ((kv_lo, kv_hi, f[0], f[1], nq, brute_full),
                                            (q_lo, q_hi, f[2], f[3], nk, lambda j, i: brute_full(i, j))):
        for a in range(count):
            assert lo[a] <= f_lo[a] <= f_hi[a] <= hi[a]
            assert {b for b in range(lo[a], hi[a]) if full(a, b)} == set(range(f_lo[a], f_hi[a]))
            if f_lo[a] == f_hi[a]:
                assert f_lo[a] == hi[a]


def test_skipped_blocks_are_never_read():
    # NaN keys/values in the last key block: a query block that the plan skips past
    # that block stays finite. Had the block been computed and merely masked, the
    # 0 · NaN in P·V (and in the gradient) would poison the whole row.
    rng = np.random.default_rng(3)
    q, k, v = (_normal(rng, (1, 32, 1, 4)) for _ in range(3))
    k_bad, v_bad = k.at[:, 24:].set(jnp.nan), v.at[:, 24:].set(jnp.nan)

    def f(q, k, v):
        return chunked_attention(q, k, v, is_causal=True, block_q=8, block_k=8)

    out = f(q, k_bad, v_bad)
    np.testing.assert_allclose(out[:, :24], f(q, k, v)[:, :24], atol=1e-6)
    dq = jax.grad(lambda q: jnp.sum(f(q, k_bad, v_bad)[:, :24]))(q)
    assert np.all(np.isfinite(np.asarray(dq[:, :24])))
    assert np.all(np.isnan(np.asarray(out[:, 24:])))  # the probe is live: unskipped rows see NaN


def test_jit_equals_eager_and_dispatch():
    rng = np.random.default_rng(4)
    q, k, v = (_normal(rng, (2, 20, 2, 8)) for _ in range(3))
    eager = chunked_attention(q, k, v, is_causal=True, block_q=8, block_k=8)
    jitted = jax.jit(lambda q, k, v: chunked_attention(q, k, v, is_causal=True, block_q=8, block_k=8))(q, k, v)
    np.testing.assert_allclose(jitted, eager, atol=1e-6)
    via_sdpa = dense_sdpa(q, k, v, is_causal=True, window=6, implementation="chunked")
    dense = dense_sdpa(q, k, v, is_causal=True, window=6, implementation="dense")
    np.testing.assert_allclose(via_sdpa, dense, atol=1e-5)


def test_auto_selection_threshold():
    def choose(implementation, query, key, dropout, return_weights):
        call = backend_select.describe(query.shape, key.shape, key.shape, query.dtype,
                                       platform=jax.default_backend(), dropout=dropout,
                                       return_weights=return_weights)
        return backend_select.resolve(implementation, call)[0]

    small = jax.ShapeDtypeStruct((2, 128, 8, 64), jnp.float32)
    assert choose(None, small, small, False, False) == "dense"
    # 4 bytes · B·N·T·S = 4·1·8·4096·4096 = 512 MiB > 256 MiB.
    big = jax.ShapeDtypeStruct((1, 4096, 8, 64), jnp.float32)
    assert choose(None, big, big, False, False) == "chunked"
    assert choose(None, big, big, True, False) == "dense"  # dropout needs the dense path
    assert choose(None, big, big, False, True) == "dense"  # so do returned weights
    # The memory threshold itself (platform-independent part of the rule): exactly
    # 256 MiB stays dense, one more byte goes chunked. Shapes short enough that the
    # CPU speed rule (T, S >= 512) does not apply.
    edge = backend_select.AttentionCall(platform="gpu", batch=1, t=256, s=2**15, n=8, k=8, h=64, d=64)
    assert backend_select.select_implementation(edge) == "dense"
    assert backend_select.select_implementation(edge, threshold=2**28 - 1) == "chunked"


def test_bad_inputs_raise():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="implementation"):
        dense_sdpa(q, q, q, implementation="flash")
    with pytest.raises(ValueError, match="dense"):
        dense_sdpa(q, q, q, implementation="chunked", dropout_rate=0.1, deterministic=False,
                   dropout_rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="dense"):
        dense_sdpa(q, q, q, implementation="chunked", return_weights=True)
    with pytest.raises(ValueError, match="window"):
        chunked_attention(q, q, q, window=-1)
    with pytest.raises(ValueError, match="block_q"):
        chunked_attention(q, q, q, block_q=0)
    with pytest.raises(ValueError, match="alignment"):
        chunked_attention(q, q, q, is_causal=True, causal_alignment="top_right")


@pytest.mark.slow
def test_benchmark_quick_smoke(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.bench_attention", "--quick", "--out", str(tmp_path),
           "--causal", "yes", "--no-torch", "--budget", "0", "--min-runs", "1", "--max-runs", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "attention.md").read_text()
    for name in ("ours-chunked", "ours-dense", "jax.nn-xla", "flax.linen"):
        assert f"| {name} |" in table
    assert (tmp_path / "attention.png").stat().st_size > 0


def test_default_block_edges_rule():
    from flax_attention.kernels.flash import default_block_edges

    # CPU: grow 128x128 (key side first) until B·N·bq·bk reaches 2^20 logits, up to 256x512.
    assert default_block_edges(2048, 2048, 8, platform="cpu") == (256, 512)
    assert default_block_edges(512, 512, 32, platform="cpu") == (128, 256)
    assert default_block_edges(250, 250, 256, platform="cpu") == (128, 128)  # enough work already
    assert default_block_edges(100, 100, 1, platform="cpu") == (128, 128)  # never past the length
    # Causal/windowed: keep >= 4 blocks per axis so the hidden triangle is still skipped.
    assert default_block_edges(512, 512, 32, platform="cpu", banded=True) == (128, 128)
    assert default_block_edges(1024, 1024, 8, platform="cpu", banded=True) == (256, 256)
    assert default_block_edges(2048, 2048, 8, platform="cpu", banded=True) == (256, 512)
    assert default_block_edges(2048, 2048, 8, platform="gpu") == (512, 512)
    # The chosen edges are what the kernel uses: 2048 = 8 x 256 query rows, 4 x 512 keys.
    assert computed_blocks(2048, 2048, rows=8) == (32, 32) or jax.default_backend() != "cpu"
