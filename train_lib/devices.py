"""Data parallelism: a one-axis mesh, global batches from host arrays, several hosts."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when the multi-host environment is set.

  Set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID
  on every host (or only JAX_COORDINATOR_ADDRESS on a cluster that JAX
  detects, such as SLURM or Open MPI). Each process generates the same data
  and feeds its devices' shards of every batch.
  """
  if not os.environ.get("JAX_COORDINATOR_ADDRESS") or jax.distributed.is_initialized():
    return
  env = {
      "num_processes": os.environ.get("JAX_NUM_PROCESSES"),
      "process_id": os.environ.get("JAX_PROCESS_ID"),
  }
  jax.distributed.initialize(**{k: int(v) for k, v in env.items() if v is not None})


def check_device_count(devices: int, batch_size: int) -> None:
  """ValueError unless `devices` exist and split `batch_size` evenly."""
  available = jax.devices()
  if devices > len(available):
    raise ValueError(
        f"--devices {devices} asks for more devices than the {len(available)} available "
        f"({available[0].platform}); on CPU, simulate more with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}"
    )
  if batch_size % devices:
    raise ValueError(f"--batch-size {batch_size} must be divisible by --devices {devices}")


def make_mesh(devices: int) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("data",))


def put(x: np.ndarray, mesh: jax.sharding.Mesh, spec: P) -> jax.Array:
  """A global array from a host array that every process holds in full."""
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
