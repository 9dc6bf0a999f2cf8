"""Attention kernels behind ``scaled_dot_product_attention(implementation=...)``.

* :mod:`.flash`: the XLA chunked (online-softmax) kernel, with its block plan
  (:mod:`._blocks`), tile maths (:mod:`._flash_tiles`) and passes
  (:mod:`._flash_passes`), which the ring attention reuses;
* :mod:`.backends`: adapters to the fused kernels (cuDNN through ``jax.nn``,
  Pallas Triton/TPU, tokamax) and their capability checks;
* :mod:`.backend_select`: what ``implementation=None`` picks on each platform.
"""
