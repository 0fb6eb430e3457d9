"""What only the Pallas (Triton) attention kernels do, run in the Pallas interpreter on CPU.

A NaN bias, forward mode, a traced rate, the lowering to Triton for "cuda", the launch
options, and the choice of implementation. Their outputs, gradients and dropout bits against
the reference, on every case, are test_attention_suite.py's.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import FAST_COMPILE, KEY_DATA, PALLAS_BLOCKS, assert_close
from conftest import cuda_lowering

import jaxdrop
from jaxdrop._attention import base
from jaxdrop._attention import pallas_triton as pt

BLOCKS = PALLAS_BLOCKS


def _inputs(seed, batch, rows, cols, heads, kv_heads, head_dim, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, rows, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, cols, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, cols, kv_heads, head_dim), dtype)
  d_out = jax.random.normal(keys[3], (batch, rows, heads, head_dim), jnp.float32)
  return q, k, v, d_out


def _value_and_grads(fn, config, mask, key_data, d_out, **kwargs):
  """jit(q, k, v, bias, rate) -> (out, (dq, dk, dv, dbias)) of sum(out * d_out)."""

  def run(q, k, v, bias, rate):
    def loss(q, k, v, bias):
      out = fn(q, k, v, bias, mask, key_data, rate, config, **kwargs)
      return jnp.sum(out.astype(jnp.float32) * d_out), out

    grads, out = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, bias)
    return out, grads

  return _jit(run)




def _jit(fn, **kwargs):
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


# ----------------------------------------------------------------------------
# What only the kernels do. Their outputs, gradients and mask bits against the
# reference, case by case, are test_attention_suite.py's.


def test_nan_bias_makes_its_row_nan_even_where_dropout_drops_it():
  """On a GPU the kernels' max ignores NaN (Triton's maxnumf), so only the NaN softmax sum
  carries it into a row whose NaN weight dropout drops; the interpreter's max propagates it."""
  batch, rows, cols, heads, kv_heads, head_dim = 1, 16, 32, 2, 1, 16
  q, k, v, _ = _inputs(5, batch, rows, cols, heads, kv_heads, head_dim)
  bias = jnp.zeros((1, heads, rows, cols)).at[0, 0, :, 3].set(jnp.nan)
  config = base.Config(scale=0.25, is_causal=False, dropout_heads=(batch, heads), fixed_rate=0.5)
  run = _jit(lambda q, k, v, bias: pt.attention(
      q, k, v, bias, None, KEY_DATA, None, config, blocks=BLOCKS, interpret=True))
  out = np.asarray(run(q, k, v, bias))
  keep = np.asarray(jaxdrop.attention_keep_mask(jax.random.wrap_key_data(KEY_DATA),
                                                (batch, heads, rows, cols), 0.5))
  assert not keep[0, 0, :, 3].all()  # some rows drop the NaN weight
  assert np.all(np.isnan(out[:, :, 0]))
  assert np.all(np.isfinite(out[:, :, 1]))


def test_forward_mode_is_jaxs_named_custom_vjp_error():
  q, k, v, _ = _inputs(6, 1, 16, 16, 1, 1, 16)
  config = base.Config(scale=0.25, is_causal=False, dropout_heads=(1, 1), fixed_rate=0.2)
  f = lambda q: pt.attention(q, k, v, None, None, KEY_DATA, None, config, blocks=BLOCKS,
                             interpret=True)
  with pytest.raises(TypeError, match=r"forward-mode autodiff \(jvp\) to a custom_vjp"):
    _jit(lambda q: jax.jvp(f, (q,), (q,)))(q)


# ----------------------------------------------------------------------------
# Traced rates.


@pytest.fixture(scope="module")
def traced_rate_run():
  batch, rows, cols, heads, kv_heads, head_dim = 1, 16, 16, 2, 1, 16
  q, k, v, d_out = _inputs(4, batch, rows, cols, heads, kv_heads, head_dim)
  config = base.Config(scale=0.25, is_causal=False, dropout_heads=(batch, heads), fixed_rate=None)
  traces = []

  def counted(*args, **kwargs):
    traces.append(1)
    return pt.attention(*args, **kwargs)

  run = _value_and_grads(counted, config, None, KEY_DATA, d_out, blocks=BLOCKS, interpret=True)
  fixed = base.Config(scale=0.25, is_causal=False, dropout_heads=(batch, heads), fixed_rate=0.25)
  reference = _value_and_grads(base.reference, fixed, None, KEY_DATA, d_out)
  return (q, k, v), run, reference(q, k, v, None, None), traces


def test_traced_rate_matches_static_rate_without_retracing(traced_rate_run):
  (q, k, v), run, (want_out, want_grads), traces = traced_rate_run
  out, grads = run(q, k, v, None, jnp.float32(0.25))
  assert_close(out, want_out, 2e-5)
  for got, want in zip(grads[:3], want_grads[:3]):
    assert_close(got, want, 2e-5)
  out_one, grads_one = run(q, k, v, None, jnp.float32(1.0))
  np.testing.assert_array_equal(np.asarray(out_one), 0)
  for g in grads_one[:3]:
    np.testing.assert_array_equal(np.asarray(g), 0)
  out_bad, _ = run(q, k, v, None, jnp.float32(1.5))
  assert np.all(np.isnan(np.asarray(out_bad)))
  assert len(traces) == 1


# ----------------------------------------------------------------------------
# Triton lowering, without a GPU: Pallas lowers every kernel to Triton IR on
# any host (jax.export does the same). This catches primitives without a
# Triton rule and non-power-of-two tiles; Triton's own compiler passes need
# the CUDA plugin (benchmarks/aot_gpu.py compiles for an H100 without one).


@pytest.mark.parametrize(
    "dtype, head_dim, causal, with_bias, shared, rate",
    [
        (jnp.bfloat16, 64, True, True, False, 0.1),
        (jnp.float32, 128, False, False, True, None),
        # Triton's arrays are powers of two: H 24 lowers only because it is padded to 32.
        (jnp.bfloat16, 24, False, False, False, 0.1),
    ],
    ids=["bf16-h64-causal-bias", "f32-h128-shared-traced", "bf16-h24-padded"],
)
def test_kernels_lower_to_triton_for_cuda(dtype, head_dim, causal, with_bias, shared, rate):
  batch, rows, cols, heads, kv_heads = 2, 300, 200, 4, 2
  q = jax.ShapeDtypeStruct((batch, rows, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, cols, kv_heads, head_dim), dtype)
  bias = jax.ShapeDtypeStruct((1, heads, rows, cols), dtype) if with_bias else None
  mask = jax.ShapeDtypeStruct((batch, 1, 1, cols), jnp.bool_)
  config = base.Config(scale=0.125, is_causal=causal,
                       dropout_heads=(1, 1) if shared else (batch, heads), fixed_rate=rate)

  def grads(q, k, v, bias, mask, key_data, rate):
    def loss(q, k, v, bias):
      out = pt.attention(q, k, v, bias, mask, key_data, rate, config)
      return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2, 3) if with_bias else (0, 1, 2))(q, k, v, bias)

  rate_arg = None if rate is not None else jax.ShapeDtypeStruct((), jnp.float32)
  key_data = jax.ShapeDtypeStruct((2,), jnp.uint32)
  with cuda_lowering():
    lowered = jax.jit(grads).trace(q, kv, kv, bias, mask, key_data, rate_arg).lower(
        lowering_platforms=("cuda",))
  # forward, dq, dk/dv, and dbias with a bias.
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == (4 if with_bias else 3)


# ----------------------------------------------------------------------------
# Argument checks.


def _struct(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


CONFIG = base.Config(scale=1.0, is_causal=False, dropout_heads=(1, 1), fixed_rate=0.1)


@pytest.mark.parametrize("head_dim, padded", [(1, 16), (16, 16), (17, 32), (24, 32), (96, 128),
                                             (128, 128), (129, 256), (256, 256)])
def test_head_dim_is_padded_to_a_power_of_two_of_at_least_16(head_dim, padded):
  assert pt.padded_head_dim(head_dim) == padded


def test_unsupported_reason_accepts_the_covered_cases():
  for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
    for head_dim in (1, 24, 64, 96, 128, 256):
      q = _struct((2, 100, 8, head_dim), dtype)
      kv = _struct((2, 60, 2, head_dim), dtype)
      bias = _struct((1, 8, 100, 60), dtype)
      mask = _struct((2, 1, 1, 60), jnp.bool_)
      assert pt.unsupported_reason(q, kv, kv, bias, mask, CONFIG, platform="gpu") is None


@pytest.mark.parametrize(
    "q_shape, dtype, platform, words",
    [
        ((1, 8, 2, 64), jnp.float32, "cpu", "platform='cpu'"),
        ((1, 8, 2, 64), jnp.float32, "tpu", "platform='tpu'"),
        ((1, 8, 2, 257), jnp.float32, "gpu", "H=257"),
        ((1, 8, 2, 512), jnp.float32, "gpu", "H=512"),
        ((1, 8, 2, 64), jnp.int32, "gpu", "query.dtype=int32"),
    ],
)
def test_unsupported_reason_names_the_argument(q_shape, dtype, platform, words):
  q = _struct(q_shape, dtype)
  kv = _struct((1, 8, 2, q_shape[-1]), dtype)
  reason = pt.unsupported_reason(q, kv, kv, None, None, CONFIG, platform=platform)
  assert reason is not None and words in reason


def test_attention_raises_for_unsupported_and_bad_options():
  q = jnp.zeros((1, 8, 2, 512))
  with pytest.raises(ValueError, match="H=512"):
    pt.attention(q, q, q, None, None, KEY_DATA, None, CONFIG, interpret=True)
  q = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(ValueError, match=r"blocks.k_dq=24"):
    pt.attention(q, q, q, None, None, KEY_DATA, None, CONFIG, interpret=True,
                 blocks=pt.BlockSizes(k_dq=24))
  with pytest.raises(TypeError, match="blocks"):
    pt.attention(q, q, q, None, None, KEY_DATA, None, CONFIG, interpret=True, blocks=(16, 16))


# ----------------------------------------------------------------------------
# Choosing the kernels: implementation=None, and the launch options' defaults.


def _replace_runs(monkeypatch, run_for) -> None:
  """Replaces each implementation's ``run`` in the registry by ``run_for(name)``."""
  from jaxdrop._attention import api

  for name, implementation in list(api.IMPLEMENTATIONS.items()):
    monkeypatch.setitem(
        api.IMPLEMENTATIONS, name, dataclasses.replace(implementation, run=run_for(name)))


def _record_runs(monkeypatch) -> list[str]:
  """What each call asks the registry to run, without running it (the runs return q)."""
  chosen = []

  def run_for(name):
    def run(q, *args):
      chosen.append(name)
      return q
    return run

  _replace_runs(monkeypatch, run_for)
  return chosen


@pytest.fixture
def on_gpu(monkeypatch):
  """Makes the backend look like a GPU whose platform version is the given one."""
  from jaxdrop._attention import api

  def set_platform(version: str) -> list[str]:
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(api.jax_backend, "get_backend",
                        lambda: type("Backend", (), {"platform_version": version})())
    return _record_runs(monkeypatch)  # no GPU here to run them

  return set_platform


@pytest.mark.parametrize(
    "version, head_dim, implementation, expected",
    [
        ("cuda 12080", 64, None, "pallas"),
        ("CUDA 13.0", 96, None, "pallas"),  # padded to 128
        ("cuda 12080", 512, None, "xla"),  # unsupported: silently the blockwise path
        ("rocm 6.2", 64, None, "xla"),  # the kernels are measured on NVIDIA GPUs only
        ("cuda 12080", 64, "xla", "xla"),
        ("cuda 12080", 64, "reference", "reference"),
    ],
)
def test_none_picks_pallas_on_nvidia_gpus_where_it_is_supported(
    on_gpu, version, head_dim, implementation, expected):
  chosen = on_gpu(version)
  q = jnp.zeros((1, 8, 2, head_dim), jnp.bfloat16)
  jaxdrop.dot_product_attention(q, q, q, dropout_rate=0.1, dropout_key=jax.random.key(0),
                                implementation=implementation)
  assert chosen == [expected]


def test_none_picks_xla_off_gpus(monkeypatch):
  chosen = _record_runs(monkeypatch)
  q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  jaxdrop.dot_product_attention(q, q, q, dropout_rate=0.1, dropout_key=jax.random.key(0))
  assert chosen == ["xla"]


@pytest.mark.parametrize(
    "version, length, precision, expected",
    [
        # CPU: "xla" from T * S = 1024 * 1024, where it was measured faster (docs/attention.md).
        (None, 1024, None, "xla"),
        (None, 1023, None, "jax.nn"),
        (None, 8, None, "jax.nn"),
        ("cuda 12080", 1024, None, "jax.nn"),  # cuDNN where it applies
        ("rocm 6.2", 1024, None, "jax.nn"),
        (None, 8, jax.lax.Precision.HIGHEST, "xla"),  # jax.nn takes no precision
        ("cuda 12080", 8, jax.lax.Precision.HIGHEST, "xla"),
    ],
)
@pytest.mark.parametrize("off", ["rate-0", "deterministic"])
def test_none_without_dropout_picks_per_backend_and_size(on_gpu, monkeypatch, version, length,
                                                         precision, expected, off):
  chosen = on_gpu(version) if version else _record_runs(monkeypatch)
  q = jnp.zeros((1, length, 2, 64), jnp.bfloat16)
  kv = jnp.zeros((1, 1024, 2, 64), jnp.bfloat16)
  kwargs = dict(dropout_rate=0.0) if off == "rate-0" else dict(
      dropout_rate=0.1, deterministic=True)
  jaxdrop.dot_product_attention(q, kv, kv, precision=precision, **kwargs)
  assert chosen == [expected]


def test_explicit_pallas_on_an_unsupported_gpu_call_names_the_argument(on_gpu):
  on_gpu("cuda 12080")
  q = jnp.zeros((1, 8, 2, 512), jnp.float32)
  with pytest.raises(ValueError, match="H=512"):
    jaxdrop.dot_product_attention(q, q, q, dropout_rate=0.1, dropout_key=jax.random.key(0),
                                  implementation="pallas")


@pytest.mark.parametrize("implementation", [None, "pallas"])
@pytest.mark.parametrize(
    "q_shape, kv_shape",
    [((0, 8, 2, 64), (0, 8, 2, 64)), ((1, 8, 0, 64), (1, 8, 0, 64)), ((1, 0, 2, 64), (1, 8, 2, 64)),
     ((1, 8, 2, 64), (1, 0, 2, 64)), ((1, 8, 2, 0), (1, 8, 2, 0))],
    ids=["B", "N_and_K", "T", "S", "H"],
)
def test_zero_sizes_on_a_gpu_give_zeros_without_the_kernels(
    on_gpu, implementation, q_shape, kv_shape):
  chosen = on_gpu("cuda 12080")
  q, kv = jnp.ones(q_shape, jnp.bfloat16), jnp.ones(kv_shape, jnp.bfloat16)
  out = jaxdrop.dot_product_attention(q, kv, kv, dropout_rate=0.1, dropout_key=jax.random.key(0),
                                      implementation=implementation)
  np.testing.assert_array_equal(out, jnp.zeros(q_shape))
  assert chosen == []


@pytest.fixture
def without_jax_triton(monkeypatch):
  """Makes ``import jax.experimental.pallas.triton`` fail, as once jax drops the backend."""
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)


def test_without_jax_triton_none_picks_xla_and_pallas_is_named(on_gpu, without_jax_triton):
  chosen = on_gpu("cuda 12080")
  q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  kwargs = dict(dropout_rate=0.1, dropout_key=jax.random.key(0))
  jaxdrop.dot_product_attention(q, q, q, **kwargs)
  assert chosen == ["xla"]
  with pytest.raises(ValueError, match=r"'pallas' needs jax.experimental.pallas.triton"):
    jaxdrop.dot_product_attention(q, q, q, implementation="pallas", **kwargs)


JAX_TRITON_DEPRECATION = (
    "The Pallas Triton backend is deprecated and will be removed in a future JAX version. To keep "
    "using Pallas on GPU, please migrate to the Mosaic GPU backend."
)


def _warn_when_lowering(monkeypatch, message: str) -> None:
  """Makes every implementation warn ``message`` as jax >= 0.11 does when it lowers Triton
  kernels (while it is traced, which jit caches: a call that hits the cache does not warn)."""

  def run_for(name):
    def run(q, *args):
      warnings.warn(message, DeprecationWarning, stacklevel=2)
      return q
    return run

  _replace_runs(monkeypatch, run_for)


def test_triton_deprecation_is_ignored_only_while_jaxdrop_lowers_its_kernels(
    on_gpu, monkeypatch):
  on_gpu("cuda 12080")
  _warn_when_lowering(monkeypatch, JAX_TRITON_DEPRECATION)
  q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  kwargs = dict(dropout_rate=0.1, dropout_key=jax.random.key(0))
  filters = list(warnings.filters)
  jaxdrop.dot_product_attention(q, q, q, **kwargs)  # "pallas": no warning
  assert warnings.filters == filters
  with pytest.raises(DeprecationWarning, match="Pallas Triton backend is deprecated"):
    jaxdrop.dot_product_attention(q, q, q, implementation="xla", **kwargs)
  _warn_when_lowering(monkeypatch, "another deprecation")
  with pytest.raises(DeprecationWarning, match="another deprecation"):
    jaxdrop.dot_product_attention(q, q, q, implementation="pallas", **kwargs)


@pytest.mark.parametrize(
    "dtype, head_dim, blocks, warps, stages",
    [
        # The defaults: 64 x 64 tiles, 4 warps up to H 128, 3 stages while a
        # (64, H) operand block is at most 16 KiB.
        (jnp.bfloat16, 64, None, 4, 3),
        (jnp.bfloat16, 128, None, 4, 3),
        (jnp.float32, 64, None, 4, 3),
        (jnp.float32, 128, None, 4, 2),
        (jnp.bfloat16, 256, None, 8, 2),
        (jnp.bfloat16, 64, pt.BlockSizes(q=128, k=128), 8, 3),
        (jnp.bfloat16, 128, pt.BlockSizes(q=128, k=128), 8, 2),
        (jnp.bfloat16, 64, pt.BlockSizes(num_warps=2, num_stages=1), 2, 1),  # as given
    ],
)
def test_launch_options(dtype, head_dim, blocks, warps, stages):
  q = jnp.zeros((1, 256, 2, head_dim), dtype)
  st, _ = pt.prepare(q, q, q, None, None, KEY_DATA, None, CONFIG, blocks)
  params = st.compiler_params(st.blocks.q, st.blocks.k)
  assert (params.num_warps, params.num_stages) == (warps, stages)
