"""Both ends of a conversion, seen in the interchange format (torch names and layouts, numpy).

A *source* is a model of either framework, a checkpoint file, or a state dict; a *target* is
a model. Each becomes plain data here: a :class:`Source` (a lazy torch-layout view plus what is
known about it) or a :class:`Target` (the expected keys, dtypes and shapes, layer kinds, and a
function that writes validated arrays into the model). Frameworks are imported only when the
object at hand belongs to them, so a Flax-only install converts files without PyTorch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twinformat.adapters import adapter_of, is_adapter_key
from twinformat.dtypes import TensorSpec
from twinformat.format import adapter_metadata, parse_metadata
from twinformat.state import FlatState

from .files import TensorFile
from .views import TensorView, file_layer_kinds, file_view, to_torch_layout

__all__ = [
    "Source",
    "Target",
    "framework_of",
    "is_adapter_key",
    "model_assign",
    "model_metadata",
    "model_state",
    "read_source",
    "target_of",
]


@dataclass
class Source:
    """What a conversion reads: a torch-layout view plus what is known about it.

    ``framework`` is ``'torch'``, ``'flax'`` or ``'file'``/``'dict'``; ``kinds`` and
    ``unknown`` come from module types (models) or the file's metadata; ``aliases`` maps a tied
    key to the key it shares storage with; ``adapter_only`` is True for adapter checkpoints
    (which lack the frozen base weights by design).
    """

    view: TensorView
    framework: str
    kinds: dict[str, str] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    adapter_only: bool = False
    layout: str = "torch"
    close: Callable[[], None] = lambda: None
    buffers: set[str] = field(default_factory=set)

    def state(self) -> FlatState:
        """What the planner reads: specs, kinds and flags of this source (no tensor data)."""
        unfrozen = parse_metadata(self.metadata).get("unfrozen_layers") or ()
        return FlatState(
            dict(self.view.specs),
            kinds=dict(self.kinds),
            unknown=dict(self.unknown),
            aliases=dict(self.aliases),
            buffers=set(self.buffers),
            framework=self.framework,
            layout=self.layout,
            adapter_only=self.adapter_only,
            unfrozen=tuple(unfrozen) if isinstance(unfrozen, list) else (),
        )


@dataclass
class Target:
    """A model about to be filled: its flat state (specs and kinds, no data) and how to write
    validated torch-layout arrays into it."""

    state: FlatState
    assign: Callable[[dict[str, np.ndarray]], None]

    @property
    def framework(self) -> str:
        return self.state.framework

    @property
    def specs(self) -> dict[str, TensorSpec]:
        return self.state.specs


def framework_of(obj: object) -> str | None:
    """``'torch'`` for an ``nn.Module``, ``'flax'`` for an ``nnx.Module``, else None (no imports)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        return "torch"
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(obj, nnx.Module):
        return "flax"
    return None


def model_state(model: Any) -> FlatState:
    """A model of either framework in the interchange format (torch names and layouts), through
    its twin's bridge (``torch_impl.interchange`` / ``flax_impl.interchange``)."""
    framework = framework_of(model)
    if framework == "torch":
        from torch_impl.interchange import model_state as torch_model_state

        return torch_model_state(model)
    if framework == "flax":
        from flax_impl.interchange import model_state as flax_model_state

        return flax_model_state(model)
    raise TypeError(f"expected a torch.nn.Module or a flax.nnx.Module, got {type(model).__name__}")


def model_assign(model: Any) -> Callable[[dict[str, np.ndarray]], None]:
    """The function that writes validated torch-layout arrays into ``model``."""
    if framework_of(model) == "torch":
        from torch_impl import interchange as bridge
    else:
        from flax_impl import interchange as bridge  # type: ignore[no-redef]
    return lambda arrays: bridge.assign(model, arrays)


def model_metadata(model: Any, framework: str) -> dict[str, str]:
    """Header metadata describing ``model``: an AdaptedModel records its adapter settings."""
    adapter_class = getattr(model, "adapter_class", None)
    if adapter_class is not None and hasattr(model, "adapted_model"):
        declared = adapter_of(adapter_class)
        return adapter_metadata(
            framework=framework,
            adapter_class=declared.name
            if declared
            else getattr(adapter_class, "__name__", str(adapter_class)),
            adapter_kwargs=getattr(model, "adapter_kwargs", {}),
            target_layers=list(getattr(model, "target_layers", ()) or getattr(model, "replace_layers", ())),
            unfrozen_layers=list(getattr(model, "unfrozen_layers", ())),
            content="model",
        )
    return adapter_metadata(framework=framework, content="base")


def read_source(source: Any) -> Source:
    """Turn a model, a checkpoint path or a state dict into a :class:`Source`."""
    framework = framework_of(source)
    if framework is not None:
        state = model_state(source)
        view = TensorView(state.specs, {key: _state_reader(state, key) for key in state.specs})
        return Source(view, framework, state.kinds, state.unknown, state.aliases, buffers=state.buffers)
    if isinstance(source, (str, os.PathLike)):
        return _file_source(source)
    if isinstance(source, Mapping):
        arrays = {}
        for key, value in source.items():
            if not isinstance(key, str):
                raise TypeError(f"state dict keys must be strings, got {key!r}")
            arrays[key] = _to_numpy(key, value)
        view = TensorView.from_arrays(arrays)
        return Source(view, "dict", adapter_only=_only_adapter_keys(view.names))
    raise TypeError(
        "source must be a torch.nn.Module, a flax.nnx.Module, a checkpoint path or a state dict, "
        f"got {type(source).__name__}"
    )


def target_of(model: Any) -> Target:
    """Describe ``model`` as a :class:`Target` (expected keys, kinds, and how to assign)."""
    framework = framework_of(model)
    if framework is None:
        raise TypeError(
            f"the target must be a torch.nn.Module or a flax.nnx.Module, got {type(model).__name__}"
        )
    # shapes only: nothing is copied or re-laid out to plan
    return Target(model_state(model), model_assign(model))


def _file_source(path: str | os.PathLike[str]) -> Source:
    tensor_file = TensorFile(path)
    metadata = dict(tensor_file.metadata)
    view = file_view(tensor_file)
    kinds = file_layer_kinds(tensor_file)  # recorded, and implied by its adapter's declaration
    view = to_torch_layout(view, tensor_file.layout, kinds)
    content = parse_metadata(metadata).get("content")
    adapter_only = content == "adapter" or (not metadata and _only_adapter_keys(view.names))
    return Source(view, "file", kinds, {}, {}, metadata, adapter_only, tensor_file.layout, tensor_file.close)


def _only_adapter_keys(names: list[str]) -> bool:
    return bool(names) and all(is_adapter_key(name) for name in names)


def _to_numpy(key: str, value: Any) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        from torch_impl.interchange import tensor_to_numpy

        return tensor_to_numpy(value)
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        array = np.asarray(value)  # jax arrays keep their dtype (bf16 as ml_dtypes.bfloat16)
        if array.dtype == object:
            raise TypeError(f"state dict entry {key!r} is not a numeric array")
        return np.asarray(array, order="C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray
    raise TypeError(f"state dict entry {key!r} must be a tensor or an array, got {type(value).__name__}")


def _state_reader(state: FlatState, key: str) -> Callable[[], np.ndarray]:
    return lambda: state.read(key)
