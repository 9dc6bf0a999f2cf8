"""Flax NNX modules over the same pure functions as the linen modules.

``import flax_attention.nnx`` (``import flax_attention`` does not import it,
so linen users do not pay for it). Each module names its parameters as its
linen twin does; :func:`linen_variables` and :func:`load_linen_variables`
move them (and the decoding cache) between the two. Shape legend and mask
convention: see :mod:`flax_attention`.
"""

from flax_attention.nnx.additive import AdditiveAttention, BahdanauAttention
from flax_attention.nnx.convert import linen_variables, load_linen_variables
from flax_attention.nnx.layers import PositionwiseFeedForward
from flax_attention.nnx.multihead import MultiHeadAttention

__all__ = [
    "AdditiveAttention",
    "BahdanauAttention",
    "MultiHeadAttention",
    "PositionwiseFeedForward",
    "linen_variables",
    "load_linen_variables",
]
