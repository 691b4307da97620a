"""Exact weight conversion between PyTorch and Flax NNX, and the shared framework-free rules.

``converters.naming``, ``converters.layout`` and ``converters.checkpoint`` import neither torch
nor jax; the conversion functions import each framework only when called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["flax_to_torch", "torch_to_flax"]


def __getattr__(name: str) -> Any:
    # Lazy: ``import converters.naming`` must not pull in torch or jax.
    if name in __all__:
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'converters' has no attribute {name!r}")
