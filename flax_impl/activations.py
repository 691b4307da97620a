"""Activations used by the adapters (SpeechBrain's ``Swish``), for Flax NNX."""

from __future__ import annotations

import jax
from flax import nnx

__all__ = ["Swish"]


class Swish(nnx.Module):
    """Swish activation, ``silu(beta * x)`` (https://arxiv.org/abs/2005.03191).

    The twin of ``torch_impl.Swish``: no parameters, the same ``beta``.

    Arguments
    ---------
    beta: float
        Multiplies the input before the SiLU.

    Example
    -------
    >>> import jax.numpy as jnp
    >>> act = Swish(beta=2.0)
    >>> x = jnp.array([-1.0, 0.0, 1.0])
    >>> bool(jnp.allclose(act(x), nnx.silu(2.0 * x)))
    True
    """

    def __init__(self, beta: float = 1.0) -> None:
        self.beta = beta

    def __call__(self, x: jax.Array) -> jax.Array:
        """Return ``silu(beta * x)``; the multiply is skipped when ``beta == 1``."""
        if self.beta != 1:
            x = x * self.beta
        return nnx.silu(x)
