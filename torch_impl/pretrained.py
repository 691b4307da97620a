"""``save_pretrained`` / ``from_pretrained`` for ``AdaptedModel``: adapter-only directories, in
PEFT's format where PEFT can represent the adapter, ours otherwise (see
:mod:`twinformat.peft_format`). The twin of ``flax_impl.pretrained``.

PEFT's format holds LoRA with any of its options (``dropout``, ``use_rslora``, ``use_dora``) on
named Linear, Conv and Embedding layers, with nothing unfrozen, convs of dilation 1 and zero
padding (PEFT's LoRA conv copies only the kernel, stride and padding) and no scaled embeddings
(PEFT scales the adapter's output by ``embed_scale``; ours does not). Anything else, Houlsby
adapters and ``unfrozen_layers`` included, is written in our format, which ``from_pretrained``
reads back the same way. ``from_pretrained`` reads every PEFT LoRA directory
``converters.import_peft_adapter`` reads, refusing what our LoRA cannot compute exactly before
the base model is touched, and, like ``peft.PeftModel.from_pretrained``, returns the model in
eval mode (``.train()`` to train further).

Example
-------
>>> import tempfile
>>> from torch import nn
>>> from torch_impl import AdaptedModel, LoRA
>>> model = AdaptedModel(nn.Sequential(nn.Linear(4, 4)), LoRA, target_layers="0",
...                      adapter_kwargs={"rank": 2, "alpha": 4.0})
>>> folder = tempfile.mkdtemp() + "/adapter"
>>> model.save_pretrained(folder)
'peft'
>>> again = AdaptedModel.from_pretrained(nn.Sequential(nn.Linear(4, 4)), folder)
>>> again.adapter_kwargs, again.replace_layers
({'rank': 2, 'alpha': 4.0}, ['0'])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinformat import peft_format
from twinformat.adapters import LORA, adapter_class_name, adapter_of
from twinformat.errors import CheckpointError, PeftConversionError
from twinformat.format import adapter_metadata
from twinformat.recorded import (
    layer_kinds_entry,
    recorded_jsonable,
    resolve_recorded_class,
    signature_defaults,
)

from . import distributed
from .checkpoint import load_state_dict_file, save_state_dict_file
from .houlsby import HoulsbyAdapterLinear
from .interchange import layer_kind
from .lora import DEFAULT_ADAPTER, LoRA

__all__ = [
    "from_pretrained",
    "hotswap_adapter",
    "peft_layer_kind",
    "peft_layer_refusal",
    "peft_refusal",
    "read_named_adapter",
    "save_adapters",
    "save_pretrained",
]

#: This twin's adapter classes, looked up by their declaration's name.
ADAPTER_CLASSES: tuple[type[LoRA | HoulsbyAdapterLinear], ...] = (LoRA, HoulsbyAdapterLinear)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv": _CONV_TYPES,
    "embedding": (nn.Embedding,),
}


def peft_layer_kind(module: nn.Module) -> str | None:
    """``'linear'``, ``'conv'`` or ``'embedding'`` for a layer our LoRA (and PEFT's) wraps, else None.

    >>> peft_layer_kind(nn.Embedding(4, 2)), peft_layer_kind(nn.ReLU())
    ('embedding', None)
    """
    return next((kind for kind, types in _KINDS.items() if isinstance(module, types)), None)


def peft_layer_refusal(name: str, layer: nn.Module) -> str | None:
    """Why PEFT's LoRA on ``layer`` computes something else than ours, or None when they agree.

    >>> peft_layer_refusal("conv", nn.Conv1d(2, 2, 3, dilation=2))
    "layer 'conv' is a conv with dilation (2,) and padding_mode 'zeros'; PEFT's LoRA conv has dilation 1 and zero padding"
    """
    if isinstance(layer, _CONV_TYPES):
        if any(d != 1 for d in layer.dilation) or layer.padding_mode != "zeros":
            return (
                f"layer {name!r} is a conv with dilation {layer.dilation} and padding_mode "
                f"{layer.padding_mode!r}; PEFT's LoRA conv has dilation 1 and zero padding"
            )
    if isinstance(layer, nn.Embedding):
        if layer.max_norm is not None:
            return f"layer {name!r} is an embedding with max_norm={layer.max_norm}, which our LoRA refuses"
        if hasattr(layer, "embed_scale"):
            return (
                f"layer {name!r} is a scaled embedding ({type(layer).__name__}.embed_scale): PEFT multiplies "
                "the adapter's output by embed_scale, our LoRA does not"
            )
    return None


def peft_refusal(model: Any, *, full: bool = False) -> str | None:
    """Why PEFT's format cannot represent ``model``'s adapters, or None when it can
    (:func:`twinformat.peft_format.adapted_model_refusal`, with this twin's :func:`peft_layer_refusal`;
    ``full`` for :func:`save_pretrained`, which writes unfrozen layers as ``modules_to_save``
    and per-layer kwargs as patterns, but not unfrozen layers that share a weight with a module
    outside them, which PEFT's ``modules_to_save`` would untie)."""
    refusal = peft_format.adapted_model_refusal(
        model, lambda name: peft_layer_refusal(name, _wrapped(model, name)), full=full
    )
    if refusal is not None:
        return refusal
    return _tied_modules_refusal(model.adapted_model, _outermost(model.unfrozen_module_names))


def _outermost(names: Sequence[str]) -> list[str]:
    """``names`` without those that lie inside another of them."""
    return [n for n in names if not any(n != o and (not o or n.startswith(f"{o}.")) for o in names)]


def _base_module_names(model: Any) -> list[str]:
    """The base model's module names as PEFT sees them (every adapter's insides left out)."""
    names: list[str] = []
    inside: tuple[str, ...] = ()
    for name, module in model.adapted_model.named_modules():
        if inside and name.startswith(inside):
            continue
        names.append(name)
        if adapter_of(module) is not None:
            inside = (*inside, f"{name}." if name else "")
    return names


def _auto_mapping(model: Any) -> dict[str, str] | None:
    """PEFT's ``auto_mapping`` for a transformers base model (what ``AutoPeftModel`` imports)."""
    cls = type(model.adapted_model)
    if cls.__module__.startswith("transformers."):
        return {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return None


def _name_or_path(model: Any) -> str | None:
    """The base model's name or path where transformers recorded it (``from_pretrained``)."""
    value = getattr(getattr(model.adapted_model, "config", None), "_name_or_path", None)
    return value if isinstance(value, str) and value else None


def save_pretrained(
    model: Any,
    directory: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> str:
    """Write ``model``'s adapters (only them) to ``directory``; returns the format written,
    ``'peft'`` or ``'peft-twins'``. In a process group every rank must call it (the trainable
    tensors are gathered) and rank 0 writes."""
    tensors = model.trainable_state_dict()
    refusal = peft_refusal(model, full=True)
    if refusal is None:
        embeddings = [n for n in model.replace_layers if peft_layer_kind(_wrapped(model, n)) == "embedding"]
        config, peft_tensors = peft_format.peft_files(
            tensors,
            model.replace_layers,
            model.adapter_kwargs,
            embeddings=embeddings,
            base_model_name_or_path=base_model_name_or_path or _name_or_path(model),
            where=str(directory),
            layer_kwargs=model.layer_adapter_kwargs,
            modules_to_save=_outermost(model.unfrozen_module_names),
            module_names=_base_module_names(model),
            target_patterns=model.target_layers,
            recorded=model.recorded_peft_config,
            task_type=task_type,
            auto_mapping=_auto_mapping(model),
        )
        write = lambda path: save_state_dict_file(peft_tensors, path, {"format": "pt"})  # noqa: E731
    else:
        config = peft_format.ours_config(
            framework="torch",
            adapter_class=adapter_class_name(model.adapter_class),
            adapter_kwargs=recorded_jsonable(model.adapter_kwargs),
            adapted_layers=model.replace_layers,
            unfrozen_layers=model.unfrozen_module_names,
            layer_adapter_kwargs=recorded_jsonable(model.layer_adapter_kwargs),
        )
        metadata = model._file_metadata(tensors)
        write = lambda path: save_state_dict_file(tensors, path, metadata)  # noqa: E731
    if distributed.is_writer():
        peft_format.write_adapter_directory(
            directory, peft=refusal is None, config=config, write_weights=write
        )
    return "peft" if refusal is None else "peft-twins"


class _AdapterView:
    """One adapter of a model holding several, as :func:`save_pretrained` reads a one-adapter
    model: its layers, kwargs and tensors (one-adapter keys), the shared base model."""

    def __init__(self, model: Any, name: str) -> None:
        self._model, self._name = model, name
        self.adapted_model = model.adapted_model
        if name == model.default_adapter_name:
            self.adapter_class, self.adapter_kwargs = model.adapter_class, model.adapter_kwargs
            self.replace_layers, self.unfrozen_module_names = (
                model.replace_layers,
                model.unfrozen_module_names,
            )
            self.layer_adapter_kwargs, self.target_layers = model.layer_adapter_kwargs, model.target_layers
            self.recorded_peft_config = model.recorded_peft_config
        else:
            spec = model.named_adapter_specs[name]
            self.adapter_class, self.adapter_kwargs = spec["adapter_class"], spec["adapter_kwargs"]
            self.replace_layers, self.unfrozen_module_names = spec["layers"], []
            self.layer_adapter_kwargs, self.target_layers = (
                spec["layer_adapter_kwargs"],
                spec["target_layers"],
            )
            self.recorded_peft_config = spec.get("recorded_peft_config")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self._model.adapter_state_dict(self._name)

    def _file_metadata(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
        if self._name == self._model.default_adapter_name:
            return self._model._file_metadata(tensors)
        metadata = adapter_metadata(
            framework="torch",
            adapter_class=adapter_class_name(self.adapter_class),
            adapter_kwargs=self.adapter_kwargs,
            target_layers=self.target_layers or self.replace_layers,
            unfrozen_layers=[],
        )
        marker = f".named_adapters.{self._name}."
        kinds = {
            name.replace(marker, "."): kind
            for name, module in self._model.named_modules()
            if (kind := layer_kind(module)) and (".named_adapters." not in name or marker in name)
        }
        metadata["layer_kinds"] = layer_kinds_entry(kinds, tensors)
        return metadata


def save_adapters(
    model: Any,
    directory: str | os.PathLike[str],
    names: Sequence[str],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> dict[str, str]:
    """Write the adapters ``names`` of a model holding several in PEFT's multi-adapter layout:
    ``'default'`` at the root of ``directory``, each other in ``directory/<name>``, each as
    :func:`save_pretrained` writes one adapter; returns ``{name: format}``."""
    model._check_known(names)
    folder = Path(directory)
    if not folder.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(folder)!r}: folder {str(folder.parent)!r} does not exist")
    folder.mkdir(exist_ok=True)
    formats = {}
    for name in names:
        target = folder if name == DEFAULT_ADAPTER else folder / name
        formats[name] = save_pretrained(
            _AdapterView(model, name),
            target,
            base_model_name_or_path=base_model_name_or_path,
            task_type=task_type,
        )
    return formats


def read_named_adapter(model: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``AdaptedModel.load_adapter`` adds: a LoRA adapter read from a PEFT directory or
    ours, checked against ``model``'s base layers before anything changes (``layers``,
    ``adapter_kwargs``, ``layer_adapter_kwargs``, ``tensors`` in one-adapter keys, ``where``,
    ``recorded_peft_config``)."""
    found = peft_format.read_adapter_directory(path)
    where = str(found.weights)
    modules = model._base_modules()
    if found.format == "peft":
        adapter = peft_format.load_peft_adapter(
            found, lambda p: load_state_dict_file(p)[0], allow_patterns=True
        )
        peft_format.check_peft_model(
            adapter,
            {name: (peft_layer_kind(m), type(m).__name__) for name, m in modules.items()},
            where=str(path),
            layer_refusal=lambda name: peft_layer_refusal(name, modules[name]),
        )
        return {
            "layers": adapter.layers,
            "adapter_kwargs": adapter.adapter_kwargs,
            "layer_adapter_kwargs": adapter.layer_kwargs,
            "tensors": adapter.tensors,
            "where": where,
            "recorded_peft_config": dict(found.config),
        }
    adapter_class = _adapter_class(found.config["adapter_class"], where)
    if adapter_class is not LoRA or found.config["unfrozen_layers"]:
        raise CheckpointError(
            f"{where!r} holds {found.config['adapter_class']} adapters with unfrozen layers "
            f"{found.config['unfrozen_layers'][:8]}; load_adapter adds LoRA adapters alone (use from_pretrained)"
        )
    missing = [name for name in found.config["adapted_layers"] if name not in modules or not name]
    if missing:
        raise CheckpointError(f"{where!r} adapts layers {missing[:8]} which the model does not have")
    return {
        "layers": found.config["adapted_layers"],
        "adapter_kwargs": _resolve_kwargs(adapter_class, found.config["adapter_kwargs"], where),
        "layer_adapter_kwargs": found.config.get("layer_adapter_kwargs", {}),
        "tensors": load_state_dict_file(found.weights)[0],
        "where": where,
        "recorded_peft_config": None,
    }


def from_pretrained(cls: type, base_model: nn.Module, directory: str | os.PathLike[str]) -> Any:
    """Wrap ``base_model`` (changed in place, like ``AdaptedModel``) in adapters rebuilt from
    ``directory`` and load them; returns the model in eval mode, as PEFT does. A refused load
    puts the base model back as it was."""
    found = peft_format.read_adapter_directory(directory)
    adapter_class: type[LoRA | HoulsbyAdapterLinear]
    metadata: Mapping[str, str]
    where = str(found.weights)
    layer_kwargs: Mapping[str, Mapping[str, Any]] = {}
    if found.format == "peft":
        adapter = peft_format.load_peft_adapter(
            found, lambda path: load_state_dict_file(path)[0], allow_patterns=True, allow_modules_to_save=True
        )
        modules = dict(base_model.named_modules())
        peft_format.check_peft_model(
            adapter,
            {name: (peft_layer_kind(m), type(m).__name__) for name, m in modules.items()},
            where=str(directory),
            layer_refusal=lambda name: peft_layer_refusal(name, modules[name]),
        )
        refusal = _tied_modules_refusal(base_model, adapter.modules_to_save)
        if refusal is not None:
            raise PeftConversionError(f"{str(directory)!r}: {refusal}")
        adapter_class, kwargs, layer_kwargs = LoRA, adapter.adapter_kwargs, adapter.layer_kwargs
        adapted, unfrozen = adapter.layers, adapter.modules_to_save
        tensors, metadata = adapter.tensors, {}
    else:
        tensors, metadata = load_state_dict_file(found.weights)
        adapter_class = _adapter_class(found.config["adapter_class"], where)
        kwargs = _resolve_kwargs(adapter_class, found.config["adapter_kwargs"], where)
        adapted, unfrozen = found.config["adapted_layers"], found.config["unfrozen_layers"]
        layer_kwargs = {
            name: _resolve_kwargs(adapter_class, value, where)
            for name, value in found.config.get("layer_adapter_kwargs", {}).items()
        }
    flags = [(p, p.requires_grad) for p in base_model.parameters()]
    model = cls(
        base_model,
        adapter_class,
        # A bare layer adapted at the root has no name to target: all_linear/all_conv select it.
        all_linear="" in adapted and isinstance(base_model, nn.Linear),
        all_conv="" in adapted and isinstance(base_model, _CONV_TYPES),
        target_layers=[peft_format.escape_glob(name) for name in adapted if name],
        unfrozen_layers=[peft_format.escape_glob(name) for name in unfrozen],
        adapter_kwargs=kwargs,
        manual_adapter_insertion=True,
    )
    model.layer_adapter_kwargs = {name: dict(value) for name, value in layer_kwargs.items()}
    if found.format == "peft":
        model.recorded_peft_config = dict(found.config)
    try:
        model.insert_adapters()
    except BaseException:
        for param, flag in flags:
            param.requires_grad_(flag)
        raise
    try:
        if sorted(model.replace_layers) != sorted(adapted):
            raise CheckpointError(
                f"{str(directory)!r} adapts layers {sorted(adapted)[:8]} but the model offers {sorted(model.replace_layers)[:8]}"
            )
        model._load_checked(tensors, metadata, where=where)
    except BaseException:
        _put_back(model, base_model, flags)
        raise
    return model.eval()


def _tied_modules_refusal(base_model: nn.Module, modules: Sequence[str]) -> str | None:
    """Why ``modules`` (to save, or unfrozen) cannot cross PEFT's ``modules_to_save``, or None: one
    whose weight is tied to a module outside it (``lm_head`` and ``embed_tokens``)."""
    owners: dict[int, list[str]] = {}
    for name, param in base_model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for module in modules:
        for param_name, param in base_model.get_submodule(module).named_parameters():
            outside = [n for n in owners[id(param)] if not n.startswith(f"{module}.")]
            if outside:
                return (
                    f"module {module!r} (unfrozen, PEFT's modules_to_save) shares {param_name!r} with "
                    f"{outside[0]!r} (tied weights): PEFT trains an untied copy, an unfrozen layer the shared "
                    "parameter itself; untie them first (config.tie_word_embeddings=False and a cloned weight)"
                )
    return None


def _adapter_class(name: str, where: str) -> type[LoRA | HoulsbyAdapterLinear]:
    for adapter_class in ADAPTER_CLASSES:
        if adapter_class.adapter_kind.name == name:
            return adapter_class
    raise CheckpointError(
        f"{where!r} holds {name!r} adapters; torch_impl has {[c.adapter_kind.name for c in ADAPTER_CLASSES]}"
    )


def _resolve_kwargs(adapter_class: type, recorded: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Recorded kwargs back to Python values: a class-valued kwarg (Houlsby's ``activation``)
    is recorded as a dotted name, resolved in this twin for the twins' own classes."""
    defaults = signature_defaults(adapter_class)
    out = {}
    for key, value in recorded.items():
        if isinstance(defaults.get(key), type) and isinstance(value, str):
            value = resolve_recorded_class(
                value, twin="torch_impl", refuse=("jax", "flax", "optax"), where=where
            )
        out[key] = value
    return out


def _wrapped(model: Any, name: str) -> Any:
    """The layer the adapter at ``name`` wraps."""
    return getattr(model.adapted_model.get_submodule(name), LORA.wrapped)


def _put_back(model: Any, base_model: nn.Module, flags: Sequence[tuple[torch.Tensor, bool]]) -> None:
    """Undo what building ``model`` did to ``base_model``: wrapped layers back in place,
    ``requires_grad`` as it was."""
    for name in model.replace_layers:
        if not name:  # a bare layer adapted at the root: the AdaptedModel wraps it, nothing to put back
            continue
        adapter = model.adapted_model.get_submodule(name)
        kind = adapter_of(adapter)
        assert kind is not None  # every replace_layers entry holds the adapter this model inserted
        wrapped = getattr(adapter, kind.wrapped)
        parent, _, leaf = name.rpartition(".")
        setattr(base_model.get_submodule(parent) if parent else base_model, leaf, wrapped)
    for param, flag in flags:
        param.requires_grad_(flag)


def hotswap_adapter(model: Any, path: str | os.PathLike[str], adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Replace the weights of ``model``'s LoRA adapter ``adapter_name`` in place with those saved
    in ``path`` (a PEFT directory or ours), without rebuilding anything: PEFT's
    ``hotswap_adapter``.

    The saved adapter must adapt the same layers with the same options (DoRA, rsLoRA); its rank
    may be smaller than the model's, whose factors are then zero-padded (as PEFT pads them after
    ``prepare_model_for_compiled_hotswap``), never larger. Another alpha is folded into the up
    factor, so each layer's ``scaling`` stays the number it was: parameters keep their objects,
    shapes and attributes, hence a ``torch.compile``'d model is not compiled again (PEFT's
    condition). Everything is checked before the first tensor is written.
    """
    from twinformat.adapters import lora_scaling

    model._check_known([adapter_name])
    spec = model._spec(adapter_name)
    if adapter_of(spec["adapter_class"]) is not LORA:
        raise CheckpointError(
            f"adapter {adapter_name!r} is a {spec['adapter_class'].__name__}; only LoRA hot-swaps"
        )
    found = read_named_adapter(model, path)
    where = found["where"]
    if sorted(found["layers"]) != sorted(spec["layers"]):
        extra = sorted(set(found["layers"]) ^ set(spec["layers"]))
        raise CheckpointError(
            f"{where!r} adapts other layers than adapter {adapter_name!r} (differing: {extra[:8]}); a hot-swap "
            "replaces the weights of the same layers"
        )
    slot = model._slot(adapter_name)
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in spec["layers"]:
        ours = {**spec["adapter_kwargs"], **spec["layer_adapter_kwargs"].get(layer, {})}
        theirs = {**found["adapter_kwargs"], **found["layer_adapter_kwargs"].get(layer, {})}
        for option in ("use_dora", "use_rslora"):
            if bool(ours.get(option)) != bool(theirs.get(option)):
                raise CheckpointError(
                    f"{where!r}: layer {layer!r} has {option}={bool(theirs.get(option))}, adapter {adapter_name!r} "
                    f"{bool(ours.get(option))}; a hot-swap keeps the options"
                )
        branch = model.adapted_model.get_submodule(layer).branch(slot)
        embedding = isinstance(model.adapted_model.get_submodule(layer).pretrained_module, nn.Embedding)
        prefix = f"adapted_model.{layer}."
        down = found["tensors"][prefix + "adapter_down_proj.weight"]
        up = found["tensors"][prefix + "adapter_up_proj.weight"]
        rank_axis = 1 if embedding else 0
        new_rank, rank = down.shape[rank_axis], branch.adapter_down_proj.weight.shape[rank_axis]
        if new_rank > rank:
            raise CheckpointError(
                f"{where!r}: layer {layer!r} has rank {new_rank}, more than adapter {adapter_name!r}'s {rank}; "
                "build the adapter with the largest rank to swap in"
            )
        # The saved scaling folded into up, so that the layer's own scaling does not change.
        factor = lora_scaling({**theirs, "rank": new_rank}) / branch.scaling
        down = _pad(down.to(torch.float32), rank, rank_axis)
        up = _pad(up.to(torch.float32) * factor, rank, 1)
        targets = [(branch.adapter_down_proj.weight, down), (branch.adapter_up_proj.weight, up)]
        if ours.get("use_dora"):
            targets.append(
                (branch.adapter_magnitude, found["tensors"][prefix + "adapter_magnitude"].reshape(-1))
            )
        for target, value in targets:
            if tuple(target.shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{where!r}: layer {layer!r}: a tensor of shape {tuple(value.shape)} for {tuple(target.shape)}"
                )
            plan.append((target, value))
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value.to(device=target.device, dtype=target.dtype))


def _pad(tensor: torch.Tensor, size: int, axis: int) -> torch.Tensor:
    """``tensor`` zero-padded along ``axis`` to ``size``."""
    missing = size - tensor.shape[axis]
    if not missing:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=axis)
