"""ggr_jax: gradient-level control for semi-supervised learning in JAX.

The core is :func:`rectify`, Geometric Gradient Rectification (arXiv 2606.26973) as
an optax gradient transformation; :mod:`ggr_jax.geometry` holds the pure pytree math.
"""

from ggr_jax import geometry
from ggr_jax.interop import RectifiedTrainState
from ggr_jax.rectify import (
    MODES,
    RectifyState,
    combine,
    rectify,
    scope_from_prefix,
)

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "RectifiedTrainState",
    "RectifyState",
    "combine",
    "geometry",
    "rectify",
    "scope_from_prefix",
]
