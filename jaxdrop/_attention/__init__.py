"""Attention with dropout on the attention weights, without the [B, N, T, S] mask.

The dropout mask that every implementation applies is the 8-bit layout of
:mod:`jaxdrop._masks`, below this package. The modules stack one way, bottom to
top:

- ``base``: the static configuration, input canonicalization and the
  materialized ``"reference"`` implementation (the oracle of the tests);
- ``xla``: the blockwise flash-attention algorithm in ``jax.numpy``;
- ``pallas_triton``: the same algorithm as fused Pallas kernels for GPUs;
- ``api``: :func:`jaxdrop.dot_product_attention`, which validates its
  arguments and picks an implementation;
- ``flax_compat``: ``attention_fn`` drop-ins for flax's attention modules.
"""
