"""PEFT interop: import a PEFT LoRA adapter into our adapters, export ours to PEFT.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
(keys ``base_model.model.<layer>.lora_A.weight`` ``(r, in, *k)`` and ``...lora_B.weight``
``(out, r, 1..)``). Ours names the same factors ``adapted_model.<layer>.adapter_down_proj.weight``
and ``...adapter_up_proj.weight``, in the same layouts, so the tensors cross unchanged; what needs
care is the scaling and what each side can express. This module reads and writes the files
itself; it never imports ``peft``.

Scaling: PEFT uses ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with ``use_rslora``); ours is
``alpha / rank``. So ``alpha = lora_alpha`` (or ``lora_alpha * sqrt(r)``, equal up to float
rounding, noted in the report).

Refused with :class:`PeftConversionError`, never approximated:

- to PEFT: Houlsby adapters; ``unfrozen_layers`` (PEFT's ``modules_to_save`` is not written);
  a merged LoRA; a LoRA on the root module; conv adapters on a dilated conv or a conv with
  ``padding_mode != 'zeros'`` (PEFT's ``lora_A`` conv has neither).
- from PEFT: any ``peft_type`` but LORA; DoRA; ``modules_to_save``; ``bias != 'none'`` and
  ``lora_bias``; ``fan_in_fan_out``; initialisations that change the base weights (PiSSA, OLoRA,
  LoftQ, CorDA, LoRA-GA); ``target_parameters``, ``trainable_token_indices``,
  ``layer_replication`` and the other variants; per-layer ranks or alphas
  (``rank_pattern``/``alpha_pattern``) that differ, since our AdaptedModel has one rank and alpha;
  tensors other than ``lora_A``/``lora_B`` weights (e.g. LoRA on embeddings). ``lora_dropout``
  does not change a trained adapter's outputs at eval: accepted, with a note.

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
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from interchange.errors import PeftConversionError

from .checkpoint import KeyReport, adapter_metadata, parse_metadata
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

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_OURS_PREFIX = "adapted_model."
_FACTORS = {"lora_A": "adapter_down_proj", "lora_B": "adapter_up_proj"}

# PEFT config fields whose presence (a value other than None/False/empty) we cannot express.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layers)",
    "target_parameters": "target_parameters (LoRA on bare nn.Parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "megatron_config": "Megatron parallel layers",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}
# Initialisations that rewrite the base weights: the adapter alone no longer describes the model.
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter read into our terms.

    ``tensors`` holds our adapter keys (``adapted_model.<layer>.adapter_down_proj.weight``, ...)
    in torch layout; ``layers`` the adapted layers' dotted names; ``rank`` and ``alpha`` our
    LoRA's arguments (``scaling = alpha / rank``).
    """

    config: dict[str, Any]
    layers: list[str]
    rank: int
    alpha: float
    tensors: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)

    @property
    def adapter_kwargs(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha}


def read_peft_adapter(directory: str | os.PathLike[str]) -> PeftAdapter:
    """Read and check a PEFT LoRA adapter directory; raises :class:`PeftConversionError` for
    anything our LoRA cannot compute exactly."""
    folder = Path(directory)
    config_path, weights_path = folder / PEFT_CONFIG_NAME, folder / PEFT_WEIGHTS_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory not found: {str(folder)!r}")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} is not a PEFT adapter directory: {path.name} is missing"
            )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PeftConversionError(f"{str(config_path)!r} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise PeftConversionError(f"{str(config_path)!r} must hold a JSON object")
    notes = _check_config(config, str(config_path))

    with TensorFile(weights_path) as weights:
        factors: dict[str, dict[str, np.ndarray]] = {}
        for key in weights.names:
            layer, factor = _parse_peft_key(key, str(weights_path))
            factors.setdefault(layer, {})[factor] = weights.get(key)
    if not factors:
        raise PeftConversionError(f"{str(weights_path)!r} holds no LoRA weights")

    r, lora_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    ranks: dict[str, tuple[int, float]] = {}
    tensors: dict[str, np.ndarray] = {}
    for layer, found in factors.items():
        if set(found) != set(_FACTORS):
            missing = sorted(set(_FACTORS) - set(found))
            raise PeftConversionError(f"{str(weights_path)!r}: layer {layer!r} lacks {missing[0]}.weight")
        a, b = found["lora_A"], found["lora_B"]
        layer_r = _pattern_value(config.get("rank_pattern") or {}, layer, r)
        layer_alpha = _pattern_value(config.get("alpha_pattern") or {}, layer, lora_alpha)
        if a.shape[0] != layer_r or b.shape[1] != layer_r or any(n != 1 for n in b.shape[2:]):
            raise PeftConversionError(
                f"layer {layer!r}: lora_A {a.shape} / lora_B {b.shape} do not fit rank {layer_r} from {PEFT_CONFIG_NAME}"
            )
        ranks[layer] = (layer_r, layer_alpha)
        tensors[f"{_OURS_PREFIX}{layer}.adapter_down_proj.weight"] = a
        tensors[f"{_OURS_PREFIX}{layer}.adapter_up_proj.weight"] = b
    if len(set(ranks.values())) > 1:
        shown = ", ".join(f"{layer!r}: r={r_}, alpha={a_}" for layer, (r_, a_) in list(ranks.items())[:8])
        raise PeftConversionError(
            "the PEFT adapter gives its layers different ranks or alphas (rank_pattern/alpha_pattern: "
            f"{shown}); our AdaptedModel has one rank and one alpha for all its LoRA layers"
        )
    rank, peft_alpha = next(iter(ranks.values()))
    alpha = float(peft_alpha)
    if config.get("use_rslora"):
        alpha = float(peft_alpha) * math.sqrt(rank)
        notes.append(
            f"use_rslora: scaling lora_alpha/sqrt(r) = {peft_alpha / math.sqrt(rank)!r} expressed as "
            f"alpha/rank with alpha = {alpha!r} (equal up to float rounding: {alpha / rank!r})"
        )
    return PeftAdapter(config, list(factors), int(rank), alpha, tensors, notes)


def import_peft_adapter(
    directory: str | os.PathLike[str], model: Any, *, rngs: Any = None, strict: bool = True
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
        _check_targets(model, adapter, framework)
        adapted = _build_adapted_model(model, adapter, framework, rngs)
    report = load_into(adapter.tensors, adapted, strict=strict)
    report.notes = adapter.notes + report.notes
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
        layers, rank, alpha, tensors = _from_model(source)
    elif isinstance(source, (str, os.PathLike)):
        layers, rank, alpha, tensors = _from_file(source, conv_geometry_checked)
    else:
        raise TypeError(
            f"source must be a LoRA AdaptedModel or an adapter file path, got {type(source).__name__}"
        )
    if "" in layers:
        raise PeftConversionError("the LoRA adapter wraps the root module itself, which PEFT cannot target")
    config = _peft_config(layers, rank, alpha, base_model_name_or_path)
    peft_tensors = {}
    for layer in layers:
        for factor, ours in _FACTORS.items():
            peft_tensors[f"{_PEFT_PREFIX}{layer}.{factor}.weight"] = tensors[
                f"{_OURS_PREFIX}{layer}.{ours}.weight"
            ]
    _write_directory(Path(directory), config, peft_tensors)
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
        target_layers=[_escape_glob(layer) for layer in adapter.layers],
    )
    write_safetensors(path, adapter.tensors, metadata)
    return KeyReport(loaded=list(adapter.tensors), notes=adapter.notes)


# --- reading PEFT ------------------------------------------------------------------------------


def _check_config(config: Mapping[str, Any], where: str) -> list[str]:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise PeftConversionError(f"{where!r}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, what in _UNSUPPORTED.items():
        value = config.get(key)
        if value not in (None, False, [], {}, "", 0):
            raise PeftConversionError(f"{where!r}: {what} ({key}={value!r}) has no equivalent in our LoRA")
    if config.get("bias", "none") != "none":
        raise PeftConversionError(
            f"{where!r}: bias={config['bias']!r} trains the base layers' biases; only bias='none' converts"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise PeftConversionError(
            f"{where!r}: init_lora_weights={init!r} rewrites the base weights at initialisation, so the "
            "adapter alone does not describe the fine-tuned model"
        )
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise PeftConversionError(f"{where!r}: use_rslora with rank_pattern/alpha_pattern is not supported")
    notes = []
    if config.get("lora_dropout"):
        notes.append(f"lora_dropout={config['lora_dropout']} is ignored: it does not change outputs at eval")
    return notes


def _parse_peft_key(key: str, where: str) -> tuple[str, str]:
    match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", key)
    if match is None:
        raise PeftConversionError(
            f"{where!r}: tensor {key!r} is not a LoRA factor 'base_model.model.<layer>.lora_A/lora_B.weight'; "
            "only LoRA on Linear and Conv layers converts"
        )
    return match.group(1), match.group(2)


def _pattern_value(patterns: Mapping[str, Any], layer: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of the layer name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            return value
    return default


def _peft_selects(config: Mapping[str, Any], name: str) -> bool:
    """Whether PEFT's ``target_modules``/``exclude_modules`` select the module ``name``."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def _check_targets(model: Any, adapter: PeftAdapter, framework: str) -> None:
    names, modules = _named_modules(model, framework)
    missing = [layer for layer in adapter.layers if layer not in modules]
    if missing:
        raise PeftConversionError(
            f"the PEFT adapter adapts layer(s) {missing[:8]} which the model does not have"
        )
    targets = adapter.config.get("target_modules")
    checkable = isinstance(targets, (str, list)) and targets != "all-linear"
    checkable = checkable and not adapter.config.get("layers_to_transform")
    if checkable:
        selected = [
            n
            for n in names
            if n and _is_lora_layer(modules[n], framework) and _peft_selects(adapter.config, n)
        ]
        if sorted(selected) != sorted(adapter.layers):
            extra = sorted(set(selected) - set(adapter.layers))
            absent = sorted(set(adapter.layers) - set(selected))
            raise PeftConversionError(
                f"target_modules={targets!r} selects layers {extra[:8]} that have no weights in "
                f"{PEFT_WEIGHTS_NAME}, or the weights hold layers {absent[:8]} it does not select: "
                "this adapter was not made for this model"
            )
    for layer in adapter.layers:
        _check_peft_geometry(layer, modules[layer], framework)


def _check_peft_geometry(layer: str, module: Any, framework: str) -> None:
    """PEFT's conv lora_A copies kernel, stride and padding only; ours copies dilation too."""
    if not _is_lora_layer(module, framework):
        raise PeftConversionError(
            f"layer {layer!r} is a {type(module).__name__}; our LoRA wraps Linear and Conv layers"
        )
    if framework == "torch":
        dilation = getattr(module, "dilation", (1,))
        padding_mode = getattr(module, "padding_mode", "zeros")
    else:
        dilation = getattr(module, "kernel_dilation", None) or (1,)
        padding = getattr(module, "padding", None)
        padding_mode = (
            padding.lower() if isinstance(padding, str) and padding in ("CIRCULAR", "REFLECT") else "zeros"
        )
    dilation = (dilation,) if isinstance(dilation, int) else tuple(dilation)
    if any(d != 1 for d in dilation) or padding_mode != "zeros":
        raise PeftConversionError(
            f"layer {layer!r}: a conv with dilation {dilation} and padding_mode {padding_mode!r}; PEFT's LoRA conv "
            "uses dilation 1 and zero padding, so the two would compute different functions"
        )


def _is_lora_layer(module: Any, framework: str) -> bool:
    if framework == "torch":
        from torch import nn

        return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    from flax import nnx

    return isinstance(module, (nnx.Linear, nnx.Conv))


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
    kwargs = {"rank": 16, "alpha": 1.0, **model.adapter_kwargs}
    if kwargs["rank"] != adapter.rank or not math.isclose(
        kwargs["alpha"] / kwargs["rank"], adapter.alpha / adapter.rank
    ):
        raise PeftConversionError(
            f"the target AdaptedModel has rank {kwargs['rank']} and alpha {kwargs['alpha']}, the PEFT adapter "
            f"rank {adapter.rank} and alpha {adapter.alpha}"
        )
    if sorted(model.replace_layers) != sorted(adapter.layers):
        raise PeftConversionError(
            f"the target AdaptedModel adapts {sorted(model.replace_layers)[:8]}, the PEFT adapter "
            f"{sorted(adapter.layers)[:8]}"
        )
    framework = framework_of(model)
    for layer in adapter.layers:
        _check_peft_geometry(layer, _wrapped(_submodule(model.adapted_model, layer, framework)), framework)


def _build_adapted_model(model: Any, adapter: PeftAdapter, framework: str, rngs: Any) -> Any:
    targets = [_escape_glob(layer) for layer in adapter.layers]
    if framework == "torch":
        from torch_impl import AdaptedModel, LoRA

        return AdaptedModel(model, LoRA, target_layers=targets, adapter_kwargs=adapter.adapter_kwargs)
    from flax import nnx

    from flax_impl import AdaptedModel, LoRA

    return AdaptedModel(
        model, LoRA, target_layers=targets, adapter_kwargs=adapter.adapter_kwargs, rngs=rngs or nnx.Rngs(0)
    )


def _escape_glob(name: str) -> str:
    """A glob matching exactly ``name`` (``*``, ``?`` and ``[`` are literal)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# --- writing PEFT ------------------------------------------------------------------------------


def _from_model(model: Any) -> tuple[list[str], int, float, dict[str, np.ndarray]]:
    adapter_class = getattr(model.adapter_class, "__name__", str(model.adapter_class))
    if adapter_class != "LoRA":
        raise PeftConversionError(f"{adapter_class} adapters have no PEFT LoRA equivalent; only LoRA exports")
    if getattr(model, "unfrozen_module_names", None):
        raise PeftConversionError(
            f"unfrozen_layers {model.unfrozen_module_names[:8]} would need PEFT's modules_to_save, which this "
            "exporter does not write; export an AdaptedModel without unfrozen_layers"
        )
    framework = framework_of(model)
    for layer in model.replace_layers:
        lora = _submodule(model.adapted_model, layer, framework)
        if getattr(lora, "merged", False):
            raise PeftConversionError(
                f"layer {layer!r} is merged into its base weight; unmerge_lora(model) first"
            )
        _check_peft_geometry(layer, _wrapped(lora), framework)
    kwargs = {"rank": 16, "alpha": 1.0, **model.adapter_kwargs}
    state = model_state(model)
    tensors = {
        k: np.ascontiguousarray(state.read(k))
        for k in state.specs
        if k.endswith((".adapter_down_proj.weight", ".adapter_up_proj.weight"))
    }
    return list(model.replace_layers), kwargs["rank"], kwargs["alpha"], tensors


def _from_file(path: Any, conv_geometry_checked: bool) -> tuple[list[str], int, float, dict[str, np.ndarray]]:
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
    layers = []
    for key, array in tensors.items():
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
    kwargs = {"rank": 16, "alpha": 1.0, **(meta.get("adapter_kwargs") or {})}
    for layer in layers:
        down = tensors.get(f"{_OURS_PREFIX}{layer}.adapter_down_proj.weight")
        up = tensors.get(f"{_OURS_PREFIX}{layer}.adapter_up_proj.weight")
        if up is None or down.shape[0] != kwargs["rank"] or up.shape[1] != kwargs["rank"]:
            raise PeftConversionError(
                f"{where!r}: layer {layer!r} lacks a factor or does not have rank {kwargs['rank']}"
            )
    return layers, kwargs["rank"], kwargs["alpha"], tensors


def _submodule(model: Any, name: str, framework: str) -> Any:
    if not name:
        return model
    if framework == "torch":
        return model.get_submodule(name)
    from flax_impl.graph import get_submodule

    return get_submodule(model, name)


def _wrapped(lora: Any) -> Any:
    return lora.pretrained_module


def _peft_config(layers: Sequence[str], rank: int, alpha: float, base_model: str | None) -> dict[str, Any]:
    # A regex matched with re.fullmatch selects exactly these layers; a list would also select
    # every module whose name merely ends with '.<layer>'.
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": int(rank),
        "lora_alpha": alpha,
        "target_modules": "(?:" + "|".join(re.escape(layer) for layer in layers) + ")",
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _write_directory(folder: Path, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """Write both files into a fresh sibling folder, then move them in: no half-written adapter."""
    created = not folder.exists()
    if not folder.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(folder)!r}: folder {str(folder.parent)!r} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_safetensors(staging / PEFT_WEIGHTS_NAME, tensors, {"format": "pt"})
        (staging / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        folder.mkdir(exist_ok=True)
        for name in (PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME):
            os.replace(staging / name, folder / name)
    except BaseException:
        if created and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
