"""How adapter factors are created: size checks, and the device and dtype they live on."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["check_size", "factory_kwargs"]


def check_size(argument: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be an integer >= 1, got {value!r}")


def factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """New adapter weights live where the wrapped weight lives, in its dtype (SpeechBrain's
    adapters are always float32, which breaks a bf16 model)."""
    weight = module.weight
    dtype = weight.dtype if weight.dtype.is_floating_point else None
    return {"device": weight.device, "dtype": dtype}
