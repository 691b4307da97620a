"""The Houlsby bottleneck adapter on an ``nn.Linear`` (SpeechBrain's ``HoulsbyAdapterLinear``)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from twinformat.adapters import HOULSBY, AdapterKind

from ._factors import check_size, factory_kwargs
from .activations import Swish

__all__ = ["HoulsbyAdapterLinear"]


class HoulsbyAdapterLinear(nn.Module):
    """Houlsby adapter on a Linear layer: 'Parameter-Efficient Transfer Learning for NLP'
    (https://arxiv.org/abs/1902.00751).

    ``h = pretrained_linear(x)``; output ``up(activation(down(h))) + h``. Projection biases
    start at zero, weights at PyTorch's default init. The wrapped linear is frozen.

    Arguments
    ---------
    target_linear: nn.Linear
        The pretrained Linear that this adapter wraps.
    projection_size: int
        Size of the bottleneck projection (usually small), at least 1.
    activation: class
        The activation class, instantiated with no arguments. Default: Swish.
    bias: bool
        Whether the projections have biases.

    Example
    -------
    >>> x = torch.rand((8, 60, 64))
    >>> base_linear = nn.Linear(64, 64)
    >>> adapt = HoulsbyAdapterLinear(base_linear, 8)
    >>> output = adapt(x)
    >>> output.shape
    torch.Size([8, 60, 64])
    """

    adapter_kind: ClassVar[AdapterKind] = HOULSBY

    def __init__(
        self,
        target_linear: nn.Linear,
        projection_size: int,
        activation: type[nn.Module] = Swish,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(target_linear, nn.Linear):
            raise ValueError(
                f"HoulsbyLinear currently only supports linear layers, but instead got {type(target_linear)}."
            )
        check_size("projection_size", projection_size)
        output_size = target_linear.weight.shape[0]
        factory = factory_kwargs(target_linear)

        self.pretrained_linear = target_linear
        for param in self.pretrained_linear.parameters():
            param.requires_grad = False
        self.adapter_down_proj = nn.Linear(output_size, projection_size, bias=bias, **factory)
        self.adapter_up_proj = nn.Linear(projection_size, output_size, bias=bias, **factory)
        self.activation = activation()

        if bias:
            with torch.no_grad():
                self.adapter_down_proj.bias.zero_()
                self.adapter_up_proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the adapter to ``x`` of shape ``[..., in_features]``."""
        x_pretrained = self.pretrained_linear(x)
        if not self.__dict__.get("_enabled", True):  # AdaptedModel.set_adapter left it out
            return x_pretrained
        return self.adapter_up_proj(self.activation(self.adapter_down_proj(x_pretrained))) + x_pretrained

    def set_active(self, names: tuple[str, ...]) -> None:
        """On when ``'default'`` is among ``names`` (a Houlsby adapter is always the model's
        default adapter), off otherwise: the pretrained layer's output alone."""
        self._enabled = "default" in names
