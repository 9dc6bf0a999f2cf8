"""Attention heatmaps: sown weights are collected per kind/layer and written as PNGs."""

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.training.heatmaps import collect_attention, plot_heads, save_attention_heatmaps
from flax_attention.linen.layers import TransformerConfig
from flax_attention.linen.transformer import Transformer


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


def test_query_labels_never_cover_a_neighbouring_panel(tmp_path, monkeypatch):
    """Issue 19: the y-axis token labels of heads 1-3 overlapped the panel on their left."""
    from matplotlib.figure import Figure

    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), save(self, *a, **k))[1])
    queries = ["▁A", "▁dog", "▁is", "▁running", "▁across", "▁the", "▁big", "▁green", "▁meadow", "."]
    keys = ["▁Ein", "▁Hund", "▁rennt", "▁über", "▁die", "▁große", "▁grüne", "▁Wiese", "</s>"]
    weights = np.random.default_rng(0).dirichlet(np.ones(len(keys)), size=(6, len(queries)))
    plot_heads(weights, tmp_path / "h.png", x_labels=keys, y_labels=queries)
    fig = drawn[0]
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6
    labelled = 0
    for ax in panels:
        for label in ax.get_yticklabels():
            if not label.get_text():
                continue
            labelled += 1
            box = label.get_window_extent(renderer)
            for other in panels:
                if other is not ax:
                    assert not box.overlaps(other.get_window_extent(renderer)), (label.get_text(), other.get_title())
            assert box.x0 >= 0  # not cut off at the figure's left edge
    assert labelled == 2 * len(queries)  # one labelled panel per row of heads
