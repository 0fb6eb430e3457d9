"""Shared test setup: warnings are errors (pyproject), the fixtures and helpers here.

The oracles the tests compare with live in ``oracles.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdrop

# ----------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def use_jit(request):
  """Runs a test body eagerly and under ``jax.jit`` (jax's ``use_jit``)."""
  return request.param


def maybe_jit(fn, use_jit, **kwargs):
  return jax.jit(fn, **kwargs) if use_jit else fn


@pytest.fixture
def strict_promotion():
  """No implicit dtype or rank promotion may hide in the library (equinox).

  Use it with ``pytestmark = pytest.mark.usefixtures("strict_promotion")``.
  """
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    yield


@contextlib.contextmanager
def cuda_lowering():
  """Lowering Pallas kernels for "cuda" on a host without a GPU.

  jax >= 0.11 asks which GPU the Triton kernels are for (an abstract device
  answers: an H100) and warns that its Pallas Triton backend is deprecated in
  favour of Mosaic GPU; the warning is expected here, not an error. jax 0.8's
  abstract devices have no platform, and its lowering asks for none.
  """
  scope = contextlib.nullcontext()
  if "platform" in inspect.signature(jax.sharding.AbstractDevice).parameters:
    device = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    scope = jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
        (1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=device))
  with warnings.catch_warnings(), scope:
    warnings.filterwarnings(
        "ignore", "The Pallas Triton backend is deprecated", DeprecationWarning)
    yield


def run_with_devices(code: str, devices: int = 8, timeout: float = 240) -> str:
  """Runs ``code`` in a fresh Python with ``devices`` simulated CPU devices.

  The device count is fixed when JAX starts, so it needs its own process.
  Returns stdout; fails the test with stderr if the process fails.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  result = subprocess.run(
      [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
      capture_output=True,
      text=True,
      env=env,
      timeout=timeout,
  )
  if result.returncode != 0:
    pytest.fail(f"subprocess failed:\n{result.stdout}\n{result.stderr}")
  return result.stdout


# ----------------------------------------------------------------------------
# One table of every module, linen and nnx alike, with the pure function each
# must equal for the same key.

MODULE_RATE = 0.4
MODULE_X = jnp.asarray(np.random.default_rng(1).standard_normal((8, 4, 4, 16), np.float32))


class ModuleCase(NamedTuple):
  linen: Callable[..., nn.Module]  # linen(rate, **fields) -> module
  nnx: Callable[..., nnx.Module]  # nnx(rate, rngs, **kwargs) -> module
  # function(key, x, rate, params, deterministic): what the module must
  # compute, with params {'kernel': ..., 'bias': ...} for DropConnect, else {}.
  function: Callable[..., jax.Array]


def _dense_with_dropped_kernel(key, x, rate, params, deterministic):
  """flax's own Dense, run on the kernel that jaxdrop.dropconnect drops."""
  kernel = jaxdrop.dropconnect(key, params["kernel"], rate, deterministic)
  dense = nn.Dense(kernel.shape[1])
  return dense.apply({"params": {"kernel": kernel, "bias": params["bias"]}}, x)


MODULES: dict[str, ModuleCase] = {
    "Dropout": ModuleCase(
        lambda r, **kw: jaxdrop.linen.Dropout(r, **kw),
        lambda r, rngs, **kw: jaxdrop.nnx.Dropout(r, rngs=rngs, **kw),
        lambda k, x, r, p, d: jaxdrop.dropout(k, x, r, d),
    ),
    "Dropout_broadcast": ModuleCase(
        lambda r, **kw: jaxdrop.linen.Dropout(r, broadcast_dims=(1, 2), **kw),
        lambda r, rngs, **kw: jaxdrop.nnx.Dropout(r, broadcast_dims=(1, 2), rngs=rngs, **kw),
        lambda k, x, r, p, d: jaxdrop.dropout(k, x, r, d, broadcast_dims=(1, 2)),
    ),
    "Dropout_bits16": ModuleCase(
        lambda r, **kw: jaxdrop.linen.Dropout(r, bits=16, **kw),
        lambda r, rngs, **kw: jaxdrop.nnx.Dropout(r, bits=16, rngs=rngs, **kw),
        lambda k, x, r, p, d: jaxdrop.dropout(k, x, r, d, bits=16),
    ),
    "ReluDropout": ModuleCase(
        lambda r, **kw: jaxdrop.linen.ReluDropout(r, **kw),
        lambda r, rngs, **kw: jaxdrop.nnx.ReluDropout(r, rngs=rngs, **kw),
        lambda k, x, r, p, d: jaxdrop.relu_dropout(k, x, r, d),
    ),
    "SpatialDropout": ModuleCase(
        lambda r, **kw: jaxdrop.linen.SpatialDropout(r, channel_axis=1, **kw),
        lambda r, rngs, **kw: jaxdrop.nnx.SpatialDropout(r, channel_axis=1, rngs=rngs, **kw),
        lambda k, x, r, p, d: jaxdrop.spatial_dropout(k, x, r, d, channel_axis=1),
    ),
    "AlphaDropout": ModuleCase(
        lambda r, **kw: jaxdrop.linen.AlphaDropout(r, **kw),
        lambda r, rngs, **kw: jaxdrop.nnx.AlphaDropout(r, rngs=rngs, **kw),
        lambda k, x, r, p, d: jaxdrop.alpha_dropout(k, x, r, d),
    ),
    "GaussianDropout": ModuleCase(
        lambda r, **kw: jaxdrop.linen.GaussianDropout(r, **kw),
        lambda r, rngs, **kw: jaxdrop.nnx.GaussianDropout(r, rngs=rngs, **kw),
        lambda k, x, r, p, d: jaxdrop.gaussian_dropout(k, x, r, d),
    ),
    "DropPath": ModuleCase(
        lambda r, **kw: jaxdrop.linen.DropPath(r, batch_axis=1, **kw),
        lambda r, rngs, **kw: jaxdrop.nnx.DropPath(r, batch_axis=1, rngs=rngs, **kw),
        lambda k, x, r, p, d: jaxdrop.drop_path(k, x, r, d, batch_axis=1),
    ),
    "DropConnect": ModuleCase(
        lambda r, **kw: jaxdrop.linen.DropConnectDense(8, r, **kw),
        lambda r, rngs, **kw: jaxdrop.nnx.DropConnectLinear(16, 8, r, rngs=rngs, **kw),
        _dense_with_dropped_kernel,
    ),
}


def module_params(module: Any) -> dict[str, jax.Array]:
  """An nnx module's parameters as a plain dict ({} when it has none)."""
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


# Tests of the scripts under benchmarks/, which are not part of the package: the
# lowest-versions CI environment leaves them out (`-m "not scripts"`, .ci/run).
SCRIPT_TESTS = ("test_bench.py", "test_pallas_dropout.py",
                "test_report.py")


def pytest_collection_modifyitems(items):
  for item in items:
    if item.path.name in SCRIPT_TESTS:
      item.add_marker(pytest.mark.scripts)


@pytest.fixture(scope="session")
def import_benchmark():
  """``import_benchmark(name)``: the script ``benchmarks/<name>.py``, imported as a module
  (benchmarks/ is a folder of scripts, not a package)."""
  folder = str(Path(__file__).resolve().parents[1] / "benchmarks")

  def load(name: str):
    sys.path.insert(0, folder)
    try:
      return importlib.import_module(name)
    finally:
      sys.path.remove(folder)

  return load
