"""jaxdrop: fast, reproducible dropout for JAX and Flax.

Masks come from a counter-based hash that XLA fuses into the elementwise op,
bit-identical to ``jax.random.bits`` thresholds, the same on any number of
devices, with an exact keep probability. This page lists the whole public API.
"""

from jaxdrop import checks as checks
from jaxdrop import linen as linen
from jaxdrop import mc as mc
from jaxdrop import nnx as nnx
from jaxdrop import schedules as schedules
from jaxdrop._dropout import dropout as dropout
from jaxdrop._dropout import keep_mask as keep_mask

__version__ = "0.1.0"

__all__ = [
    "checks",
    "dropout",
    "keep_mask",
    "linen",
    "mc",
    "nnx",
    "schedules",
]
