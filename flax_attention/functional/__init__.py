"""Pure functions: attention, masks, positions, KV-cache arithmetic, context parallelism, sampling.

Everything here is callable without ``init``/``apply`` and is ``jit``/``vmap``/
``grad``-safe. :func:`~flax_attention.functional.attention.scaled_dot_product_attention`
is the front door; it dispatches to the kernels in :mod:`flax_attention.kernels`.
"""
