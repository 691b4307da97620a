"""Fold LoRA updates into the wrapped weights for inference, and take them back out."""

from __future__ import annotations

from torch import nn

from interchange.adapters import adapter_of
from interchange.errors import MergeError

from .lora import LoRA

__all__ = ["MergeError", "merge_lora", "unmerge_lora"]


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer of ``model``: ``W += scaling * up @ down`` (conv too).

    Afterwards each LoRA layer computes only its pretrained module, at the base model's speed,
    with the same outputs (to float rounding). Returns the number of layers merged. Raises
    :class:`MergeError` if ``model`` holds an adapter that cannot be merged (Houlsby), before
    changing anything.

    Example
    -------
    >>> import torch
    >>> layer = LoRA(nn.Linear(4, 3), rank=2)
    >>> _ = nn.init.normal_(layer.adapter_up_proj.weight)
    >>> x = torch.randn(5, 4)
    >>> before = layer(x)
    >>> merge_lora(layer)
    1
    >>> torch.allclose(layer(x), before, atol=1e-6)
    True
    """
    _refuse_unmergeable(model)
    layers = [m for m in model.modules() if isinstance(m, LoRA) and not m.merged]
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora` on every merged LoRA layer; returns how many were unmerged."""
    layers = [m for m in model.modules() if isinstance(m, LoRA) and m.merged]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def _refuse_unmergeable(model: nn.Module) -> None:
    for name, module in model.named_modules():
        kind = adapter_of(module)
        if kind is not None and not kind.merges:
            raise MergeError(
                f"layer {name or '<root>'!r} is a {kind.name}, which cannot be merged: "
                "its activation between the projections is not linear"
            )
