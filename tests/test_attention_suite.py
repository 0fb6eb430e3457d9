"""Every attention implementation against ``"reference"``, on every case of ``attention_cases``.

The implementations under test are ``"xla"`` (with each case's tiles), the
Pallas kernels in the Pallas interpreter (on any host, with each case's
tiles) and the Pallas kernels on a GPU with their default tiles (the ``gpu``
marker: ``pytest -m gpu tests/``, ``benchmarks/run_gpu.sh``; skipped
without one), as jax reruns its GPU kernel tests with ``INTERPRET = True``.
Each compares outputs and the gradients of q, k, v and bias with the
materialized reference, and the dropped weights with the documented mask
(``oracles.attention_keep_mask``), exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import CASES, FAST_COMPILE, KEY, KEY_DATA, Case, assert_close
from oracles import attention_keep_mask

from jaxdrop._attention import base
from jaxdrop._attention import pallas_triton as pt
from jaxdrop._attention import xla

ON_GPU = jax.default_backend() == "gpu"
IMPLEMENTATIONS = [
    "xla",
    "pallas-interpret",
    pytest.param("pallas-gpu", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU")]),
]



def _attention_fn(implementation: str, case: Case):
  """``fn(q, k, v, bias, mask, key_data, rate, config)`` of ``implementation``."""
  if implementation == "reference":
    return base.reference
  if implementation == "xla":
    return functools.partial(xla.attention, blocks=case.xla_blocks)
  if implementation == "pallas-interpret":
    return functools.partial(pt.attention, blocks=case.pallas_blocks, interpret=True)
  assert implementation == "pallas-gpu", implementation
  return pt.attention


@functools.cache
def _results(implementation: str, case: Case, dtype_name: str, compute_dtype_name: str = ""):
  """``(out, (dq, dk, dv[, dbias]))`` of ``sum(out * d_out)``, each computed once.

  The inputs are rounded to ``dtype_name``; the computation runs in
  ``compute_dtype_name`` (by default the same dtype).
  """
  dtype = jnp.dtype(compute_dtype_name or dtype_name)
  cast = lambda x: None if x is None else x.astype(dtype)
  q, k, v, bias, mask, d_out = case.arrays(jnp.dtype(dtype_name))
  q, k, v, bias = (cast(x) for x in (q, k, v, bias))
  bias, mask = case.bias_and_mask_4d(bias, mask)
  config = case.config(dtype)
  fn = _attention_fn(implementation, case)

  def run(q, k, v, bias):
    def loss(q, k, v, bias):
      out = fn(q, k, v, bias, mask, KEY_DATA, None, config)
      return jnp.sum(out.astype(jnp.float32) * d_out), out

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    grads, out = jax.grad(loss, argnums=argnums, has_aux=True)(q, k, v, bias)
    return out, grads

  options = FAST_COMPILE if implementation == "pallas-interpret" else None
  return jax.jit(run, compiler_options=options)(q, k, v, bias)


def _float32_reference(case: Case, dtype_name: str):
  """The reference in float32 on the inputs rounded to ``dtype_name``."""
  return _results("reference", case, dtype_name, "float32")


# Float32 bounds: on a CPU the implementations differ from the reference only in
# summation order; on an H100 the kernels' float32 products at HIGHEST were within
# 1e-4 of "xla" (the device checks of benchmarks/gpu_attention_check.py, before c813489).
FLOAT32_TOL = 1e-4 if ON_GPU else 2e-5
# bfloat16 / float16 inputs: the probabilities are rounded to the input dtype for
# P.V (8 or 11 significant bits), once in the forward and once in each backward product.
LOW_PRECISION_TOL = {"out": 3e-2, "grads": 4e-2}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_outputs_and_gradients_equal_the_reference(implementation, name):
  case = CASES[name]
  out, grads = _results(implementation, case, "float32")
  want_out, want_grads = _float32_reference(case, "float32")
  assert out.dtype == jnp.float32
  assert_close(out, want_out, FLOAT32_TOL)
  assert len(grads) == len(want_grads)
  for got, want in zip(grads, want_grads):
    assert got.dtype == want.dtype
    assert_close(got, want, FLOAT32_TOL)


# Each low precision on the causal case, bfloat16 on two more (a bias and mask; GQA, T > S).
LOW_PRECISION = [("causal", "bfloat16"), ("causal", "float16"),
                 ("full_mask_and_bias", "bfloat16"), ("gqa_t_longer", "bfloat16")]


@pytest.mark.parametrize("name, dtype", LOW_PRECISION)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_low_precision_is_close_to_the_float32_reference(implementation, name, dtype):
  case = CASES[name]
  out, grads = _results(implementation, case, dtype)
  want_out, want_grads = _float32_reference(case, dtype)
  assert out.dtype == jnp.dtype(dtype)
  assert_close(out, want_out, LOW_PRECISION_TOL["out"])
  for got, want in zip(grads, want_grads):
    assert got.dtype == jnp.dtype(dtype)
    assert_close(got, want, LOW_PRECISION_TOL["grads"])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_row_that_attends_nothing_outputs_zero_with_zero_gradients(implementation):
  case = CASES["gqa_bias_dead_row"]  # Query row 3 attends nothing.
  out, (dq, dk, dv, d_bias) = _results(implementation, case, "float32")
  np.testing.assert_array_equal(np.asarray(out[:, 3]), 0)
  assert np.all(np.asarray(out[:, 4]) != 0)
  np.testing.assert_array_equal(np.asarray(dq[:, 3]), 0)
  np.testing.assert_array_equal(np.asarray(d_bias[:, :, 3]), 0)


@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "shared"])
@pytest.mark.parametrize("implementation", ["reference", *IMPLEMENTATIONS])
def test_dropped_weights_are_the_documented_mask(implementation, shared):
  """With value = identity (S = H), each output row is the row P * keep * c itself."""
  case = Case("identity", batch=2, rows=24, cols=32, heads=2, kv_heads=1, head_dim=32,
              rate=0.5, shared=shared, scale=0.2, xla_blocks=xla.BlockSizes(q=5, k=32))
  q, k, _, _, _, _ = case.arrays()
  v = jnp.broadcast_to(jnp.eye(case.cols)[None, :, None, :],
                       (case.batch, case.cols, case.kv_heads, case.cols))
  fn = _attention_fn(implementation, case)
  dropped = jax.jit(lambda q, k, v: fn(q, k, v, None, None, KEY_DATA, None, case.config()))
  plain = jax.jit(lambda q, k, v: base.reference(
      q, k, v, None, None, None, None, case.config()._replace(fixed_rate=0.0)))
  out = np.asarray(dropped(q, k, v)).transpose(0, 2, 1, 3)  # [B, T, N, S] -> [B, N, T, S]
  mask_shape = (1, 1) if shared else (case.batch, case.heads)
  keep = np.broadcast_to(attention_keep_mask(KEY, (*mask_shape, case.rows, case.cols), 0.5),
                         out.shape)
  np.testing.assert_array_equal(out != 0, keep)
  scale = 256 / (256 - round(case.rate * 256))  # The test's own c.
  expected = np.where(keep, np.asarray(plain(q, k, v)).transpose(0, 2, 1, 3) * scale, 0)
  assert_close(out, expected, FLOAT32_TOL)

