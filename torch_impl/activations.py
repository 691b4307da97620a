"""Activations used by the adapters (SpeechBrain's ``Swish``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Swish"]


class Swish(nn.Module):
    """Swish activation, ``silu(beta * x)`` (https://arxiv.org/abs/2005.03191).

    Same attributes and ``state_dict`` as ``speechbrain.nnet.activations.Swish``.

    Arguments
    ---------
    beta: float
        Multiplies the input before the SiLU.

    Example
    -------
    >>> act = Swish(beta=2.0)
    >>> x = torch.tensor([-1.0, 0.0, 1.0])
    >>> torch.allclose(act(x), torch.nn.functional.silu(2.0 * x))
    True
    """

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta
        self.silu = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``silu(beta * x)``; the multiply is skipped when ``beta == 1``."""
        if self.beta != 1:
            x = x * self.beta
        return self.silu(x)
