"""jaxdrop: fast, reproducible dropout for JAX and Flax.

Masks come from a counter-based hash that XLA fuses into the elementwise op,
bit-identical to ``jax.random.bits`` thresholds, the same on any number of
devices, with an exact keep probability. This page lists the whole public API.

``linen``, ``nnx``, ``checks`` and ``schedules`` load on first use, so that
``import jaxdrop`` does not import flax, chex and optax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from jaxdrop import mc as mc
from jaxdrop._attention.api import dot_product_attention as dot_product_attention
from jaxdrop._attention.ring import ring_attention as ring_attention
from jaxdrop._attention.ring import zigzag_permutation as zigzag_permutation
from jaxdrop._dropout import CHECKPOINT_NAME as CHECKPOINT_NAME
from jaxdrop._dropout import dropout as dropout
from jaxdrop._dropout import relu_dropout as relu_dropout
from jaxdrop._masks import attention_keep_mask as attention_keep_mask
from jaxdrop._masks import keep_mask as keep_mask
from jaxdrop._masks import keep_probability as keep_probability
from jaxdrop._variants import alpha_dropout as alpha_dropout
from jaxdrop._variants import drop_path as drop_path
from jaxdrop._variants import drop_path_rates as drop_path_rates
from jaxdrop._variants import dropconnect as dropconnect
from jaxdrop._variants import dropconnect_dense as dropconnect_dense
from jaxdrop._variants import gaussian_dropout as gaussian_dropout
from jaxdrop._variants import spatial_dropout as spatial_dropout

if TYPE_CHECKING:
  from jaxdrop import checks as checks
  from jaxdrop import linen as linen
  from jaxdrop import nnx as nnx
  from jaxdrop import schedules as schedules

__version__ = "0.1.0"

__all__ = [
    "CHECKPOINT_NAME",
    "alpha_dropout",
    "attention_keep_mask",
    "checks",
    "drop_path",
    "drop_path_rates",
    "dropconnect",
    "dropconnect_dense",
    "dot_product_attention",
    "dropout",
    "gaussian_dropout",
    "keep_mask",
    "keep_probability",
    "linen",
    "mc",
    "nnx",
    "relu_dropout",
    "ring_attention",
    "schedules",
    "spatial_dropout",
    "zigzag_permutation",
]

_LAZY_SUBMODULES = ("checks", "linen", "nnx", "schedules")


def __getattr__(name: str) -> Any:
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f"jaxdrop.{name}")  # Also sets the attribute.
  raise AttributeError(f"module 'jaxdrop' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
