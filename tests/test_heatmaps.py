"""Attention heatmaps: sown weights are collected per kind/layer and written as PNGs."""

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.heatmaps import collect_attention, plot_heads, save_attention_heatmaps
from flax_attention.layers import TransformerConfig
from flax_attention.transformer import Transformer


def test_collect_and_write_pngs(tmp_path):
    config = TransformerConfig(vocab_size=12, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=2,
                               num_decoder_layers=1, max_len=8)
    model = Transformer(config)
    src = jnp.asarray([[5, 6, 7, 0], [8, 9, 0, 0]], jnp.int32)
    tgt_in = jnp.asarray([[1, 7, 6], [1, 9, 0]], jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), src, tgt_in)["params"]
    maps = collect_attention(model, params, src, tgt_in)
    assert {k: len(v) for k, v in maps.items()} == {"encoder_self": 2, "decoder_self": 1, "cross": 1}
    assert maps["encoder_self"][0].shape == (2, 2, 4, 4) and maps["cross"][0].shape == (2, 2, 3, 4)
    # Rows are distributions over the real keys; the decoder is causal.
    np.testing.assert_allclose(maps["cross"][0][0].sum(-1), 1.0, rtol=1e-5)
    assert np.all(maps["cross"][0][0, :, :, 3] == 0)
    assert np.all(np.triu(maps["decoder_self"][0][0, 0], k=1) == 0)

    paths = save_attention_heatmaps(maps, tmp_path, example=0, src_labels=["5", "6", "7"],
                                    tgt_labels=["<s>", "7", "6"])
    assert sorted(p.name for p in paths) == [
        "cross_layer0.png", "decoder_self_layer0.png", "encoder_self_layer0.png", "encoder_self_layer1.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    single = plot_heads(np.full((3, 2, 2), 0.5), tmp_path / "sub" / "x.png", title="t")
    assert single.exists()
