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

Refused with :class:`PeftConversionError`, never approximated:

- to PEFT: Houlsby adapters; ``unfrozen_layers`` (PEFT's ``modules_to_save`` is not written);
  a merged LoRA; a LoRA on the root module; conv adapters on a dilated conv or a conv with
  ``padding_mode != 'zeros'`` (PEFT's ``lora_A`` conv has neither).
- from PEFT: any ``peft_type`` but LORA; DoRA on embeddings; ``modules_to_save``;
  ``bias != 'none'`` and ``lora_bias``; ``fan_in_fan_out``; initialisations that change the base
  weights (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA); ``target_parameters``,
  ``trainable_token_indices``, ``layer_replication`` and the other variants; per-layer ranks or
  alphas (``rank_pattern``/``alpha_pattern``) that differ, since our AdaptedModel has one rank
  and alpha; tensors other than the LoRA factors and DoRA magnitudes named above.

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

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from twinformat import peft_format
from twinformat.adapters import LORA, implied_kinds, lora_scaling
from twinformat.errors import PeftConversionError
from twinformat.format import adapter_metadata, parse_metadata
from twinformat.peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, PeftAdapter
from twinformat.report import KeyReport

from .files import TensorFile, write_safetensors
from .sides import framework_of, model_state

__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "PeftAdapter",
    "PeftConversionError",
    "export_peft_adapter",
    "import_peft_adapter",
    "peft_to_adapter_file",
    "read_peft_adapter",
]

_OURS_PREFIX = peft_format.OURS_PREFIX


def read_peft_adapter(directory: str | os.PathLike[str]) -> PeftAdapter[np.ndarray]:
    """Read and check a PEFT LoRA adapter directory (:func:`twinformat.peft_format.peft_adapter`);
    raises :class:`PeftConversionError` for anything our LoRA cannot compute exactly."""
    found = peft_format.read_peft_directory(directory)

    def read(path: Path) -> dict[str, np.ndarray]:
        with TensorFile(path) as weights:
            return {key: weights.get(key) for key in weights.names}

    adapter = peft_format.load_peft_adapter(found, read)
    adapter.tensors = {key: np.ascontiguousarray(value) for key, value in adapter.tensors.items()}
    return adapter


def import_peft_adapter(
    directory: str | os.PathLike[str],
    model: Any,
    *,
    rngs: Any = None,
    strict: bool = True,
    is_trainable: bool = False,
) -> tuple[Any, KeyReport]:
    """Load a PEFT LoRA adapter into our adapters, in either framework.

    Parameters
    ----------
    directory : path
        The PEFT adapter directory (``save_pretrained`` output).
    model : torch.nn.Module or flax.nnx.Module
        Either the base model, which is then wrapped in a new ``AdaptedModel`` with LoRA on
        exactly the PEFT adapter's layers and its rank and alpha (the base model's layers are
        replaced in place), or an existing LoRA ``AdaptedModel`` with the same layers, rank and
        scaling, whose adapters are overwritten.
    rngs : nnx.Rngs, optional
        For a Flax base model: the adapters' initial weights (overwritten at once). Default
        ``nnx.Rngs(0)``.
    strict : bool
        Passed to the load (see :func:`converters.torch_to_flax`).
    is_trainable : bool
        As ``PeftModel.from_pretrained``: by default the model is returned in eval mode (dropout
        off, as PEFT loads for inference); True leaves its mode as it is, for further training.

    Returns
    -------
    (AdaptedModel, KeyReport)
    """
    from .convert import load_into

    adapter = read_peft_adapter(directory)
    framework = framework_of(model)
    if framework is None:
        raise TypeError(f"expected a torch.nn.Module or a flax.nnx.Module, got {type(model).__name__}")
    if _is_adapted_model(model):
        _check_existing(model, adapter)
        adapted = model
    else:
        _check_targets(model, adapter, framework, str(directory))
        adapted = _build_adapted_model(model, adapter, framework, rngs)
    report = load_into(adapter.tensors, adapted, strict=strict)
    report.notes = adapter.notes + report.notes
    if not is_trainable:
        adapted.eval()
    return adapted, report


def export_peft_adapter(
    source: Any,
    directory: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    conv_geometry_checked: bool = False,
) -> dict[str, Any]:
    """Write our LoRA adapter as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    Parameters
    ----------
    source : AdaptedModel or path
        A LoRA ``AdaptedModel`` of either framework, or an adapter checkpoint written by a
        ``saver`` (``.safetensors`` or SpeechBrain ``.ckpt`` with metadata).
    directory : path
        Created if needed; ``adapter_config.json`` and ``adapter_model.safetensors`` are written
        atomically (an existing adapter there is replaced only once both are written).
    base_model_name_or_path : str, optional
        Recorded in the config for PEFT's convenience.
    conv_geometry_checked : bool
        A file does not record its convs' dilation and padding mode, which PEFT's LoRA conv
        cannot express: exporting conv adapters from a file needs this set to True, confirming
        the wrapped convs use dilation 1 and ``padding_mode='zeros'``.

    Returns
    -------
    dict
        The PEFT config written.
    """
    if _is_adapted_model(source):
        layers, kwargs, tensors, embeddings = _from_model(source)
    elif isinstance(source, (str, os.PathLike)):
        layers, kwargs, tensors, embeddings = _from_file(source, conv_geometry_checked)
    else:
        raise TypeError(
            f"source must be a LoRA AdaptedModel or an adapter file path, got {type(source).__name__}"
        )
    if "" in layers:
        raise PeftConversionError("the LoRA adapter wraps the root module itself, which PEFT cannot target")
    config, peft_tensors = peft_format.peft_files(
        tensors,
        layers,
        kwargs,
        embeddings=embeddings,
        base_model_name_or_path=base_model_name_or_path,
        where=str(source),
    )
    peft_format.write_adapter_directory(
        directory,
        peft=True,
        config=config,
        write_weights=lambda path: write_safetensors(path, peft_tensors, {"format": "pt"}),
    )
    return config


def peft_to_adapter_file(directory: str | os.PathLike[str], path: str | os.PathLike[str]) -> KeyReport:
    """Write a PEFT LoRA adapter as one of our adapter checkpoints (``.safetensors``, torch
    layout, with metadata), loadable by either twin's ``AdaptedModel.loader``."""
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"the adapter file must be a .safetensors file, got {str(path)!r}")
    adapter = read_peft_adapter(directory)
    metadata = adapter_metadata(
        framework="peft",
        adapter_class="LoRA",
        adapter_kwargs=adapter.adapter_kwargs,
        target_layers=[peft_format.escape_glob(layer) for layer in adapter.layers],
    )
    # Recorded so that a conversion never has to guess an embedding adapter's layout.
    kinds = {}
    for layer in adapter.embeddings:
        kinds[f"{_OURS_PREFIX}{layer}.{LORA.wrapped}"] = "embedding"
        kinds[f"{_OURS_PREFIX}{layer}.adapter_down_proj"] = "embedding"
        kinds[f"{_OURS_PREFIX}{layer}.adapter_up_proj"] = "linear"
    if kinds:
        metadata["layer_kinds"] = json.dumps(kinds, sort_keys=True)
    write_safetensors(path, adapter.tensors, metadata)
    return KeyReport(loaded=list(adapter.tensors), notes=adapter.notes)


# --- reading PEFT ------------------------------------------------------------------------------


def _check_targets(model: Any, adapter: PeftAdapter[Any], framework: str, where: str) -> None:
    """The PEFT adapter fits ``model`` (:func:`twinformat.peft_format.check_peft_model`, with
    the twin's geometry check)."""
    _, modules = _named_modules(model, framework)
    peft_format.check_peft_model(
        adapter,
        {name: (_lora_kind(module, framework), type(module).__name__) for name, module in modules.items()},
        where=where,
        layer_refusal=lambda name: _twin(framework).peft_layer_refusal(name, modules[name]),
    )


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


def _named_modules(model: Any, framework: str) -> tuple[list[str], dict[str, Any]]:
    if framework == "torch":
        named = list(model.named_modules())
    else:
        from flax_impl.graph import named_modules

        named = list(named_modules(model))
    return [n for n, _ in named], dict(named)


def _is_adapted_model(model: Any) -> bool:
    return (
        framework_of(model) is not None
        and hasattr(model, "adapter_class")
        and hasattr(model, "replace_layers")
    )


def _check_existing(model: Any, adapter: PeftAdapter) -> None:
    adapter_class = getattr(model.adapter_class, "__name__", str(model.adapter_class))
    if adapter_class != "LoRA":
        raise PeftConversionError(
            f"the target AdaptedModel uses {adapter_class} adapters; a PEFT LoRA adapter needs LoRA"
        )
    kwargs = LORA.kwargs(model.adapter_kwargs)
    theirs = LORA.kwargs(adapter.adapter_kwargs)
    if (
        kwargs["rank"] != adapter.rank
        or kwargs["use_dora"] != theirs["use_dora"]
        or not math.isclose(lora_scaling(kwargs), lora_scaling(theirs))
    ):
        shown = ("rank", "alpha", "use_rslora", "use_dora")
        raise PeftConversionError(
            f"the target AdaptedModel has {', '.join(f'{k}={kwargs[k]!r}' for k in shown)}, the PEFT adapter "
            f"{', '.join(f'{k}={theirs[k]!r}' for k in shown)}"
        )
    if sorted(model.replace_layers) != sorted(adapter.layers):
        raise PeftConversionError(
            f"the target AdaptedModel adapts {sorted(model.replace_layers)[:8]}, the PEFT adapter "
            f"{sorted(adapter.layers)[:8]}"
        )
    framework = _framework(model)
    for layer in adapter.layers:
        _check_peft_geometry(layer, _wrapped(_submodule(model.adapted_model, layer, framework)), framework)


def _build_adapted_model(model: Any, adapter: PeftAdapter, framework: str, rngs: Any) -> Any:
    targets = [peft_format.escape_glob(layer) for layer in adapter.layers]
    if framework == "torch":
        from torch_impl import AdaptedModel, LoRA

        return AdaptedModel(model, LoRA, target_layers=targets, adapter_kwargs=adapter.adapter_kwargs)
    from flax import nnx

    from flax_impl import AdaptedModel as FlaxAdaptedModel
    from flax_impl import LoRA as FlaxLoRA

    return FlaxAdaptedModel(
        model,
        FlaxLoRA,
        target_layers=targets,
        adapter_kwargs=adapter.adapter_kwargs,
        rngs=rngs or nnx.Rngs(0),
    )


# --- writing PEFT ------------------------------------------------------------------------------


def _from_model(model: Any) -> tuple[list[str], dict[str, Any], dict[str, np.ndarray], list[str]]:
    framework = _framework(model)
    refusal = _twin(framework).peft_refusal(model)  # what the twin's save_pretrained refuses
    if refusal is not None:
        raise PeftConversionError(refusal)
    for layer in model.replace_layers:
        if getattr(_submodule(model.adapted_model, layer, framework), "merged", False):
            raise PeftConversionError(
                f"layer {layer!r} is merged into its base weight; unmerge_lora(model) first"
            )
    embeddings = [
        layer
        for layer in model.replace_layers
        if _is_embedding(_wrapped(_submodule(model.adapted_model, layer, framework)), framework)
    ]
    state = model_state(model)
    tensors = {
        k: np.ascontiguousarray(state.read(k))
        for k in state.specs
        if k.endswith((".adapter_down_proj.weight", ".adapter_up_proj.weight", ".adapter_magnitude"))
    }
    return list(model.replace_layers), LORA.kwargs(model.adapter_kwargs), tensors, embeddings


def _from_file(
    path: Any, conv_geometry_checked: bool
) -> tuple[list[str], dict[str, Any], dict[str, np.ndarray], list[str]]:
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
        kinds = implied_kinds(tensor_file.names, specs, LORA, tensor_file.layer_kinds)
    layers = []
    for key, array in tensors.items():
        if key.endswith(".adapter_magnitude"):
            continue
        match = re.fullmatch(r"adapted_model\.(.*)\.adapter_(down|up)_proj\.weight", key)
        if match is None:
            raise PeftConversionError(
                f"{where!r}: {key!r} is not a LoRA factor (unfrozen layers would need PEFT's modules_to_save)"
            )
        if match.group(2) == "down":
            layers.append(match.group(1))
            if array.ndim > 2 and not conv_geometry_checked:
                raise PeftConversionError(
                    f"{where!r}: layer {match.group(1)!r} has a conv adapter; the file does not record the conv's "
                    "dilation and padding mode, which PEFT cannot express unless 1 and 'zeros'. Confirm with "
                    "conv_geometry_checked=True (CLI --conv-geometry-checked)"
                )
    kwargs = LORA.kwargs(meta.get("adapter_kwargs") or {})
    embeddings = [n for n in layers if kinds.get(f"{_OURS_PREFIX}{n}.adapter_down_proj") == "embedding"]
    for layer in layers:
        down = tensors.get(f"{_OURS_PREFIX}{layer}.adapter_down_proj.weight")
        up = tensors.get(f"{_OURS_PREFIX}{layer}.adapter_up_proj.weight")
        down_rank = None if down is None else down.shape[1] if layer in embeddings else down.shape[0]
        if up is None or down_rank != kwargs["rank"] or up.shape[1] != kwargs["rank"]:
            raise PeftConversionError(
                f"{where!r}: layer {layer!r} lacks a factor or does not have rank {kwargs['rank']}"
            )
        if kwargs["use_dora"] and f"{_OURS_PREFIX}{layer}.adapter_magnitude" not in tensors:
            raise PeftConversionError(
                f"{where!r}: layer {layer!r} is recorded as DoRA but has no adapter_magnitude"
            )
    return layers, kwargs, tensors, embeddings


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
