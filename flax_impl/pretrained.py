"""``save_pretrained`` / ``from_pretrained`` for ``AdaptedModel``: adapter-only directories, in
PEFT's format where PEFT can represent the adapter, ours otherwise (see
:mod:`twinformat.peft_format`). The twin of ``torch_impl.pretrained``.

The tensors are written in PyTorch's names and layouts, as :meth:`AdaptedModel.saver` writes
them, so a directory saved here loads into the PyTorch twin (and, in PEFT's format, into
``peft.PeftModel``) and the reverse. PEFT's format holds plain LoRA (rank and alpha only) on
named Linear/Conv layers, with nothing unfrozen and convs of dilation 1 and zero padding.

**A twin that is part of a bigger transformers model** (Gemma 3's text twins, the language model
of ``Gemma3ForConditionalGeneration``) declares ``checkpoint_layouts``
(:class:`flax_impl.models.pretrained.CheckpointLayout`). A PEFT adapter trained on the bigger model
names its layers there (``base_model.model.model.language_model.layers.0.self_attn.q_proj...``,
or the older ``...language_model.model.layers.0...``): :func:`from_pretrained` recognises the
spelling, checks the adapter against the twin in those names, loads it under the twin's own, and
records the spelling on the base model (``peft_layout``; ``None`` for an adapter in the twin's own
names). An adapter that reaches outside the twin's part (the vision tower, the projector) is
refused, naming those layers, before anything changes. The rule for writing:
:func:`save_pretrained` writes the keys, ``target_modules`` and patterns in the base model's
``peft_layout``, that is in the spelling the adapter came with, or, for an adapter made here on a
twin read from the bigger model's directory, in transformers' module names of it (what PEFT
itself writes), so ``peft.PeftModel.from_pretrained(<the bigger model>, directory)`` loads it.

Example
-------
>>> import tempfile
>>> from flax import nnx
>>> from flax_impl import AdaptedModel, LoRA
>>> def base():
...     return nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
>>> model = AdaptedModel(base(), LoRA, target_layers="layers.0",
...                      adapter_kwargs={"rank": 2, "alpha": 4.0}, rngs=nnx.Rngs(1))
>>> folder = tempfile.mkdtemp() + "/adapter"
>>> model.save_pretrained(folder)
'peft'
>>> again = AdaptedModel.from_pretrained(base(), folder, rngs=nnx.Rngs(2))
>>> again.adapter_kwargs, again.replace_layers
({'rank': 2, 'alpha': 4.0}, ['layers.0'])
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import jax
import numpy as np
from flax import nnx

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

from .checkpoint import load_state_dict_file, save_state_dict_file
from .graph import get_submodule, named_modules, set_submodule
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
_KINDS: dict[str, type[nnx.Module]] = {"linear": nnx.Linear, "conv": nnx.Conv, "embedding": nnx.Embed}


def peft_layer_kind(module: Any) -> str | None:
    """``'linear'``, ``'conv'`` or ``'embedding'`` for a layer our LoRA (and PEFT's) wraps, else None.

    >>> peft_layer_kind(nnx.Embed(4, 2, rngs=nnx.Rngs(0))), peft_layer_kind(nnx.Dropout(0.1))
    ('embedding', None)
    """
    return next((kind for kind, type_ in _KINDS.items() if isinstance(module, type_)), None)


def peft_layer_refusal(name: str, layer: Any) -> str | None:
    """Why PEFT's LoRA on the PyTorch twin of ``layer`` computes something else than ours, or None.

    >>> peft_layer_refusal("conv", nnx.Conv(2, 2, (3,), kernel_dilation=2, rngs=nnx.Rngs(0)))[:40]
    "layer 'conv' is an nnx.Conv with padding"
    """
    if isinstance(layer, nnx.Conv) and not _peft_conv_geometry(layer):
        return (
            f"layer {name!r} is an nnx.Conv with padding {layer.padding!r}, kernel_dilation "
            f"{layer.kernel_dilation!r}, input_dilation {layer.input_dilation!r}; PEFT's LoRA conv "
            "is a PyTorch conv of dilation 1 and symmetric zero padding"
        )
    if isinstance(layer, nnx.Embed) and hasattr(layer, "embed_scale"):
        return (
            f"layer {name!r} is a scaled embedding ({type(layer).__name__}.embed_scale): PEFT multiplies "
            "the adapter's output by embed_scale, our LoRA does not"
        )
    return None


def peft_refusal(model: Any, *, full: bool = False) -> str | None:
    """Why PEFT's format cannot represent ``model``'s adapters, or None when it can
    (:func:`twinformat.peft_format.adapted_model_refusal`, with this twin's :func:`peft_layer_refusal`;
    ``full`` for :func:`save_pretrained`, which writes unfrozen layers as ``modules_to_save``
    and per-layer kwargs as patterns)."""
    return peft_format.adapted_model_refusal(
        model, lambda name: peft_layer_refusal(name, _wrapped(model, name)), full=full
    )


def _outermost(names: Sequence[str]) -> list[str]:
    """``names`` without those that lie inside another of them."""
    return [n for n in names if not any(n != o and (not o or n.startswith(f"{o}.")) for o in names)]


def _base_module_names(model: Any) -> list[str]:
    """The base model's module names as PEFT sees them on the PyTorch twin (every adapter's
    insides left out)."""
    names: list[str] = []
    inside: tuple[str, ...] = ()
    for name, module in named_modules(model.adapted_model):
        if inside and name.startswith(inside):
            continue
        names.append(name)
        if adapter_of(module) is not None:
            inside = (*inside, f"{name}." if name else "")
    return names


def _auto_mapping(model: Any) -> dict[str, str] | None:
    """PEFT's ``auto_mapping`` for the transformers class a Flax twin mirrors (the twins carry
    transformers' class names and a ``model_type``), what ``AutoPeftModel`` imports."""
    cls = type(model.adapted_model)
    layout = _peft_layout(model)
    if layout is not None:
        return {"base_model_class": layout.model_class, "parent_library": "transformers"}
    if isinstance(getattr(cls, "model_type", None), str):
        return {"base_model_class": cls.__name__, "parent_library": "transformers"}
    return None


def _peft_layout(model: Any) -> Any:
    """The names PEFT gives ``model``'s base layers, where they are not the twin's own: the base
    model's ``peft_layout`` (a :class:`~flax_impl.models.pretrained.CheckpointLayout`), or None."""
    return getattr(model.adapted_model, "peft_layout", None)


def _checkpoint_patterns(layout: Any, patterns: Sequence[str]) -> list[str]:
    """The user's ``target_layers`` globs in ``layout``'s names when each starts with a prefix it
    renames, else none (``target_modules`` then lists the layers): a glob that may match anywhere
    (``*q_proj``) would select the bigger model's other parts too (a vision tower's q_proj)."""
    if layout is None:
        return list(patterns)
    renamed = [layout.checkpoint_name(pattern) for pattern in patterns]
    return [p for p in renamed if p is not None] if None not in renamed else []


def _name_or_path(model: Any) -> str | None:
    """The base model's name or path where it was recorded (``name_or_path``, or a config's
    ``_name_or_path``)."""
    base = model.adapted_model
    config = getattr(base, "config", None)
    for value in (
        vars(base).get("name_or_path"),
        config.get("_name_or_path")
        if isinstance(config, Mapping)
        else getattr(config, "_name_or_path", None),
    ):
        if isinstance(value, str) and value:
            return value
    return None


def save_pretrained(
    model: Any,
    directory: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> str:
    """Write ``model``'s adapters (only them) to ``directory``; returns the format written,
    ``'peft'`` or ``'peft-twins'``."""
    arrays = model.trainable_state_dict()
    refusal = peft_refusal(model, full=True)
    if refusal is None:
        layout = _peft_layout(model)  # written in the bigger model's names, where the twin is part of one
        rename = peft_format.layout_renamer(layout)
        embeddings = [n for n in model.replace_layers if peft_layer_kind(_wrapped(model, n)) == "embedding"]
        names = _base_module_names(model)
        module_names = [n for n in names if layout is None or layout.checkpoint_name(n) is not None]
        config, peft_arrays = peft_format.peft_files(
            peft_format.renamed_tensors(arrays, rename),
            [rename(n) for n in model.replace_layers],
            model.adapter_kwargs,
            embeddings=[rename(n) for n in embeddings],
            base_model_name_or_path=base_model_name_or_path or _name_or_path(model),
            where=str(directory),
            layer_kwargs={rename(n): kwargs for n, kwargs in model.layer_adapter_kwargs.items()},
            modules_to_save=[rename(n) for n in _outermost(model.unfrozen_module_names)],
            module_names=[rename(n) for n in module_names],
            target_patterns=_checkpoint_patterns(layout, model.target_layers),
            recorded=model.recorded_peft_config,
            task_type=task_type,
            auto_mapping=_auto_mapping(model),
        )
        write = lambda path: save_state_dict_file(peft_arrays, path, {"format": "pt"})  # noqa: E731
    else:
        config = peft_format.ours_config(
            framework="flax",
            adapter_class=adapter_class_name(model.adapter_class),
            adapter_kwargs=recorded_jsonable(model.adapter_kwargs),
            adapted_layers=model.replace_layers,
            unfrozen_layers=model.unfrozen_module_names,
            layer_adapter_kwargs=recorded_jsonable(model.layer_adapter_kwargs),
        )
        metadata = model._file_metadata(arrays)
        write = lambda path: save_state_dict_file(arrays, path, metadata)  # noqa: E731
    peft_format.write_adapter_directory(directory, peft=refusal is None, config=config, write_weights=write)
    return "peft" if refusal is None else "peft-twins"


class _AdapterView:
    """One adapter of a model holding several, as :func:`save_pretrained` reads a one-adapter
    model (the twin of ``torch_impl.pretrained._AdapterView``)."""

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

    def trainable_state_dict(self) -> dict[str, Any]:
        return self._model.adapter_state_dict(self._name)

    def _file_metadata(self, arrays: Mapping[str, Any]) -> dict[str, str]:
        if self._name == self._model.default_adapter_name:
            return self._model._file_metadata(arrays)
        metadata = adapter_metadata(
            framework="flax",
            adapter_class=adapter_class_name(self.adapter_class),
            adapter_kwargs=self.adapter_kwargs,
            target_layers=self.target_layers or self.replace_layers,
            unfrozen_layers=[],
        )
        marker = f".named_adapters.{self._name}."
        kinds = {
            name.replace(marker, "."): kind
            for name, module in named_modules(self._model)
            if (kind := layer_kind(module)) and (".named_adapters." not in name or marker in name)
        }
        metadata["layer_kinds"] = layer_kinds_entry(kinds, arrays)
        return metadata


def save_adapters(
    model: Any,
    directory: str | os.PathLike[str],
    names: Sequence[str],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> dict[str, str]:
    """Write the adapters ``names`` of a model holding several in PEFT's multi-adapter layout
    (``'default'`` at the root, each other in ``<name>/``); returns ``{name: format}``."""
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
    """What ``AdaptedModel.load_adapter`` adds: a LoRA adapter read from a PEFT directory or ours
    (torch names and layouts), checked against ``model``'s base layers before anything changes."""
    found = peft_format.read_adapter_directory(path)
    where = str(found.weights)
    modules = model._base_modules()
    if found.format == "peft":
        adapter = peft_format.load_peft_adapter(
            found, lambda p: load_state_dict_file(p)[0], allow_patterns=True
        )
        # In the twin's names; the model's peft_layout (how adapters are written) stays as it is.
        adapter, _ = _in_twin_names(adapter, model.adapted_model, modules, where=str(path))
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


def from_pretrained(
    cls: type, base_model: nnx.Module, directory: str | os.PathLike[str], *, rngs: nnx.Rngs
) -> Any:
    """Wrap ``base_model`` (changed in place, like ``AdaptedModel``) in adapters rebuilt from
    ``directory`` and load them; returns the model in eval mode, as PEFT does. A refused load
    puts the base model back as it was."""
    found = peft_format.read_adapter_directory(directory)
    adapter_class: type[LoRA | HoulsbyAdapterLinear]
    metadata: Mapping[str, str]
    where = str(found.weights)
    layer_kwargs: Mapping[str, Mapping[str, Any]] = {}
    layout = None  # the names a PEFT adapter came with, where not the twin's own
    if found.format == "peft":
        adapter = peft_format.load_peft_adapter(
            found, lambda path: load_state_dict_file(path)[0], allow_patterns=True, allow_modules_to_save=True
        )
        modules = dict(named_modules(base_model))
        adapter, layout = _in_twin_names(adapter, base_model, modules, where=str(directory))
        adapter_class, kwargs, layer_kwargs = LoRA, adapter.adapter_kwargs, adapter.layer_kwargs
        adapted, unfrozen = adapter.layers, adapter.modules_to_save
        arrays, metadata = adapter.tensors, {}
    else:
        arrays, metadata = load_state_dict_file(found.weights)
        adapter_class = _adapter_class(found.config["adapter_class"], where)
        kwargs = _resolve_kwargs(adapter_class, found.config["adapter_kwargs"], where)
        adapted, unfrozen = found.config["adapted_layers"], found.config["unfrozen_layers"]
        layer_kwargs = {
            name: _resolve_kwargs(adapter_class, value, where)
            for name, value in found.config.get("layer_adapter_kwargs", {}).items()
        }
    model = cls(
        base_model,
        adapter_class,
        # A bare layer adapted at the root has no name to target: all_linear/all_conv select it.
        all_linear="" in adapted and isinstance(base_model, nnx.Linear),
        all_conv="" in adapted and isinstance(base_model, nnx.Conv),
        target_layers=[peft_format.escape_glob(name) for name in adapted if name],
        unfrozen_layers=[peft_format.escape_glob(name) for name in unfrozen],
        adapter_kwargs=kwargs,
        manual_adapter_insertion=True,
        rngs=rngs,
    )
    model.layer_adapter_kwargs = {name: dict(value) for name, value in layer_kwargs.items()}
    if found.format == "peft":
        model.recorded_peft_config = dict(found.config)
    model.insert_adapters()  # builds every adapter before replacing a layer: a refusal changes nothing
    try:
        if sorted(model.replace_layers) != sorted(adapted):
            raise CheckpointError(
                f"{str(directory)!r} adapts layers {sorted(adapted)[:8]} but the model offers {sorted(model.replace_layers)[:8]}"
            )
        model._load_checked(arrays, metadata, where=where)
    except BaseException:
        _put_back(model, base_model)
        raise
    if found.format == "peft" and (
        layout is not None or getattr(base_model, "peft_layout", None) is not None
    ):
        cast(Any, base_model).peft_layout = layout  # written back in the names it came with
    model.eval()
    return model


def _in_twin_names(
    adapter: peft_format.PeftAdapter[Any], base_model: Any, modules: Mapping[str, Any], *, where: str
) -> tuple[peft_format.PeftAdapter[Any], Any]:
    """Check the PEFT ``adapter`` against ``base_model`` (``modules``: its named modules) in the
    names the adapter uses, and return it in the twin's names, with the layout it came with
    (:func:`_adapter_layout`; None: the twin's own names)."""
    layout = _adapter_layout(base_model, adapter, modules, where=where)
    names = {name: name for name in modules}
    if layout is not None:
        names = {new: name for name in modules if (new := layout.checkpoint_name(name)) is not None}
    peft_format.check_peft_model(
        adapter,
        {
            theirs: (peft_layer_kind(modules[ours]), type(modules[ours]).__name__)
            for theirs, ours in names.items()
        },
        where=where,
        layer_refusal=lambda theirs: peft_layer_refusal(theirs, modules[names[theirs]]),
    )
    if layout is None:
        return adapter, None

    def twin_name(name: str) -> str:
        new = layout.twin_name(name)
        assert new is not None  # _adapter_layout refused every name outside the twin's part
        return str(new)

    return peft_format.renamed_peft_adapter(adapter, twin_name), layout


def _adapter_layout(
    base_model: Any, adapter: peft_format.PeftAdapter[Any], modules: Mapping[str, Any], *, where: str
) -> Any:
    """The names ``adapter`` gives ``base_model``'s layers: None for the twin's own, or the one of
    the twin's ``checkpoint_layouts`` (an adapter trained on the bigger transformers model the twin
    is part of) that places most of its layers and modules, the twin's own names winning a tie.
    Refuses, naming them, layers outside the twin's part (a vision tower's)."""
    named = [*adapter.layers, *adapter.modules_to_save]

    def placed(layout: Any) -> int:
        if layout is None:
            return sum(name in modules for name in named)
        return sum(layout.twin_name(name) in modules or layout.other_part(name) is not None for name in named)

    layout = max([None, *getattr(type(base_model), "checkpoint_layouts", ())], key=placed)
    if layout is None:
        return None
    outside = [name for name in named if layout.twin_name(name) is None]
    if outside:
        prefixes = ", ".join(f"{prefix}*" for prefix, _ in layout.renames)
        example = re.escape(layout.renames[0][0]) + r".*\.(q_proj|v_proj)"
        raise PeftConversionError(
            f"{where!r}: the PEFT adapter adapts {outside[:8]}, outside the {layout.part} of its "
            f"{layout.model_class} ({prefixes}); the Flax {type(base_model).__name__} holds the {layout.part} "
            f"only and cannot load them (nothing was changed). Train the adapter on the {layout.part}'s layers "
            f"alone (PEFT's target_modules as a regular expression such as r'{example}'), or use it in "
            f"PyTorch on the whole {layout.model_class}"
        )
    return layout


def _peft_conv_geometry(conv: nnx.Conv) -> bool:
    """Whether ``conv`` has the geometry of a PyTorch conv PEFT's LoRA conv copies exactly."""
    ones = lambda value: value is None or all(d == 1 for d in ((value,) if isinstance(value, int) else value))  # noqa: E731
    padding = conv.padding
    symmetric = (
        padding == "VALID"
        or isinstance(padding, int)
        or (
            not isinstance(padding, str)
            and all(not isinstance(p, int) and len(p) == 2 and p[0] == p[1] for p in padding)
        )
    )
    return ones(conv.kernel_dilation) and ones(conv.input_dilation) and symmetric


def _adapter_class(name: str, where: str) -> type[LoRA | HoulsbyAdapterLinear]:
    for adapter_class in ADAPTER_CLASSES:
        if adapter_class.adapter_kind.name == name:
            return adapter_class
    raise CheckpointError(
        f"{where!r} holds {name!r} adapters; flax_impl has {[c.adapter_kind.name for c in ADAPTER_CLASSES]}"
    )


def _resolve_kwargs(adapter_class: type, recorded: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Recorded kwargs back to Python values: a class-valued kwarg (Houlsby's ``activation``)
    is recorded as a dotted name, resolved in this twin for the twins' own classes."""
    defaults = signature_defaults(adapter_class)
    out = {}
    for key, value in recorded.items():
        if isinstance(defaults.get(key), type) and isinstance(value, str):
            value = resolve_recorded_class(value, twin="flax_impl", refuse=("torch",), where=where)
        out[key] = value
    return out


def _wrapped(model: Any, name: str) -> Any:
    """The layer the adapter at ``name`` wraps."""
    return getattr(get_submodule(model.adapted_model, name), LORA.wrapped)


def _put_back(model: Any, base_model: nnx.Module) -> None:
    """Undo what building ``model`` did to ``base_model``: the wrapped layers back in place
    (freezing is a filter in NNX: nothing else changed)."""
    for name in model.replace_layers:
        adapter = get_submodule(model.adapted_model, name)
        if name:
            kind = adapter_of(adapter)
            assert kind is not None  # every replace_layers entry holds the adapter this model inserted
            set_submodule(base_model, name, getattr(adapter, kind.wrapped))


def hotswap_adapter(model: Any, path: str | os.PathLike[str], adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Replace the weights of ``model``'s LoRA adapter ``adapter_name`` in place with those saved
    in ``path`` (a PEFT directory or ours, PyTorch layout): PEFT's ``hotswap_adapter``, the twin of
    ``torch_impl.hotswap_adapter``. Same layers and options; a smaller rank is zero-padded, a
    larger refused; another alpha folds into the up factor, so no variable changes shape or
    static attribute and a jitted step is not traced again. Checked before anything is written.
    """
    import jax.numpy as jnp

    from twinformat.adapters import lora_scaling
    from twinformat.kinds import torch_to_flax

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
    plan: list[tuple[Any, Any]] = []
    for layer in spec["layers"]:
        ours = {**spec["adapter_kwargs"], **spec["layer_adapter_kwargs"].get(layer, {})}
        theirs = {**found["adapter_kwargs"], **found["layer_adapter_kwargs"].get(layer, {})}
        for option in ("use_dora", "use_rslora"):
            if bool(ours.get(option)) != bool(theirs.get(option)):
                raise CheckpointError(
                    f"{where!r}: layer {layer!r} has {option}={bool(theirs.get(option))}, adapter {adapter_name!r} "
                    f"{bool(ours.get(option))}; a hot-swap keeps the options"
                )
        wrapper = cast(LoRA, get_submodule(model.adapted_model, layer))
        branch = wrapper.branch(slot)
        embedding = isinstance(wrapper.pretrained_module, nnx.Embed)
        prefix = f"adapted_model.{layer}."
        down = np.asarray(found["tensors"][prefix + "adapter_down_proj.weight"], np.float32)
        up = np.asarray(found["tensors"][prefix + "adapter_up_proj.weight"], np.float32)
        rank_axis = 1 if embedding else 0
        down_variable = branch.adapter_down_proj.embedding if embedding else branch.adapter_down_proj.kernel
        rank = down_variable.shape[-1]
        new_rank = down.shape[rank_axis]
        if new_rank > rank:
            raise CheckpointError(
                f"{where!r}: layer {layer!r} has rank {new_rank}, more than adapter {adapter_name!r}'s {rank}; "
                "build the adapter with the largest rank to swap in"
            )
        factor = lora_scaling({**theirs, "rank": new_rank}) / branch.scaling
        down, up = _pad(down, rank, rank_axis), _pad(up * factor, rank, 1)
        down_kind = "embedding" if embedding else ("conv" if down.ndim > 2 else "linear")
        targets = [
            (down_variable, torch_to_flax(down_kind, "weight", down)[1]),
            (
                branch.adapter_up_proj.kernel,
                torch_to_flax("conv" if up.ndim > 2 else "linear", "weight", up)[1],
            ),
        ]
        if ours.get("use_dora"):
            targets.append(
                (
                    branch.adapter_magnitude,
                    np.asarray(found["tensors"][prefix + "adapter_magnitude"]).reshape(-1),
                )
            )
        for variable, value in targets:
            if tuple(variable.shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{where!r}: layer {layer!r}: a tensor of shape {tuple(value.shape)} for {tuple(variable.shape)}"
                )
            plan.append((variable, value))
    for variable, value in plan:
        old = variable.get_value()
        new = jnp.asarray(value, old.dtype)
        sharding = getattr(old, "sharding", None)
        variable.set_value(jax.device_put(new, sharding) if sharding is not None else new)


def _pad(array: np.ndarray, size: int, axis: int) -> np.ndarray:
    """``array`` zero-padded along ``axis`` to ``size``."""
    missing = size - array.shape[axis]
    if not missing:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, missing)
    return np.pad(array, widths)
