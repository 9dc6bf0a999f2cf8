"""flax_attention: attention mechanisms for JAX and Flax.

Layout (imports run one way, down this list, never back; ``tests/test_layout.py``
enforces it):

* :mod:`flax_attention.training`: the trainer behind ``train.py``;
* :mod:`flax_attention.embed`: word vectors (skip-gram, pretrained embeddings);
* :mod:`flax_attention.data`: the input pipelines (IMDB, Multi30k, synthetic tasks);
* :mod:`flax_attention.models`: model families (BiGRU + attention, Transformer classifier);
* :mod:`flax_attention.nnx` (imported on its own: ``import flax_attention.nnx``)
  and :mod:`flax_attention.linen`: Flax modules that only hold parameters and
  call the functions below;
* :mod:`flax_attention.functional`: the pure functions (attention, masks,
  positions, KV-cache arithmetic, additive attention, ring/Ulysses context
  parallelism);
* :mod:`flax_attention.kernels`: the attention kernels they dispatch to;
* :mod:`flax_attention.core`: what the kernels and the functions share (dtype
  rules, input checks, trace queries, the causal/window masks).

The names below are the public API.

Shape legend (used in every docstring and einsum string of this package):

=====  ==========================================================
``B``  batch; ``...`` stands for any number of leading batch dims
``T``  query length (target positions)
``S``  key/value length (source positions)
``N``  query heads
``K``  key/value heads; ``N % K == 0``, query head ``n`` reads kv head
       ``n // (N // K)`` (grouped-query attention; ``K == 1`` is MQA)
``G``  query heads per kv head, ``G = N // K``
``H``  query/key head dim
``D``  value head dim (may differ from ``H``)
``E``  model features (``d_model``)
``F``  feed-forward hidden features (``d_ff``)
``A``  additive-attention size
``V``  vocabulary size
=====  ==========================================================

Mask convention, everywhere: a boolean array, ``True`` = attend, broadcastable
to ``[..., N, T, S]`` (``[..., T, S]`` for additive attention, which has no
heads). A query row with nothing to attend to yields exactly zeros and finite
gradients, in every dtype.
"""

from flax_attention.functional.masks import (
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
from flax_attention.functional.attention import (
    attention_weights,
    masked_softmax,
    scaled_dot_product_attention,
)
from flax_attention.kernels.flash import chunked_attention
from flax_attention.functional.ring import ring_attention
from flax_attention.functional.ulysses import ulysses_attention
from flax_attention.functional.context_parallel import (
    context_parallel_attention,
    from_layout,
    layout_positions,
    ring_work,
    shard_from_layout,
    shard_to_layout,
    to_layout,
)
from flax_attention.functional.additive import additive_attention, additive_scores, context_attention
from flax_attention.linen.additive import AdditiveAttention, BahdanauAttention
from flax_attention.linen.multihead import MultiHeadAttention
from flax_attention.linen.layers import (
    PositionwiseFeedForward,
    SinusoidalPositionalEncoding,
    TransformerConfig,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    sinusoidal_encoding,
    sinusoidal_positions,
)
from flax_attention.linen.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerEncoder,
    init_cache,
)
from flax_attention.linen.decoding import beam_search, greedy_decode, length_penalty

__version__ = "0.2.0"

__all__ = [
    "AdditiveAttention",
    "BahdanauAttention",
    "MultiHeadAttention",
    "PositionwiseFeedForward",
    "SinusoidalPositionalEncoding",
    "Transformer",
    "TransformerConfig",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "additive_attention",
    "additive_scores",
    "attention_weights",
    "beam_search",
    "causal_mask",
    "causal_mask_from_positions",
    "chunked_attention",
    "combine_masks",
    "context_attention",
    "context_parallel_attention",
    "from_layout",
    "layout_positions",
    "ring_attention",
    "ring_work",
    "ulysses_attention",
    "shard_from_layout",
    "shard_to_layout",
    "to_layout",
    "greedy_decode",
    "init_cache",
    "key_mask",
    "length_penalty",
    "masked_softmax",
    "padding_mask",
    "query_key_mask",
    "scaled_dot_product_attention",
    "segment_mask",
    "sinusoidal_encoding",
    "sinusoidal_positions",
    "sliding_window_mask",
    "token_mask",
]
