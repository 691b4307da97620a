"""The Flax NNX side of a conversion, through ``flax_impl.checkpoint`` (the one home of the
Flax layer kinds and layouts). Imported only when a conversion touches Flax."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from flax_impl.checkpoint import layer_kind, load_torch_style_state_dict, torch_style_state_dict
from flax_impl.graph import named_modules

__all__ = ["assign_flax", "flax_kinds", "flax_state_dict"]


def flax_kinds(model: nnx.Module) -> tuple[dict[str, str], dict[str, str]]:
    """``(kinds, unknown)``: the layout kind of each layer from its NNX type, and the type name
    of each module that owns variables but has no known kind."""
    kinds: dict[str, str] = {}
    unknown: dict[str, str] = {}
    for name, module in named_modules(model):
        kind = layer_kind(module)
        if kind is not None:
            kinds[name] = kind
        elif any(_is_weight(value) for value in vars(module).values()):
            unknown[name] = type(module).__name__
    return kinds, unknown


def flax_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every variable of ``model`` under its torch name, in torch layout, dtype unchanged."""
    # Variables of unknown layer types are left out here and refused (or skipped) by the caller,
    # which knows whether the conversion is strict.
    return dict(torch_style_state_dict(model, strict=False))


def assign_flax(model: nnx.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Write validated torch-style ``arrays`` into ``model`` (all checked by the caller)."""
    load_torch_style_state_dict(model, dict(arrays), strict=False)


def _is_weight(value: object) -> bool:
    return isinstance(value, nnx.Variable) and not isinstance(value, nnx.RngState)
