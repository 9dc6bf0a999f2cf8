"""The lowest layer: primitives that the kernels and the functions both use.

Nothing here imports from the rest of the package, so
:mod:`flax_attention.kernels` and :mod:`flax_attention.functional` can share
these without either importing the other.

* :mod:`.dtypes`: the softmax dtype rule (``>= float32``, ``>=`` the input
  precision) and the finite fill for masked logits;
* :mod:`.checks`: operand conversion and shape checks (``prepare``), static ints;
* :mod:`.tracing`: which autodiff/``vmap`` traces enclose a call, ``shard_map``'s
  varying axes (``vary_like``);
* :mod:`.masks`: causal / sliding-window masks, ``combine_masks``, the causal
  alignments and window arithmetic;
* :mod:`.reductions`: ``argmax`` as two plain reductions (XLA:CPU's own is a scalar loop) and the
  token-accuracy hits ``top_token_hits``.
"""
