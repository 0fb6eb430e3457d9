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
from jaxdrop._variants import alpha_dropout as alpha_dropout
from jaxdrop._variants import drop_path as drop_path
from jaxdrop._variants import drop_path_rates as drop_path_rates
from jaxdrop._variants import dropconnect as dropconnect
from jaxdrop._variants import gaussian_dropout as gaussian_dropout
from jaxdrop._variants import spatial_dropout as spatial_dropout

__version__ = "0.1.0"

__all__ = [
    "alpha_dropout",
    "checks",
    "drop_path",
    "drop_path_rates",
    "dropconnect",
    "dropout",
    "gaussian_dropout",
    "keep_mask",
    "linen",
    "mc",
    "nnx",
    "schedules",
    "spatial_dropout",
]
