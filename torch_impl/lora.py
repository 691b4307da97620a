"""LoRA on an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (SpeechBrain's ``LoRA``), with merging."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from interchange.adapters import LORA, AdapterKind
from interchange.errors import AdapterInsertionError

from . import fused
from ._factors import check_size, factory_kwargs

__all__ = ["LoRA"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoRA(nn.Module):
    """LoRA adapter: 'LoRA: Low-Rank Adaptation of Large Language Models'
    (https://arxiv.org/abs/2106.09685).

    Output: ``pretrained_module(x) + adapter_up_proj(adapter_down_proj(x)) * scaling`` with
    ``scaling = alpha / rank``. The up projection starts at zero, so a fresh adapter changes
    nothing. For ``nn.Conv1d/2d/3d`` the down projection copies the pretrained conv's geometry
    (kernel, stride, padding, dilation, padding_mode) and the up projection is pointwise.

    Arguments
    ---------
    target_module: nn.Linear or nn.Conv1d/2d/3d
        The pretrained layer this adapter wraps; it is frozen.
    rank: int
        Rank of the update (at least 1).
    alpha: float
        Scaling numerator: ``scaling = alpha / rank``.

    Example
    -------
    >>> x = torch.rand((8, 60, 64))
    >>> base_linear = nn.Linear(64, 64)
    >>> adapt = LoRA(base_linear, 64, 4)
    >>> output = adapt(x)
    >>> output.shape
    torch.Size([8, 60, 64])

    >>> x = torch.rand((8, 16, 100))
    >>> base_conv = nn.Conv1d(16, 32, kernel_size=3, stride=2)
    >>> adapt = LoRA(base_conv, rank=4)
    >>> adapt(x).shape == base_conv(x).shape
    True
    """

    adapter_kind: ClassVar[AdapterKind] = LORA

    def __init__(self, target_module: nn.Module, rank: int = 16, alpha: float = 1.0) -> None:
        super().__init__()
        if not isinstance(target_module, (nn.Linear, *_CONV_TYPES)):
            raise ValueError(
                f"LoRA supports nn.Linear and nn.Conv1d/2d/3d layers, but instead got {type(target_module)}."
            )
        check_size("rank", rank)
        if isinstance(target_module, _CONV_TYPES) and target_module.groups != 1:
            raise ValueError(
                "LoRA does not support convolutions with groups != 1, "
                f"got groups={target_module.groups} for {target_module}."
            )
        factory = factory_kwargs(target_module)

        self.pretrained_module = target_module
        for param in self.pretrained_module.parameters():
            param.requires_grad = False

        if isinstance(target_module, _CONV_TYPES):
            conv_cls = type(target_module)
            self.adapter_down_proj = conv_cls(
                target_module.in_channels,
                rank,
                kernel_size=target_module.kernel_size,
                stride=target_module.stride,
                padding=target_module.padding,
                dilation=target_module.dilation,
                padding_mode=target_module.padding_mode,
                bias=False,
                **factory,
            )
            self.adapter_up_proj = conv_cls(
                rank, target_module.out_channels, kernel_size=1, bias=False, **factory
            )
        else:
            output_size, input_size = target_module.weight.shape
            self.adapter_down_proj = nn.Linear(input_size, rank, bias=False, **factory)
            self.adapter_up_proj = nn.Linear(rank, output_size, bias=False, **factory)

        with torch.no_grad():
            self.adapter_up_proj.weight.zero_()
        self.scaling = alpha / rank
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the pretrained layer plus the scaled low-rank update.

        A frozen ``nn.Linear`` takes the fused path (:func:`torch_impl.fused.lora_linear`):
        the same function with fewer passes over ``x`` and no weight gradient for the frozen
        layer. Convs, hooked or unfrozen layers take the plain formula.
        """
        if self.merged:
            return self.pretrained_module(x)
        pretrained, down, up = self.pretrained_module, self.adapter_down_proj, self.adapter_up_proj
        if isinstance(pretrained, nn.Linear) and fused.can_fuse_linear(pretrained, down, up):
            return fused.lora_linear(
                x, pretrained.weight, pretrained.bias, down.weight, up.weight, self.scaling
            )
        x_pretrained = pretrained(x)
        x_lora = up(down(x)) * self.scaling
        return x_pretrained + x_lora

    def delta_weight(self) -> torch.Tensor:
        """``scaling * up @ down`` in the wrapped layer's weight layout (``(out, in, *k)``)."""
        up = self.adapter_up_proj.weight.float().flatten(1)  # (out, rank)
        down = self.adapter_down_proj.weight.float()  # (rank, in, *k)
        delta = (up @ down.flatten(1)).view(up.shape[0], *down.shape[1:])
        return delta * self.scaling

    def merge(self) -> None:
        """Fold the update into the wrapped weight, so inference costs the base layer's time."""
        if self.merged:
            raise AdapterInsertionError("this LoRA layer is already merged")
        self._add_to_weight(self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of the wrapped weight (inverse of :meth:`merge`)."""
        if not self.merged:
            raise AdapterInsertionError("this LoRA layer is not merged")
        self._add_to_weight(-self.delta_weight())
        self.merged = False

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        weight = self.pretrained_module.weight
        with torch.no_grad():
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
