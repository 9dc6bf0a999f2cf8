"""Flax linen modules over :mod:`flax_attention.functional` (their NNX twins: :mod:`flax_attention.nnx`).

* :mod:`.multihead`: ``MultiHeadAttention``, a drop-in for ``flax.linen.MultiHeadDotProductAttention``;
* :mod:`.additive`: ``AdditiveAttention`` (learned context vector), ``BahdanauAttention``;
* :mod:`.layers` / :mod:`.positions`: ``TransformerConfig``, feed-forward, encoder/decoder layers,
  the sinusoidal position layer; :mod:`.transformer`: encoder, decoder, ``Transformer``;
* :mod:`.decoding`: greedy and beam-search decoding of a ``Transformer`` with its KV cache;
* :mod:`.generation`: sampled (greedy / temperature / top-k / top-p) generation of a decoder-only LM;
* :mod:`.partitioning`: logical axis names on parameters (opt-in sharding metadata).
"""
