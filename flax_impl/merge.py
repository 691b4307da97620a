"""Fold LoRA updates into the wrapped kernels for inference, and take them back out."""

from __future__ import annotations

from flax import nnx

from interchange.adapters import adapter_of
from interchange.errors import MergeError

from .graph import named_modules
from .lora import LoRA

__all__ = ["MergeError", "merge_lora", "unmerge_lora"]


def merge_lora(model: nnx.Module) -> int:
    """Merge every LoRA layer of ``model``: ``kernel += scaling * down @ up`` (conv too).

    Afterwards each LoRA layer computes only its pretrained module, at the base model's speed,
    with the same outputs (to float rounding). Returns the number of layers merged. Raises
    :class:`MergeError` if ``model`` holds an adapter that cannot be merged (Houlsby), before
    changing anything.

    Example
    -------
    >>> import jax, jax.numpy as jnp
    >>> layer = LoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
    >>> layer.adapter_up_proj.kernel[...] = jax.random.normal(jax.random.key(2), (2, 3))
    >>> x = jax.random.normal(jax.random.key(3), (5, 4))
    >>> before = layer(x)
    >>> merge_lora(layer)
    1
    >>> bool(jnp.allclose(layer(x), before, atol=1e-6))
    True
    """
    _refuse_unmergeable(model)
    layers = [m for _, m in named_modules(model) if isinstance(m, LoRA) and not m.merged]
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nnx.Module) -> int:
    """Undo :func:`merge_lora` on every merged LoRA layer; returns how many were unmerged."""
    layers = [m for _, m in named_modules(model) if isinstance(m, LoRA) and m.merged]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def _refuse_unmergeable(model: nnx.Module) -> None:
    for name, module in named_modules(model):
        kind = adapter_of(module)
        if kind is not None and not kind.merges:
            raise MergeError(
                f"layer {name or '<root>'!r} is a {kind.name}, which cannot be merged: "
                "its activation between the projections is not linear"
            )
