"""PNG heatmaps of Transformer attention: encoder self-, decoder self- and cross-attention.

Weights come from the ``'intermediates'`` collection that
:class:`~flax_attention.linen.multihead.MultiHeadAttention` sows when
``TransformerConfig.sow_weights`` is on. One PNG per (kind, layer), one panel
per head; rows are queries, columns keys. Figures are drawn on matplotlib's
Agg canvas directly, so importing this module never changes the global backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

KINDS = {  # output name -> (stack, sub-layer)
    "encoder_self": ("encoder", "self_attention"),
    "decoder_self": ("decoder", "self_attention"),
    "cross": ("decoder", "cross_attention"),
}


def attention_maps(intermediates) -> Dict[str, List[np.ndarray]]:
    """Sown weights -> ``{"encoder_self" | "decoder_self" | "cross": [per layer [B, N, T, S]]}``.

    Accepts the ``'intermediates'`` collection (with or without the outer
    ``{'intermediates': ...}`` key). Missing kinds are left out.
    """
    tree = intermediates.get("intermediates", intermediates)
    maps: Dict[str, List[np.ndarray]] = {}
    for kind, (stack, sub) in KINDS.items():
        layers = tree.get(stack, {})
        names = sorted((k for k in layers if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
        found = [np.asarray(layers[n][sub]["attention_weights"][0]) for n in names if sub in layers[n]]
        if found:
            maps[kind] = found
    return maps


def collect_attention(model, params, src, tgt_in) -> Dict[str, List[np.ndarray]]:
    """Runs a teacher-forced forward pass with weight sowing on; see :func:`attention_maps`.

    Args:
      model: a ``Transformer`` (its config need not have ``sow_weights``).
      params: its parameters.
      src: int ``[B, S]``; tgt_in: int ``[B, T]``.
    """
    sowing = type(model)(model.config.replace(sow_weights=True))
    _, state = jax.jit(lambda p, s, t: sowing.apply({"params": p}, s, t, mutable=["intermediates"]))(
        params, src, tgt_in)
    return attention_maps(state)


def draw_heads(weights: np.ndarray, *, title: str = "", x_labels: Optional[Sequence[str]] = None,
               y_labels: Optional[Sequence[str]] = None) -> Figure:
    """A figure with one heatmap per head (see :func:`plot_heads`), laid out so no label covers a panel.

    Every head has the same queries, so only the first panel of each row
    carries the query labels; the layout engine makes room for them.
    """
    weights = np.asarray(weights, np.float32)
    if weights.ndim != 3:
        raise ValueError(f"weights must be [N, T, S] for one example, got shape {weights.shape}.")
    n, t, s = weights.shape
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.0 + 2.6 * cols * max(s / t, 0.6), 0.6 + 2.6 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= n:
            ax.axis("off")
            continue
        image = ax.imshow(weights[h], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                          interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=8)
        show_y = h % cols == 0  # the leftmost panel of its row
        for labels, n_ticks, set_ticks, set_labels, axis in (
            (x_labels, s, ax.set_xticks, ax.set_xticklabels, "x"),
            (y_labels, t, ax.set_yticks, ax.set_yticklabels, "y"),
        ):
            if labels is not None and len(labels) == n_ticks and n_ticks <= 40:
                set_ticks(range(n_ticks))
                if axis == "y" and not show_y:
                    set_labels([])
                else:
                    set_labels([str(x) for x in labels], fontsize=6, rotation=90 if axis == "x" else 0)
            else:
                set_ticks([])
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_heads(weights: np.ndarray, path, *, title: str = "",
               x_labels: Optional[Sequence[str]] = None, y_labels: Optional[Sequence[str]] = None) -> Path:
    """Writes one PNG with a heatmap per head.

    Args:
      weights: ``[N, T, S]`` for one example.
      path: output ``.png`` file (parents are created).
      title: figure title.
      x_labels: ``S`` key labels; y_labels: ``T`` query labels (ticks shown
        when there are at most 40; query labels on the first panel of a row).

    Returns:
      The written path.
    """
    fig = draw_heads(weights, title=title, x_labels=x_labels, y_labels=y_labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def save_attention_heatmaps(
    maps: Dict[str, List[np.ndarray]], out_dir, *, example: int = 0,
    src_labels: Optional[Sequence[str]] = None, tgt_labels: Optional[Sequence[str]] = None,
) -> List[Path]:
    """Writes ``{kind}_layer{i}.png`` for every kind and layer of one example.

    Pass labels of the *unpadded* source/target to crop the maps to the real
    tokens: keys/queries beyond the labels are padding and are cut off.

    Returns:
      The written paths.
    """
    paths = []
    for kind, layers in maps.items():
        q_labels = src_labels if kind == "encoder_self" else tgt_labels
        k_labels = tgt_labels if kind == "decoder_self" else src_labels
        for i, w in enumerate(layers):
            w = np.asarray(w[example])
            if q_labels is not None:
                w = w[:, : len(q_labels)]
            if k_labels is not None:
                w = w[:, :, : len(k_labels)]
            paths.append(plot_heads(w, Path(out_dir) / f"{kind}_layer{i}.png",
                                    title=f"{kind.replace('_', ' ')} attention, layer {i}",
                                    x_labels=k_labels, y_labels=q_labels))
    return paths
