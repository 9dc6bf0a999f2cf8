"""Fused-kernel backends: Pallas kernels in interpret mode against a float64 reference, selection, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention import MultiHeadAttention, scaled_dot_product_attention as sdpa
from flax_attention.kernels import backend_select as bs
from flax_attention.functional.masks import causal_mask

TRITON = "pallas_triton:interpret"
TPU = "pallas_tpu:interpret"


def _qkv(seed, b=2, t=16, s=32, n=4, k=2, h=16, d=16):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(np.float32)
                 for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, d)))


def _reference(q, k, v, **kw):
    """The dense path in float64: the ground truth for values and gradients."""
    with jax.enable_x64(True):
        q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
        out = sdpa(q, k, v, implementation="dense", **kw)
        grads = jax.grad(lambda *a: (sdpa(*a, implementation="dense", **kw) ** 2).sum(), (0, 1, 2))(q, k, v)
        return np.asarray(out), [np.asarray(g) for g in grads]


def _check(impl, q, k, v, atol=2e-5, **kw):
    out = sdpa(q, k, v, implementation=impl, **kw)
    grads = jax.grad(lambda *a: (sdpa(*a, implementation=impl, **kw) ** 2).sum(), (0, 1, 2))(q, k, v)
    want, want_grads = _reference(q, k, v, **kw)
    assert out.dtype == jnp.float32 and out.shape == want.shape
    np.testing.assert_allclose(out, want, atol=atol)
    for g, w in zip(grads, want_grads):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, w, atol=10 * atol)
    return out, grads


# GQA (N=4, K=2), D != H, T != S in both directions, both alignments; the
# alignments and the full case are split between the kernels to keep the file fast.
CASES = [
    (TRITON, dict(t=16, s=32, is_causal=True, causal_alignment="bottom_right")),  # T < S: padded queries
    (TRITON, dict(t=32, s=16, is_causal=True, causal_alignment="bottom_right")),  # first 16 rows see nothing
    (TRITON, dict(t=16, s=32, is_causal=True, causal_alignment="top_left")),
    (TPU, dict(t=32, s=16, is_causal=True, causal_alignment="bottom_right")),
    (TPU, dict(t=16, s=32, is_causal=False)),
]


@pytest.mark.parametrize("impl,case", CASES, ids=lambda c: str(c) if isinstance(c, str) else
                         f"{c['t']}x{c['s']}-{c.get('causal_alignment', 'full')}")
def test_kernels_match_float64_reference(impl, case):
    case = dict(case)
    q, k, v = _qkv(0, t=case.pop("t"), s=case.pop("s"), d=32)
    out, grads = _check(impl, q, k, v, **case)
    if q.shape[1] > k.shape[1] and case["is_causal"]:
        assert (np.asarray(out[:, :16]) == 0).all()  # dead rows: exact zeros
        assert (np.asarray(grads[0][:, :16]) == 0).all()  # and no gradient


def test_pallas_tpu_masks_bias_window_and_dead_rows():
    q, k, v = _qkv(1, t=16, s=24)
    rng = np.random.default_rng(2)
    mask = rng.random((2, 1, 16, 24)) < 0.7
    mask[0, :, 3] = False  # dead row for every head of batch 0
    mask[1, :, 5, :] = False
    bias = rng.standard_normal((4, 16, 24)).astype(np.float32)
    bias[:, 7, :] = -np.inf  # a dead row made by the bias alone
    kw = dict(mask=mask, window=(6, 2), is_causal=True, scale=0.3)

    def loss(impl, *args):
        return (sdpa(*args[:3], bias=args[3], implementation=impl, **kw) ** 2).sum()

    out = sdpa(q, k, v, bias=bias, implementation=TPU, **kw)
    grads = jax.grad(lambda *a: loss(TPU, *a), (0, 1, 2, 3))(q, k, v, bias)
    with jax.enable_x64(True):
        args64 = [np.asarray(x, np.float64) for x in (q, k, v, bias)]
        want = sdpa(*args64[:3], bias=args64[3], implementation="dense", **kw)
        want_grads = jax.grad(lambda *a: loss("dense", *a), (0, 1, 2, 3))(*args64)
    np.testing.assert_allclose(out, want, atol=2e-5)
    for g, w in zip(grads, want_grads):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, w, atol=2e-4)
    for row in (out[0, 3], out[1, 5], out[:, 7]):
        assert (np.asarray(row) == 0).all()  # dead rows: exact zeros
    assert (np.asarray(grads[0][0, 3]) == 0).all()  # no gradient reaches a dead query


@pytest.mark.slow
def test_pallas_tpu_segment_mask_and_bfloat16():
    q, k, v = _qkv(3, t=32, s=32, n=2, k=1)
    seg = np.repeat(np.array([[0, 1], [0, 0]]), 16, axis=1)  # [B, T]
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]  # segment mask as a boolean mask
    _check(TPU, q, k, v, mask=mask, is_causal=True)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out = sdpa(qb, kb, vb, mask=mask, implementation=TPU)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), _reference(q, k, v, mask=mask)[0], atol=3e-2)


def test_pallas_triton_refuses_masks_and_odd_lengths():
    q, k, v = _qkv(4, t=16, s=32)
    with pytest.raises(ValueError, match=r"pallas_triton.*no mask.*implementation='chunked'"):
        sdpa(q, k, v, mask=np.ones((16, 32), bool), implementation=TRITON)
    with pytest.raises(ValueError, match="window"):
        sdpa(q, k, v, window=3, implementation=TRITON)
    q, k, v = _qkv(4, t=24, s=32)
    with pytest.raises(ValueError, match="T=24"):
        sdpa(q, k, v, implementation=TRITON)


def test_hardware_and_option_errors():
    q, k, v = _qkv(5)
    with pytest.raises(ValueError, match=r"'cudnn'.*needs a GPU.*this is a CPU.*'chunked'"):
        sdpa(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match=r"needs a TPU.*'pallas_tpu:interpret'"):
        sdpa(q, k, v, implementation="pallas_tpu")
    with pytest.raises(ValueError, match="only .* have an interpret mode"):
        sdpa(q, k, v, implementation="cudnn:interpret")
    with pytest.raises(ValueError, match="implementation must be"):
        sdpa(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match=r"never materialises.*'dense'"):
        sdpa(q, k, v, implementation=TPU, return_weights=True)
    with pytest.raises(ValueError, match=r"forward-mode.*'dense'"):
        jax.jvp(lambda q: sdpa(q, k, v, implementation=TPU), (q,), (q,))
    with pytest.raises(ValueError, match="compile-time Python float"):
        jax.grad(lambda c: sdpa(q, k, v, scale=c, implementation=TPU).sum())(0.5)


def _call(platform, **kw):
    base = dict(platform=platform, batch=2, t=128, s=128, n=8, k=8, h=64, d=64, dtype="bfloat16")
    return bs.AttentionCall(**{**base, **kw})


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_auto_keeps_the_xla_rule_where_no_kernel_is_measured(platform):
    # float32: cuDNN (GPU's only measured kernel) refuses it, so every platform keeps the XLA rule.
    assert bs.MEASURED["cpu"] == bs.MEASURED["tpu"] == ()
    assert bs.select_implementation(_call(platform, dtype="float32")) == "dense"
    big = _call(platform, batch=1, t=4096, s=4096, dtype="float32")  # 512 MiB of float32 logits
    assert bs.select_implementation(big) == "chunked"
    for opt in ("dropout", "return_weights", "forward_mode"):
        assert bs.select_implementation(dataclasses.replace(big, dtype="bfloat16", **{opt: True})) == "dense"
    if platform != "gpu":
        assert bs.select_implementation(dataclasses.replace(big, dtype="bfloat16")) == "chunked"


def test_auto_takes_cudnn_on_gpu_wherever_its_rules_allow():
    pick = bs.select_implementation
    assert bs.MEASURED["gpu"] == ("cudnn",)
    for dtype in ("bfloat16", "float16"):
        assert pick(_call("gpu", dtype=dtype)) == "cudnn"
    for h in (8, 64, 128):
        assert pick(_call("gpu", h=h, d=h)) == "cudnn"
    ok = dict(has_mask=True, has_window=True, is_causal=True, t=6, s=10, k=2, batch=3)  # masks, GQA, T != S
    assert pick(_call("gpu", **ok)) == "cudnn"
    assert pick(_call("gpu", is_causal=True, t=7, s=7)) == "cudnn"  # its own causal flag: odd T is fine
    assert pick(_call("gpu", batch=1, t=16384, s=16384, h=128, d=128, is_causal=True)) == "cudnn"
    # Everything else keeps the XLA rule (dense here; chunked for big logits).
    refused = [dict(dtype="float32"), dict(h=256, d=256), dict(h=60, d=60), dict(d=32), dict(has_bias=True),
               dict(dropout=True), dict(return_weights=True), dict(forward_mode=True), dict(static_scale=False),
               dict(has_mask=True, t=7), dict(is_causal=True, t=5, s=8), dict(has_window=True, s=9)]
    for kw in refused:
        assert pick(_call("gpu", **kw)) == "dense", kw
    assert pick(_call("gpu", batch=1, t=8192, s=8192, dtype="float32")) == "chunked"
    assert pick(_call("cpu")) == "dense" and pick(_call("tpu")) == "dense"  # bf16 elsewhere: XLA


def test_every_auto_kernel_names_its_evidence():
    listed = {(p, name) for p, names in bs.MEASURED.items() for name in names}
    assert listed == set(bs.MEASURED_SOURCES)
    source = bs.MEASURED_SOURCES[("gpu", "cudnn")]
    assert source.startswith("published, not measured by this project") and "H100" in source


def test_auto_picks_chunked_where_it_is_faster_on_cpu_only():
    # The memory rule alone keeps T=S=2048, B=1 (128 MiB of logits) dense; on CPU the
    # chunked kernel is measured faster from T=S=512 on, so auto takes it there.
    mid = _call("cpu", batch=1, t=2048, s=2048)
    assert bs.select_implementation(mid) == "chunked"
    assert bs.select_implementation(dataclasses.replace(mid, platform="gpu", dtype="float32")) == "dense"
    assert bs.select_implementation(_call("cpu", t=512, s=512)) == "chunked"
    assert bs.select_implementation(_call("cpu", t=511, s=4096)) == "dense"  # short queries: dense
    assert bs.select_implementation(_call("cpu", t=1, s=4096)) == "dense"  # decoding step
    assert bs.select_implementation(dataclasses.replace(mid, dropout=True)) == "dense"


def test_one_table_entry_enables_a_measured_kernel(monkeypatch):
    monkeypatch.setitem(bs.MEASURED, "gpu", ())
    assert bs.select_implementation(_call("gpu")) == "dense"
    monkeypatch.setitem(bs.MEASURED, "tpu", ("tokamax_mosaic",))
    assert bs.select_implementation(_call("tpu")) == "tokamax_mosaic"
    assert bs.select_implementation(_call("tpu", has_bias=True)) == "dense"  # refused: XLA rule


def test_capabilities():
    cap = bs.capability
    assert cap("cudnn", _call("gpu")) is None
    assert "GPU" in cap("cudnn", _call("cpu"))
    assert "H == D" in cap("cudnn", _call("gpu", d=32))
    assert "bias" in cap("cudnn", _call("gpu", has_bias=True))
    assert cap("pallas_triton", _call("gpu", is_causal=True, t=16, s=256)) is None  # re-aligned to T'=S
    assert "mask" in cap("pallas_triton", _call("gpu", has_mask=True))
    assert "T=48" in cap("pallas_triton", _call("gpu", t=48))
    assert cap("pallas_tpu", _call("tpu", has_mask=True, has_bias=True, has_window=True, t=7, s=9)) is None
    assert "float16" in cap("pallas_tpu", _call("tpu", dtype="float16"))
    assert "float64" in cap("pallas_tpu", _call("tpu", dtype="float64", interpret=True))
    assert cap("pallas_tpu", _call("cpu", interpret=True)) is None
    assert cap("tokamax_mosaic", _call("tpu")) is None and cap("tokamax_triton", _call("tpu")) is not None
    assert "dropout" in cap("tokamax_triton", _call("gpu", dropout=True))


def _strict_fake_cudnn(calls):
    """jax.nn's cuDNN entry as far as a CPU can check it: its input rules, then the XLA computation."""
    real = jax.nn.dot_product_attention

    def fake(q, k, v, bias=None, mask=None, *, scale=None, is_causal=False, implementation=None, **kw):
        assert implementation == "cudnn" and bias is None and not kw
        assert q.ndim == k.ndim == v.ndim == 4 and q.dtype in (jnp.bfloat16, jnp.float16)
        assert q.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0
        if mask is not None:  # jax's check_layout: a mask (sent as a bias) has full T and S axes
            assert mask.ndim == 4 and mask.shape[-2:] == (q.shape[1], k.shape[1]), mask.shape
            assert q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0  # the backward with a bias
        if is_causal:
            assert q.shape[1] == k.shape[1]  # its causal flag is top-left
        calls.append((q.shape, None if mask is None else mask.shape, is_causal))
        return real(q, k, v, mask=mask, scale=scale, is_causal=is_causal, implementation="xla")

    return fake


@pytest.mark.parametrize("case", ["padding_mask", "causal_t_lt_s", "causal_square"])
def test_default_on_gpu_routes_to_cudnn_and_keeps_the_guarantees(monkeypatch, case):
    q, k, v = _qkv(7, b=2, t=8, s=16 if case != "causal_square" else 8, n=4, k=2, h=16, d=16)
    kw = {"padding_mask": dict(mask=np.arange(16)[None, None, None, :] < np.array([16, 0])[:, None, None, None]),
          "causal_t_lt_s": dict(is_causal=True), "causal_square": dict(is_causal=True)}[case]
    want, want_grads = _reference(q, k, v, **kw)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", _strict_fake_cudnn(calls))
    out = sdpa(qb, kb, vb, **kw)  # implementation=None
    grads = jax.grad(lambda *a: (sdpa(*a, **kw).astype(jnp.float32) ** 2).sum(), (0, 1, 2))(qb, kb, vb)
    assert calls and out.dtype == jnp.bfloat16
    assert calls[0][2] == (case == "causal_square")  # the kernel's own causal flag only where alignments agree
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)
    for g, w in zip(grads, want_grads):
        assert np.isfinite(np.asarray(g, np.float32)).all()
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=1e-1)
    if case == "padding_mask":  # batch 1 has no visible key: exact zeros, no gradient
        assert (np.asarray(out[1], np.float32) == 0).all() and (np.asarray(grads[0][1], np.float32) == 0).all()


def test_module_passes_new_names_through():
    x = np.random.default_rng(6).standard_normal((2, 16, 32)).astype(np.float32)
    mha = MultiHeadAttention(num_heads=4, implementation=TPU)
    dense = mha.clone(implementation="dense")
    params = dense.init(jax.random.PRNGKey(0), x, x, mask=causal_mask(16))
    got = mha.apply(params, x, x, mask=causal_mask(16))
    np.testing.assert_allclose(got, dense.apply(params, x, x, mask=causal_mask(16)), atol=1e-5)


def test_pallas_triton_top_left_causal_with_more_queries_than_keys():
    # Every query sees key 0 at least; rows >= S see every key. It returned NaN everywhere.
    q, k, v = _qkv(3, t=32, s=16)
    _check(TRITON, q, k, v, is_causal=True, causal_alignment="top_left")


def test_pallas_tpu_keeps_a_finite_finfo_min_bias_finite():
    # flax's masking convention: a very negative finite bias. Dividing it by the
    # scale made it -inf (a dead row of zeros); dense and chunked give the mean of the values.
    q, k, v = _qkv(4, t=8, s=16)
    bias = np.zeros((2, 4, 8, 16), np.float32)
    bias[:, :, 2, :] = np.finfo(np.float32).min  # a whole row
    bias[:, :, 5, 3:] = np.finfo(np.float32).min  # most of a row: keys 0-2 must win
    mask = np.ones((2, 1, 8, 16), bool)
    mask[:, :, 5, :2] = False  # masked keys stay below finfo.min-biased ones, as on the dense path
    want = sdpa(q, k, v, bias=bias, mask=mask, implementation="dense")
    np.testing.assert_allclose(sdpa(q, k, v, bias=bias, mask=mask, implementation=TPU), want, atol=2e-5)
    np.testing.assert_allclose(want[:, 2], np.broadcast_to(v.mean(1).repeat(2, axis=1), want[:, 2].shape),
                               atol=1e-5)


@pytest.mark.parametrize("impl", [TRITON, TPU])
def test_pallas_kernels_run_in_64_bit_mode(impl):
    # The kernels mixed int32 and int64 indices under jax_enable_x64 (a raw TypeError).
    q, k, v = _qkv(5, t=16, s=16)
    want, want_grads = _reference(q, k, v, is_causal=True)
    with jax.enable_x64(True):
        loss = lambda *a: (sdpa(*a, is_causal=True, implementation=impl) ** 2).sum()  # noqa: E731
        out = sdpa(q, k, v, is_causal=True, implementation=impl)
        grads = jax.grad(loss, (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, want, atol=2e-5)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, atol=2e-4)
