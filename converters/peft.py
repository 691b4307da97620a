"""PEFT interop: import a PEFT LoRA adapter into our adapters, export ours to PEFT.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
(keys ``base_model.model.<layer>.lora_A.weight`` ``(r, in, *k)`` and ``...lora_B.weight``
``(out, r, 1..)``). Ours names the same factors ``adapted_model.<layer>.adapter_down_proj.weight``
and ``...adapter_up_proj.weight``, in the same layouts, so the tensors cross unchanged; what needs
care is the scaling and what each side can express. It never imports ``peft``.

Everything about the format itself (names, key mapping for factors, embedding factors and DoRA
magnitudes, the config's checks and refusals, the options, the patterns, reading and atomic
writing of directories) is :mod:`twinformat.peft_format`'s, which the twins'
``AdaptedModel.save_pretrained``/``from_pretrained`` use too; this module adds what needs a
model: walking it, the geometry of its layers, building an ``AdaptedModel`` of the right twin.

The options cross as they are: ``lora_dropout`` <-> ``dropout``, ``use_rslora`` <-> ``use_rslora``
(``scaling = alpha / sqrt(rank)``: ``alpha = lora_alpha`` exactly), ``use_dora`` <-> ``use_dora``
with ``lora_magnitude_vector`` (``(out,)``; convs ``(1, out, 1..)``) <-> ``adapter_magnitude``
(``(out,)``). Embedding adapters: ``lora_embedding_A`` ``(r, num)`` is our
``adapter_down_proj.weight`` transposed, ``lora_embedding_B`` ``(dim, r)`` our
``adapter_up_proj.weight``.

Several adapters: a PEFT directory in PEFT's multi-adapter layout (``PeftModel.save_pretrained``
of several adapters: ``'default'`` at the root, every other in a subfolder named after it) is
read one adapter at a time (``adapter_name=``), into a model as its named adapters (the twins'
``load_adapter``) or into one of our files; a model or file holding several writes them in that
layout (``selected_adapters=``). One of our files holds several adapters as a model holding them
names its tensors (``state_dict()``): the first at ``adapted_model.<layer>.adapter_down_proj.weight``
as a one-adapter file, every other at ``adapted_model.<layer>.named_adapters.<name>....``; the
metadata records the others (``named_adapters``: JSON ``{name: {adapter_kwargs, adapted_layers,
layer_adapter_kwargs}}``), the first one's name where it is not ``'default'`` (``adapter_name``),
and layers whose rank or alpha differ (``layer_adapter_kwargs``, PEFT's ``rank_pattern`` and
``alpha_pattern``). A file of one adapter with none of these is what it always was.

Refused with :class:`PeftConversionError`, never approximated:

- to PEFT: what the twins' ``save_pretrained`` writes in its own format instead: Houlsby adapters;
  unfrozen layers that hold or sit inside an adapted layer, or share a weight with a module
  outside them; a LoRA on the root module; conv adapters on a dilated conv or a conv with
  ``padding_mode != 'zeros'`` (PEFT's ``lora_A`` conv has neither); and a merged LoRA.
- from PEFT: any ``peft_type`` but LORA; DoRA on embeddings; ``bias != 'none'`` and
  ``lora_bias``; ``fan_in_fan_out``; initialisations that change the base weights (PiSSA, OLoRA,
  LoftQ, CorDA, LoRA-GA); ``target_parameters``, ``trainable_token_indices``,
  ``layer_replication`` and the other variants; tensors other than the LoRA factors, DoRA
  magnitudes and ``modules_to_save``; ``modules_to_save`` of an adapter other than a model's
  or file's first (our unfrozen layers belong to the constructor's adapter).
  ``rank_pattern``/``alpha_pattern`` and ``modules_to_save`` are held as the twins hold them
  (per-layer kwargs, unfrozen layers); :func:`peft_to_adapter_file` takes them only with
  ``full=True`` (the file merge, its other caller, reads one rank and alpha).

Example
-------
>>> import os, tempfile, torch
>>> from torch_impl import AdaptedModel, LoRA
>>> model = AdaptedModel(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoRA, target_layers="0",
...                      adapter_kwargs={"rank": 2, "alpha": 4.0})
>>> folder = os.path.join(tempfile.mkdtemp(), "peft")
>>> export_peft_adapter(model, folder)["target_modules"]
'(?:0)'
>>> adapted, report = import_peft_adapter(folder, torch.nn.Sequential(torch.nn.Linear(4, 4)))
>>> adapted.adapter_kwargs, report.loaded
({'rank': 2, 'alpha': 4.0}, ['adapted_model.0.adapter_down_proj.weight', 'adapted_model.0.adapter_up_proj.weight'])
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from twinformat import peft_format
from twinformat.adapters import LORA, implied_kinds, lora_scaling
from twinformat.errors import PeftConversionError
from twinformat.format import adapter_metadata, parse_metadata
from twinformat.peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, PeftAdapter
from twinformat.report import KeyReport

from .files import TensorFile, write_safetensors
from .rename import RenameRule, module_renamer
from .sides import framework_of, model_state

__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "PeftAdapter",
    "PeftConversionError",
    "export_peft_adapter",
    "import_peft_adapter",
    "peft_adapter_names",
    "peft_to_adapter_file",
    "read_peft_adapter",
]

_OURS_PREFIX = peft_format.OURS_PREFIX
_DEFAULT = peft_format.DEFAULT_ADAPTER_NAME
_FACTOR_NAMES = (peft_format.DOWN, peft_format.UP, peft_format.MAGNITUDE)
#: Metadata of our files holding several adapters (see the module docstring).
_NAMED_ADAPTERS, _ADAPTER_NAME, _LAYER_KWARGS = "named_adapters", "adapter_name", "layer_adapter_kwargs"


def peft_adapter_names(directory: str | os.PathLike[str]) -> list[str]:
    """The adapters of a PEFT directory in PEFT's multi-adapter layout (``'default'`` at the
    root, every other in ``<name>/``): :func:`twinformat.peft_format.peft_adapter_names`."""
    return peft_format.peft_adapter_names(directory)


def read_peft_adapter(
    directory: str | os.PathLike[str], *, adapter_name: str | None = None, full: bool = True
) -> PeftAdapter[np.ndarray]:
    """Read and check a PEFT LoRA adapter directory (:func:`twinformat.peft_format.peft_adapter`);
    raises :class:`PeftConversionError` for anything our LoRA cannot compute exactly.

    ``adapter_name`` picks an adapter of PEFT's multi-adapter layout (``'default'``, the root, by
    default; any other from its subfolder); an adapter the directory does not hold is refused,
    naming those it holds. ``full`` (the default) holds what the twins hold: layers of different
    ranks or alphas (``rank_pattern``/``alpha_pattern``, in :attr:`PeftAdapter.layer_kwargs`) and
    ``modules_to_save`` (:attr:`PeftAdapter.modules_to_save`); False refuses both by name, for a
    reader of one rank and alpha.
    """
    found = peft_format.read_peft_directory(peft_format.peft_adapter_directory(directory, adapter_name))

    def read(path: Path) -> dict[str, np.ndarray]:
        with TensorFile(path) as weights:
            return {key: weights.get(key) for key in weights.names}

    adapter = peft_format.load_peft_adapter(found, read, allow_patterns=full, allow_modules_to_save=full)
    adapter.tensors = {key: np.ascontiguousarray(value) for key, value in adapter.tensors.items()}
    return adapter


def import_peft_adapter(
    directory: str | os.PathLike[str],
    model: Any,
    *,
    adapter_name: str | None = None,
    rngs: Any = None,
    strict: bool = True,
    is_trainable: bool = False,
) -> tuple[Any, KeyReport]:
    """Load a PEFT LoRA adapter into our adapters, in either framework.

    Parameters
    ----------
    directory : path
        The PEFT adapter directory (``save_pretrained`` output); in PEFT's multi-adapter layout,
        ``adapter_name`` picks the adapter.
    model : torch.nn.Module or flax.nnx.Module
        Either the base model, which is then wrapped in a new ``AdaptedModel`` by the twin's
        ``AdaptedModel.from_pretrained`` (LoRA on exactly the PEFT adapter's layers, with its
        ranks, alphas and options, per-layer ones included, and ``modules_to_save`` as unfrozen
        layers; the base model's layers are replaced in place), or an existing LoRA
        ``AdaptedModel``: its adapter of that name (default: its default adapter) is overwritten
        when it has the same layers, ranks and scalings; an adapter name it does not hold yet is
        added by the twin's ``load_adapter`` (inactive, as PEFT's ``load_adapter``).
    adapter_name : str, optional
        Which adapter of ``directory`` to read (PEFT's multi-adapter layout: ``'default'`` at the
        root, every other in ``<name>/``), and its name in the model. An adapter the directory
        does not hold is refused, naming those it holds.
    rngs : nnx.Rngs, optional
        For a Flax model: the new adapters' initial weights (overwritten at once). Default
        ``nnx.Rngs(0)``.
    strict : bool
        Passed to the load into an existing adapter (see :func:`converters.torch_to_flax`).
    is_trainable : bool
        As ``PeftModel.from_pretrained``: by default the model is returned in eval mode (dropout
        off, as PEFT loads for inference); True leaves a base model's training mode as it was
        and an existing model's mode as it is, for further training.

    Returns
    -------
    (AdaptedModel, KeyReport)
        The report's ``loaded`` lists the adapter's keys as a one-adapter model names them.

    Example
    -------
    >>> import tempfile, torch
    >>> from torch_impl import AdaptedModel, LoRA
    >>> def net():
    ...     torch.manual_seed(0)
    ...     return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> model = AdaptedModel(net(), LoRA, target_layers="0", adapter_kwargs={"rank": 2})
    >>> model.add_adapter("french", LoRA, ["0", "1"], adapter_kwargs={"rank": 1})
    >>> folder = tempfile.mkdtemp() + "/peft"
    >>> export_peft_adapter(model, folder, selected_adapters=["default", "french"])["french"]["r"]
    1
    >>> adapted, _ = import_peft_adapter(folder, net())
    >>> adapted, report = import_peft_adapter(folder, adapted, adapter_name="french")
    >>> adapted.adapters, report.loaded[-1]
    (['default', 'french'], 'adapted_model.1.adapter_up_proj.weight')
    """
    folder = peft_format.peft_adapter_directory(directory, adapter_name)
    framework = framework_of(model)
    if framework is None:
        raise TypeError(f"expected a torch.nn.Module or a flax.nnx.Module, got {type(model).__name__}")
    if _is_adapted_model(model) and adapter_name in (None, model.default_adapter_name):
        adapter = read_peft_adapter(folder)
        _check_existing(model, adapter)
        from .convert import load_into

        if getattr(model, "named_adapter_specs", None):
            # The model's other adapters are no part of this one: checked key by key here, then
            # left out of what a strict load would call missing.
            if strict:
                _check_same_keys(model, adapter.tensors, str(folder))
            report = load_into(adapter.tensors, model, strict=False)
            report.missing = [key for key in report.missing if ".named_adapters." not in key]
        else:
            report = load_into(adapter.tensors, model, strict=strict)
        report.notes = adapter.notes + report.notes
        adapted = model
    else:
        # The twins' own readers: the same checks, per-layer kwargs, modules_to_save and names.
        notes = peft_format.check_peft_config(
            peft_format.read_peft_directory(folder).config,
            str(folder / PEFT_CONFIG_NAME),
            allow_modules_to_save=True,
        )
        training = _training(model, framework)
        if _is_adapted_model(model):
            assert adapter_name is not None
            if framework == "torch":
                model.load_adapter(folder, adapter_name)
            else:
                model.load_adapter(folder, adapter_name, rngs=_rngs(rngs))
            adapted, name = model, adapter_name
        else:
            name = adapter_name or _DEFAULT
            adapted = _twin_class(framework).from_pretrained(
                model, folder, adapter_name=name, **({} if framework == "torch" else {"rngs": _rngs(rngs)})
            )
            if is_trainable and training:
                adapted.train()
        report = KeyReport(loaded=list(adapted.adapter_state_dict(name)), notes=notes)
    if not is_trainable:
        adapted.eval()
    return adapted, report


def export_peft_adapter(
    source: Any,
    directory: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    selected_adapters: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    conv_geometry_checked: bool = False,
    rename: Sequence[RenameRule] | None = None,
) -> dict[str, Any]:
    """Write our LoRA adapters as PEFT adapter directories that ``PeftModel.from_pretrained``
    (then ``load_adapter`` for the others) loads.

    Parameters
    ----------
    source : AdaptedModel or path
        A LoRA ``AdaptedModel`` of either framework, or an adapter checkpoint written by a
        ``saver`` or by :func:`peft_to_adapter_file` (``.safetensors`` or SpeechBrain ``.ckpt``
        with metadata); either may hold several named adapters.
    directory : path
        Created if needed; ``adapter_config.json`` and ``adapter_model.safetensors`` are written
        atomically (an existing adapter there is replaced only once both are written).
    adapter_name : str, optional
        Write this adapter alone, as a one-adapter directory (PEFT loads it with
        ``from_pretrained(base, directory)``). An adapter the source does not hold is refused,
        naming those it holds.
    selected_adapters : list of str, optional
        Write these adapters in PEFT's multi-adapter layout: ``'default'`` at the root of
        ``directory``, every other in ``directory/<name>``. The default, with neither argument:
        the one adapter of a one-adapter source as a one-adapter directory (what this function
        always wrote), every adapter of a source holding several in the layout.
    base_model_name_or_path, task_type : str, optional
        Recorded in every config for PEFT's convenience.
    conv_geometry_checked : bool
        A file does not record its convs' dilation and padding mode, which PEFT's LoRA conv
        cannot express: exporting conv adapters from a file needs this set to True, confirming
        the wrapped convs use dilation 1 and ``padding_mode='zeros'``.
    rename : list of (pattern, replacement), optional
        Rename the adapters' modules (the layers they adapt and the modules they hold whole) to
        the names of the model PEFT will load them into, e.g. ``[("model.*",
        "model.language_model.*")]`` for ``Gemma3ForConditionalGeneration``: glob or ``re:``
        rules matched against module names, first match wins, a rule that matches no module is
        refused (:func:`converters.rename.module_renamer`).

    Returns
    -------
    dict
        The PEFT config written; ``{name: config}`` for the multi-adapter layout.

    Every adapter is checked (the twins' ``save_pretrained`` refusals: Houlsby adapters, a merged
    LoRA, unfrozen layers PEFT's ``modules_to_save`` cannot hold, convs PEFT's LoRA computes
    otherwise, ...) before anything is written.
    """
    if adapter_name is not None and selected_adapters is not None:
        raise TypeError("give adapter_name (one adapter) or selected_adapters (several), not both")
    if _is_adapted_model(source):
        available, where = list(source.adapters), "this model"
        read = lambda name: _model_adapter(source, name)  # noqa: E731
    elif isinstance(source, (str, os.PathLike)):
        held = _file_adapters(source, conv_geometry_checked)
        available, where = list(held), repr(str(source))
        read = held.__getitem__
    else:
        raise TypeError(
            f"source must be a LoRA AdaptedModel or an adapter file path, got {type(source).__name__}"
        )
    if selected_adapters is not None:
        names, layout = _selected(selected_adapters), True
    elif adapter_name is not None:
        names, layout = [adapter_name], False
    else:
        names, layout = list(available), len(available) > 1
    unknown = [name for name in names if name not in available]
    if unknown:
        raise PeftConversionError(f"no adapter named {unknown[0]!r}; {where} holds {available}")
    adapters = {name: read(name) for name in names}
    if rename:
        renaming, _ = module_renamer(_modules_of(adapters.values()), rename)
        adapters = {name: peft_format.renamed_peft_adapter(a, renaming) for name, a in adapters.items()}
    elif _is_adapted_model(source) and getattr(source.adapted_model, "peft_layout", None) is not None:
        # A twin read from a bigger model's checkpoint (Gemma 3's multimodal) records the names
        # PEFT gives its layers there; the twins' save_pretrained writes those, and so do we.
        adapters = {
            name: peft_format.renamed_peft_adapter(
                adapter, peft_format.layout_renamer(source.adapted_model.peft_layout)
            )
            for name, adapter in adapters.items()
        }
    written: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
    for name, adapter in adapters.items():
        try:
            written[name] = _peft_files(adapter, base_model_name_or_path, task_type, str(source))
        except PeftConversionError as exc:
            raise PeftConversionError(
                f"adapter {name!r}: {exc}" if len(available) > 1 else str(exc)
            ) from None
    if not layout:
        config, tensors = written[names[0]]
        _write_peft(directory, config, tensors)
        return config
    folder = Path(directory)
    if not folder.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(folder)!r}: folder {str(folder.parent)!r} does not exist")
    folder.mkdir(exist_ok=True)
    for name, (config, tensors) in written.items():
        _write_peft(peft_format.peft_adapter_subdirectory(folder, name), config, tensors)
    return {name: config for name, (config, _) in written.items()}


def peft_to_adapter_file(
    directory: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    selected_adapters: Sequence[str] | None = None,
    full: bool = False,
    rename: Sequence[RenameRule] | None = None,
) -> KeyReport:
    """Write a PEFT LoRA adapter as one of our adapter checkpoints (``.safetensors``, torch
    layout, with metadata), loadable by either twin's ``AdaptedModel.loader``.

    ``adapter_name`` picks the adapter of a directory in PEFT's multi-adapter layout (default
    ``'default'``, the root); ``selected_adapters`` writes several into one file, the first as a
    one-adapter file holds it and every other under ``named_adapters.<name>`` (see the module
    docstring), which :func:`export_peft_adapter` writes back in PEFT's layout. ``full`` takes
    ``rank_pattern``/``alpha_pattern`` that give layers different ranks or alphas (recorded as
    ``layer_adapter_kwargs``) and ``modules_to_save`` (the first adapter's unfrozen layers);
    without it they are refused, since :func:`converters.merge_adapter_file` reads one rank and
    alpha. A one-adapter directory with neither writes what this function always wrote.
    ``rename`` renames the adapters' modules (adapted layers, ``modules_to_save``, and with them
    their tensors, per-layer ranks and alphas and recorded kinds) to the names of the model that
    will load the file: glob or ``re:`` rules matched against PEFT's module names, e.g.
    ``[("model.language_model.*", "model.*")]`` from ``Gemma3ForConditionalGeneration`` to the
    text twin; first match wins, and a rule that matches no module is refused before anything is
    written (:func:`converters.rename.module_renamer`).

    >>> import os, tempfile, torch
    >>> from torch_impl import AdaptedModel, LoRA
    >>> model = AdaptedModel(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoRA, target_layers="0")
    >>> model.add_adapter("french", LoRA, "0", adapter_kwargs={"rank": 2})
    >>> folder = tempfile.mkdtemp()
    >>> _ = export_peft_adapter(model, os.path.join(folder, "peft"))  # both adapters: the layout
    >>> report = peft_to_adapter_file(os.path.join(folder, "peft"), os.path.join(folder, "both.safetensors"),
    ...                               selected_adapters=["default", "french"])
    >>> report.loaded[-1]
    'adapted_model.0.named_adapters.french.adapter_up_proj.weight'
    """
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"the adapter file must be a .safetensors file, got {str(path)!r}")
    if adapter_name is not None and selected_adapters is not None:
        raise TypeError("give adapter_name (one adapter) or selected_adapters (several), not both")
    names = [adapter_name or _DEFAULT] if selected_adapters is None else _selected(selected_adapters)
    adapters = {name: read_peft_adapter(directory, adapter_name=name, full=full) for name in names}
    rename_notes: list[str] = []
    if rename:
        renaming, rename_notes = module_renamer(_modules_of(adapters.values()), rename)
        adapters = {name: peft_format.renamed_peft_adapter(a, renaming) for name, a in adapters.items()}
    first, adapter = names[0], adapters[names[0]]
    metadata = adapter_metadata(
        framework="peft",
        adapter_class="LoRA",
        adapter_kwargs=adapter.adapter_kwargs,
        target_layers=[peft_format.escape_glob(layer) for layer in adapter.layers],
        unfrozen_layers=[peft_format.escape_glob(module) for module in adapter.modules_to_save],
    )
    if adapter.layer_kwargs:
        metadata[_LAYER_KWARGS] = json.dumps(adapter.layer_kwargs, sort_keys=True)
    if first != _DEFAULT:
        metadata[_ADAPTER_NAME] = first
    # Recorded so that a conversion never has to guess an embedding adapter's layout.
    kinds = _embedding_kinds(f"{_OURS_PREFIX}{{layer}}", adapter.embeddings)
    tensors = dict(adapter.tensors)
    notes = [*rename_notes, *adapter.notes]
    named: dict[str, dict[str, Any]] = {}
    for name in names[1:]:
        other = adapters[name]
        if other.modules_to_save:
            raise PeftConversionError(
                f"adapter {name!r} has modules_to_save {other.modules_to_save[:8]}: only the first adapter of one "
                f"of our files holds unfrozen layers ({first!r} here); write {name!r} to a file of its own"
            )
        named[name] = {
            "adapter_kwargs": other.adapter_kwargs,
            "adapted_layers": other.layers,
            _LAYER_KWARGS: other.layer_kwargs,
        }
        kinds.update(_embedding_kinds(f"{_OURS_PREFIX}{{layer}}.named_adapters.{name}", other.embeddings))
        for layer in other.layers:
            for factor in _FACTOR_NAMES:
                key = f"{_OURS_PREFIX}{layer}.{factor}"
                if key in other.tensors:
                    tensors[f"{_OURS_PREFIX}{layer}.named_adapters.{name}.{factor}"] = other.tensors[key]
        notes += [f"adapter {name!r}: {note}" for note in other.notes]
    if named:
        metadata[_NAMED_ADAPTERS] = json.dumps(named, sort_keys=True)
    if kinds:
        metadata["layer_kinds"] = json.dumps(kinds, sort_keys=True)
    write_safetensors(path, tensors, metadata)
    return KeyReport(loaded=list(tensors), notes=notes)


# --- reading PEFT ------------------------------------------------------------------------------


def _embedding_kinds(prefix: str, embeddings: Sequence[str]) -> dict[str, str]:
    kinds = {}
    for layer in embeddings:
        path = prefix.format(layer=layer)
        kinds[f"{_OURS_PREFIX}{layer}.{LORA.wrapped}"] = "embedding"
        kinds[f"{path}.adapter_down_proj"] = "embedding"
        kinds[f"{path}.adapter_up_proj"] = "linear"
    return kinds


def _modules_of(adapters: Any) -> list[str]:
    """The modules the adapters (:class:`PeftAdapter` or :class:`_Adapter`) adapt or hold whole."""
    return [module for adapter in adapters for module in (*adapter.layers, *adapter.modules_to_save)]


def _selected(names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not names or len(set(names)) != len(names):
        raise ValueError(f"selected_adapters must be a list of distinct adapter names, got {names!r}")
    return list(names)


def _rngs(rngs: Any) -> Any:
    if rngs is not None:
        return rngs
    from flax import nnx

    return nnx.Rngs(0)


def _twin_class(framework: str) -> Any:
    """The twin's ``AdaptedModel`` class."""
    if framework == "torch":
        from torch_impl import AdaptedModel

        return AdaptedModel
    from flax_impl import AdaptedModel as FlaxAdaptedModel

    return FlaxAdaptedModel


def _training(model: Any, framework: str) -> bool:
    """Whether ``model`` is in training mode (Flax: a dropout of it is not deterministic)."""
    if framework == "torch":
        return bool(model.training)
    from flax import nnx

    from flax_impl.graph import named_modules

    return any(isinstance(m, nnx.Dropout) and not m.deterministic for _, m in named_modules(model))


def _check_peft_geometry(layer: str, module: Any, framework: str) -> None:
    """Refuse a layer PEFT's LoRA computes differently from ours (the twin's
    ``peft_layer_refusal``: a conv of dilation > 1, a scaled embedding, ...)."""
    if not _is_lora_layer(module, framework):
        raise PeftConversionError(
            f"layer {layer!r} is a {type(module).__name__}; our LoRA wraps Linear, Conv and Embedding layers"
        )
    refusal = _twin(framework).peft_layer_refusal(layer, module)
    if refusal is not None:
        raise PeftConversionError(refusal)


def _twin(framework: str) -> Any:
    """The twin's ``pretrained`` module: its PEFT layer kinds, geometry and refusals."""
    if framework == "torch":
        import torch_impl.pretrained

        return torch_impl.pretrained
    import flax_impl.pretrained

    return flax_impl.pretrained


def _lora_kind(module: Any, framework: str) -> str | None:
    """``'linear'``, ``'conv'`` or ``'embedding'`` for a layer our LoRA wraps, else None."""
    kind: str | None = _twin(framework).peft_layer_kind(module)
    return kind


def _is_lora_layer(module: Any, framework: str) -> bool:
    return _lora_kind(module, framework) is not None


def _is_embedding(module: Any, framework: str) -> bool:
    return _lora_kind(module, framework) == "embedding"


def _is_adapted_model(model: Any) -> bool:
    return (
        framework_of(model) is not None
        and hasattr(model, "adapter_class")
        and hasattr(model, "replace_layers")
    )


def _check_existing(model: Any, adapter: PeftAdapter) -> None:
    """The PEFT adapter has the default adapter's class, layers, ranks, scalings and DoRA, layer
    by layer, so its tensors overwrite that adapter's."""
    adapter_class = getattr(model.adapter_class, "__name__", str(model.adapter_class))
    if adapter_class != "LoRA":
        raise PeftConversionError(
            f"the target AdaptedModel uses {adapter_class} adapters; a PEFT LoRA adapter needs LoRA"
        )
    shown = ("rank", "alpha", "use_rslora", "use_dora")
    ours_per_layer = getattr(model, "layer_adapter_kwargs", {}) or {}
    for layer in adapter.layers:
        kwargs = LORA.kwargs({**model.adapter_kwargs, **ours_per_layer.get(layer, {})})
        theirs = LORA.kwargs({**adapter.adapter_kwargs, **adapter.layer_kwargs.get(layer, {})})
        if (
            kwargs["rank"] != theirs["rank"]
            or kwargs["use_dora"] != theirs["use_dora"]
            or not math.isclose(lora_scaling(kwargs), lora_scaling(theirs))
        ):
            on = f" on layer {layer!r}" if ours_per_layer or adapter.layer_kwargs else ""
            raise PeftConversionError(
                f"the target AdaptedModel has {', '.join(f'{k}={kwargs[k]!r}' for k in shown)}{on}, the PEFT "
                f"adapter {', '.join(f'{k}={theirs[k]!r}' for k in shown)}"
            )
    if sorted(model.replace_layers) != sorted(adapter.layers):
        raise PeftConversionError(
            f"the target AdaptedModel adapts {sorted(model.replace_layers)[:8]}, the PEFT adapter "
            f"{sorted(adapter.layers)[:8]}"
        )
    framework = _framework(model)
    for layer in adapter.layers:
        _check_peft_geometry(layer, _wrapped(_submodule(model.adapted_model, layer, framework)), framework)


def _check_same_keys(model: Any, tensors: dict[str, np.ndarray], where: str) -> None:
    """``tensors`` are exactly the default adapter's keys and shapes (its factors, magnitudes and
    unfrozen layers), as a strict load would check them in a model of one adapter."""
    expected = {
        key: tuple(np.shape(value))
        for key, value in model.adapter_state_dict(model.default_adapter_name).items()
    }
    given = {key: tuple(value.shape) for key, value in tensors.items()}
    if expected != given:
        missing = sorted(set(expected) - set(given))
        unexpected = sorted(set(given) - set(expected))
        shaped = sorted(k for k in set(given) & set(expected) if given[k] != expected[k])
        raise PeftConversionError(
            f"{where!r} does not fit adapter {model.default_adapter_name!r} of the target AdaptedModel: missing "
            f"{missing[:8]}, unexpected {unexpected[:8]}, mis-shaped {shaped[:8]}"
        )


# --- writing PEFT ------------------------------------------------------------------------------


@dataclass
class _Adapter:
    """One LoRA adapter to write in PEFT's format: its layers, kwargs (defaults filled in) and
    per-layer kwargs, its tensors in one-adapter keys (torch layout), the layers that wrap an
    embedding, and the modules PEFT saves whole."""

    layers: list[str]
    kwargs: dict[str, Any]
    tensors: dict[str, np.ndarray]
    embeddings: list[str] = field(default_factory=list)
    layer_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)


def _peft_files(
    adapter: _Adapter, base_model_name_or_path: str | None, task_type: str | None, where: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if "" in adapter.layers:
        raise PeftConversionError("the LoRA adapter wraps the root module itself, which PEFT cannot target")
    return peft_format.peft_files(
        adapter.tensors,
        adapter.layers,
        adapter.kwargs,
        embeddings=adapter.embeddings,
        base_model_name_or_path=base_model_name_or_path,
        where=where,
        layer_kwargs=adapter.layer_kwargs,
        modules_to_save=adapter.modules_to_save,
        task_type=task_type,
    )


def _write_peft(
    directory: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> None:
    peft_format.write_adapter_directory(
        directory,
        peft=True,
        config=config,
        write_weights=lambda path: write_safetensors(path, tensors, {"format": "pt"}),
    )


def _model_adapter(model: Any, name: str) -> _Adapter:
    """Adapter ``name`` of a model, read through its public per-adapter state and checked with
    the refusals of the twin's ``save_pretrained``."""
    framework = _framework(model)
    default = name == model.default_adapter_name
    spec = None if default else model.named_adapter_specs[name]
    view = SimpleNamespace(
        adapted_model=model.adapted_model,
        adapter_class=model.adapter_class if spec is None else spec["adapter_class"],
        adapter_kwargs=model.adapter_kwargs if spec is None else spec["adapter_kwargs"],
        replace_layers=list(model.replace_layers if spec is None else spec["layers"]),
        unfrozen_module_names=list(model.unfrozen_module_names) if default else [],
        layer_adapter_kwargs=dict(
            (model.layer_adapter_kwargs if spec is None else spec["layer_adapter_kwargs"]) or {}
        ),
    )
    refusal = _twin(framework).peft_refusal(view, full=True)  # what the twin's save_pretrained refuses
    if refusal is not None:
        raise PeftConversionError(refusal)
    for layer in view.replace_layers:
        if getattr(_submodule(model.adapted_model, layer, framework), "merged", False):
            raise PeftConversionError(
                f"layer {layer!r} is merged into its base weight; unmerge_lora(model) first"
            )
    embeddings = [
        layer
        for layer in view.replace_layers
        if _is_embedding(_wrapped(_submodule(model.adapted_model, layer, framework)), framework)
    ]
    modules = _outermost(view.unfrozen_module_names)
    if default and not modules:
        # A one-adapter model's factors, read as this function always read them (byte for byte).
        state = model_state(model)
        keys = [
            k
            for k in state.specs
            if k.endswith((".adapter_down_proj.weight", ".adapter_up_proj.weight", ".adapter_magnitude"))
            and ".named_adapters." not in k
        ]
        tensors = {k: np.ascontiguousarray(state.read(k)) for k in keys}
    else:
        tensors = {
            k: _to_numpy(v)
            for k, v in model.adapter_state_dict(name).items()
            if k.endswith(tuple(f".{f}" for f in _FACTOR_NAMES))
            or any(k.startswith(f"{_OURS_PREFIX}{m}.") for m in modules)
        }
    return _Adapter(
        view.replace_layers,
        LORA.kwargs(view.adapter_kwargs),
        tensors,
        embeddings,
        view.layer_adapter_kwargs,
        modules,
    )


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        from torch_impl.interchange import tensor_to_numpy

        return tensor_to_numpy(value.detach())
    return np.ascontiguousarray(np.asarray(value))


def _outermost(names: Sequence[str]) -> list[str]:
    """``names`` without those that lie inside another of them (PEFT saves the outermost)."""
    return [n for n in names if not any(n != o and (not o or n.startswith(f"{o}.")) for o in names)]


def _file_adapters(path: Any, conv_geometry_checked: bool) -> dict[str, _Adapter]:
    """The adapters of one of our files, by name, the first (the file's one-adapter keys) first."""
    where = str(path)
    with TensorFile(path) as tensor_file:
        if tensor_file.layout != "torch":
            raise PeftConversionError(f"{where!r} is in Flax layout; convert it to torch layout first")
        meta = parse_metadata(tensor_file.metadata)
        adapter_class = meta.get("adapter_class") or ""
        if adapter_class != "LoRA":
            raise PeftConversionError(
                f"{where!r} holds {adapter_class or 'unknown (no metadata)'} adapters; only LoRA adapter files "
                "with their adapter_kwargs in the metadata export to PEFT"
            )
        tensors = {name: tensor_file.get(name) for name in tensor_file.names}
        specs = {name: tensor_file.spec(name) for name in tensor_file.names}
        recorded_kinds = dict(tensor_file.layer_kinds)
        kinds = implied_kinds(tensor_file.names, specs, LORA, tensor_file.layer_kinds)
    named = _json_field(meta, _NAMED_ADAPTERS, where, {})
    first = meta.get(_ADAPTER_NAME) or _DEFAULT
    if not isinstance(first, str) or first in named:
        raise PeftConversionError(f"{where!r}: metadata {_ADAPTER_NAME!r} must name the file's first adapter")
    own = {k: v for k, v in tensors.items() if ".named_adapters." not in k}
    adapters = {
        first: _file_adapter(
            own,
            LORA.kwargs(meta.get("adapter_kwargs") or {}),
            _json_field(meta, _LAYER_KWARGS, where, {}),
            meta.get("unfrozen_layers") or [],
            lambda layer: kinds.get(f"{_OURS_PREFIX}{layer}.adapter_down_proj") == "embedding",
            where,
            conv_geometry_checked,
        )
    }
    for name, spec in named.items():
        marker = f".named_adapters.{name}."
        mine = {k.replace(marker, "."): v for k, v in tensors.items() if marker in k}
        if not isinstance(spec, dict) or not mine:
            raise PeftConversionError(
                f"{where!r}: metadata {_NAMED_ADAPTERS!r} names adapter {name!r}, which has no tensors"
            )
        prefix = f"{_OURS_PREFIX}{{}}.named_adapters.{name}.adapter_down_proj"
        adapters[name] = _file_adapter(
            mine,
            LORA.kwargs(spec.get("adapter_kwargs") or {}),
            spec.get(_LAYER_KWARGS) or {},
            [],
            lambda layer, prefix=prefix: (
                (recorded_kinds.get(prefix.format(layer)) or kinds.get(prefix.format(layer))) == "embedding"
            ),
            f"{where} (adapter {name!r})",
            conv_geometry_checked,
        )
    stray = [
        k
        for k in tensors
        if ".named_adapters." in k and k.split(".named_adapters.")[1].split(".")[0] not in named
    ]
    if stray:
        raise PeftConversionError(
            f"{where!r}: {stray[0]!r} belongs to an adapter its metadata {_NAMED_ADAPTERS!r} does not record"
        )
    return adapters


def _file_adapter(
    tensors: dict[str, np.ndarray],
    kwargs: dict[str, Any],
    layer_kwargs: dict[str, dict[str, Any]],
    unfrozen: Sequence[str],
    is_embedding: Any,
    where: str,
    conv_geometry_checked: bool,
) -> _Adapter:
    """One adapter of a file, from its one-adapter keys: LoRA factors, DoRA magnitudes and the
    tensors of its unfrozen layers (PEFT's ``modules_to_save``), checked against its ranks."""
    layers = []
    modules: list[str] = []
    for key, array in tensors.items():
        if key.endswith(".adapter_magnitude"):
            continue
        match = re.fullmatch(r"adapted_model\.(.*)\.adapter_(down|up)_proj\.weight", key)
        if match is None:
            module = _unfrozen_module(key, unfrozen)
            if module is None:
                raise PeftConversionError(
                    f"{where!r}: {key!r} is not a LoRA factor (unfrozen layers would need PEFT's modules_to_save)"
                )
            if module not in modules:
                modules.append(module)
            continue
        if match.group(2) == "down":
            layers.append(match.group(1))
            if array.ndim > 2 and not conv_geometry_checked:
                raise PeftConversionError(
                    f"{where!r}: layer {match.group(1)!r} has a conv adapter; the file does not record the conv's "
                    "dilation and padding mode, which PEFT cannot express unless 1 and 'zeros'. Confirm with "
                    "conv_geometry_checked=True (CLI --conv-geometry-checked)"
                )
    embeddings = [n for n in layers if is_embedding(n)]
    for layer in layers:
        rank = LORA.kwargs({**kwargs, **layer_kwargs.get(layer, {})})["rank"]
        down = tensors.get(f"{_OURS_PREFIX}{layer}.adapter_down_proj.weight")
        up = tensors.get(f"{_OURS_PREFIX}{layer}.adapter_up_proj.weight")
        down_rank = None if down is None else down.shape[1] if layer in embeddings else down.shape[0]
        if up is None or down_rank != rank or up.shape[1] != rank:
            raise PeftConversionError(
                f"{where!r}: layer {layer!r} lacks a factor or does not have rank {rank}"
            )
        if kwargs["use_dora"] and f"{_OURS_PREFIX}{layer}.adapter_magnitude" not in tensors:
            raise PeftConversionError(
                f"{where!r}: layer {layer!r} is recorded as DoRA but has no adapter_magnitude"
            )
    refusal = peft_format.modules_to_save_refusal(modules, layers)
    if refusal is not None:
        raise PeftConversionError(f"{where!r}: {refusal}")
    return _Adapter(
        layers, kwargs, tensors, embeddings, {k: dict(v) for k, v in layer_kwargs.items()}, modules
    )


def _unfrozen_module(key: str, patterns: Sequence[str]) -> str | None:
    """The module of ``key`` (``adapted_model.<module>.<tensor>``) that one of the file's
    ``unfrozen_layers`` patterns selects (the shortest), or None."""
    if not key.startswith(_OURS_PREFIX) or not patterns:
        return None
    parts = key[len(_OURS_PREFIX) :].split(".")
    for end in range(1, len(parts)):
        module = ".".join(parts[:end])
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return module
    return None


def _json_field(meta: dict[str, Any], key: str, where: str, default: Any) -> Any:
    raw = meta.get(key)
    if raw is None:
        return default
    try:
        value = json.loads(raw)
    except (TypeError, ValueError, RecursionError):
        raise PeftConversionError(f"{where!r}: metadata {key!r} is not valid JSON") from None
    if not isinstance(value, dict):
        raise PeftConversionError(f"{where!r}: metadata {key!r} must be a JSON object")
    return value


def _submodule(model: Any, name: str, framework: str) -> Any:
    if not name:
        return model
    if framework == "torch":
        return model.get_submodule(name)
    from flax_impl.graph import get_submodule

    return get_submodule(model, name)


def _wrapped(lora: Any) -> Any:
    return lora.pretrained_module


def _framework(model: Any) -> str:
    """``'torch'`` or ``'flax'`` for an AdaptedModel of either twin (refused otherwise)."""
    framework = framework_of(model)
    if framework is None:
        raise TypeError(f"expected a torch_impl or flax_impl AdaptedModel, got {type(model).__name__}")
    return framework
