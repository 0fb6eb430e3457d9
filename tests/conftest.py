"""Shared test setup: warnings are errors (pyproject), plus the helpers here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

# Statistical tests allow this many standard deviations: a correct
# implementation fails one given check about once in 16,000 runs, and the keys
# are fixed, so a pass is reproducible.
K_SIGMA = 4.0


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def use_jit(request):
  """Runs a test body eagerly and under ``jax.jit`` (jax's ``use_jit``)."""
  return request.param


def maybe_jit(fn, use_jit, **kwargs):
  return jax.jit(fn, **kwargs) if use_jit else fn


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


def assert_binomial_fraction(kept: int, n: int, p: float, k: float = K_SIGMA):
  """|kept/n - p| <= k·sqrt(p(1-p)/n): a binomial count's k-sigma bound."""
  sigma = np.sqrt(p * (1 - p) / n)
  assert abs(kept / n - p) <= k * sigma, (kept, n, p, k * sigma)
