"""PEFT interop: import a PEFT LoRA adapter into our adapters, export ours to PEFT.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
(keys ``base_model.model.<layer>.lora_A.weight`` ``(r, in, *k)`` and ``...lora_B.weight``
``(out, r, 1..)``). Ours names the same factors ``adapted_model.<layer>.adapter_down_proj.weight``
and ``...adapter_up_proj.weight``, in the same layouts, so the tensors cross unchanged; what needs
care is the scaling and what each side can express. This module reads and writes the files
itself; it never imports ``peft``.

The options cross as they are: ``lora_dropout`` <-> ``dropout``, ``use_rslora`` <-> ``use_rslora``
(``scaling = alpha / sqrt(rank)``: ``alpha = lora_alpha`` exactly), ``use_dora`` <-> ``use_dora``
with ``lora_magnitude_vector`` (``(out,)``; convs ``(1, out, 1..)``) <-> ``adapter_magnitude``
(``(out,)``). Embedding adapters: ``lora_embedding_A`` ``(r, num)`` is our
``adapter_down_proj.weight`` transposed, ``lora_embedding_B`` ``(dim, r)`` our
``adapter_up_proj.weight``.

The config is validated as ``PeftModel.from_pretrained`` validates it: ``r`` a positive integer,
``lora_alpha`` a number, ``target_modules`` present, ``lora_dropout`` a probability,
``use_rslora``/``use_dora`` booleans.

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
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from interchange.adapters import LORA, implied_kinds, lora_scaling
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
_EMBEDDING_FACTORS = {"lora_embedding_A": "adapter_down_proj", "lora_embedding_B": "adapter_up_proj"}
_MAGNITUDE = "lora_magnitude_vector"
_OPTION_DEFAULTS = {"dropout": 0.0, "use_rslora": False, "use_dora": False}

# PEFT config fields whose presence (a value other than None/False/empty) we cannot express.
_UNSUPPORTED = {
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
    in torch layout; ``layers`` the adapted layers' dotted names; ``rank``, ``alpha`` and
    ``options`` (``dropout``, ``use_rslora``, ``use_dora``, those that differ from the defaults)
    our LoRA's arguments; ``embeddings`` the layers whose adapter is an embedding's.
    """

    config: dict[str, Any]
    layers: list[str]
    rank: int
    alpha: float
    tensors: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    embeddings: list[str] = field(default_factory=list)

    @property
    def adapter_kwargs(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, **self.options}


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
    except RecursionError:  # json recurses per nesting level: a hostile file can exhaust the stack
        raise PeftConversionError(f"{str(config_path)!r} is nested too deeply to be a PEFT config") from None
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
    use_dora = bool(config.get("use_dora"))
    ranks: dict[str, tuple[int, float]] = {}
    tensors: dict[str, np.ndarray] = {}
    embeddings = []
    for layer, found in factors.items():
        embedding = any(name in _EMBEDDING_FACTORS for name in found)
        names = _EMBEDDING_FACTORS if embedding else _FACTORS
        expected = set(names) | ({_MAGNITUDE} if use_dora else set())
        if embedding and use_dora:
            raise PeftConversionError(
                f"{str(weights_path)!r}: layer {layer!r} is an embedding adapted with DoRA, which our LoRA "
                "does not support (DoRA wraps Linear and Conv layers)"
            )
        if set(found) != expected:
            missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
            if missing:
                what = f"lacks {missing[0]}"
                if missing[0] == _MAGNITUDE:
                    what += " (its config says use_dora=True: DoRA needs each layer's magnitude)"
            else:
                what = f"holds {extra[0]}, unexpected with use_dora={use_dora}"
            raise PeftConversionError(f"{str(weights_path)!r}: layer {layer!r} {what}")
        a, b = (found[name] for name in names)
        layer_r = _pattern_value(config.get("rank_pattern") or {}, layer, r)
        layer_alpha = _pattern_value(config.get("alpha_pattern") or {}, layer, lora_alpha)
        if embedding:
            fits = a.ndim == 2 and b.ndim == 2 and a.shape[0] == layer_r and b.shape[1] == layer_r
        else:
            fits = a.shape[0] == layer_r and b.shape[1] == layer_r and all(n == 1 for n in b.shape[2:])
        if not fits:
            raise PeftConversionError(
                f"layer {layer!r}: {'/'.join(names)} of shapes {a.shape} / {b.shape} do not fit rank "
                f"{layer_r} from {str(config_path)!r}"
            )
        ranks[layer] = (layer_r, layer_alpha)
        prefix = f"{_OURS_PREFIX}{layer}"
        tensors[f"{prefix}.adapter_down_proj.weight"] = np.ascontiguousarray(a.T) if embedding else a
        tensors[f"{prefix}.adapter_up_proj.weight"] = b
        if use_dora:
            magnitude = found[_MAGNITUDE]
            if magnitude.size != b.shape[0] or sum(n != 1 for n in magnitude.shape) > 1:
                raise PeftConversionError(
                    f"layer {layer!r}: {_MAGNITUDE} of shape {magnitude.shape} does not fit {b.shape[0]} outputs"
                )
            tensors[f"{prefix}.adapter_magnitude"] = np.ascontiguousarray(magnitude.reshape(-1))
        if embedding:
            embeddings.append(layer)
    if len(set(ranks.values())) > 1:
        shown = ", ".join(f"{layer!r}: r={r_}, alpha={a_}" for layer, (r_, a_) in list(ranks.items())[:8])
        raise PeftConversionError(
            "the PEFT adapter gives its layers different ranks or alphas (rank_pattern/alpha_pattern: "
            f"{shown}); our AdaptedModel has one rank and one alpha for all its LoRA layers"
        )
    rank, peft_alpha = next(iter(ranks.values()))
    options = {
        "dropout": float(config.get("lora_dropout") or 0.0),
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": use_dora,
    }
    options = {key: value for key, value in options.items() if value != _OPTION_DEFAULTS[key]}
    return PeftAdapter(
        config, list(factors), int(rank), float(peft_alpha), tensors, notes, options, embeddings
    )


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
        _check_targets(model, adapter, framework)
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
    kwargs = LORA.kwargs(kwargs)
    config = _peft_config(layers, kwargs, base_model_name_or_path)
    peft_tensors = {}
    for layer in layers:
        ours = f"{_OURS_PREFIX}{layer}"
        down, up = tensors[f"{ours}.adapter_down_proj.weight"], tensors[f"{ours}.adapter_up_proj.weight"]
        theirs = f"{_PEFT_PREFIX}{layer}"
        if layer in embeddings:
            peft_tensors[f"{theirs}.lora_embedding_A"] = np.ascontiguousarray(down.T)
            peft_tensors[f"{theirs}.lora_embedding_B"] = up
        else:
            peft_tensors[f"{theirs}.lora_A.weight"] = down
            peft_tensors[f"{theirs}.lora_B.weight"] = up
        if kwargs["use_dora"]:
            magnitude = tensors[f"{ours}.adapter_magnitude"]
            # PEFT keeps a conv's magnitude as (1, out, 1, ...), a Linear's as (out,).
            shape = (1, -1) + (1,) * (down.ndim - 2) if down.ndim > 2 else (-1,)
            peft_tensors[f"{theirs}.{_MAGNITUDE}"] = np.ascontiguousarray(magnitude.reshape(shape))
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
    _check_values(config, where)
    notes = []
    if config.get("lora_dropout"):
        notes.append(f"lora_dropout={config['lora_dropout']}: carried as dropout (on in training mode only)")
    return notes


def _check_values(config: Mapping[str, Any], where: str) -> None:
    """The checks ``LoraConfig`` and ``update_layer`` make when ``PeftModel.from_pretrained``
    loads the config (a string ``"2"`` for ``r`` fails there too, with a TypeError)."""
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise PeftConversionError(f"{where!r}: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise PeftConversionError(f"{where!r}: lora_alpha must be a number, got {alpha!r}")
    for key, patterns in (("rank_pattern", True), ("alpha_pattern", False)):
        table = config.get(key) or {}
        if not isinstance(table, dict):
            raise PeftConversionError(
                f"{where!r}: {key} must be a JSON object {{pattern: value}}, got {table!r}"
            )
        for pattern, value in table.items():
            bad = isinstance(value, bool) or not isinstance(value, (int, float) if not patterns else int)
            if bad or (patterns and value < 1):
                raise PeftConversionError(
                    f"{where!r}: {key}[{pattern!r}] must be a positive number, got {value!r}"
                )
    targets = config.get("target_modules")
    if targets is None or targets == [] or targets == "":
        raise PeftConversionError(
            f"{where!r}: the config has no target_modules; PEFT fills them in only for the model types "
            "it knows, from the base model, which an adapter file does not name: give target_modules"
        )
    if not isinstance(targets, (str, list)) or (
        isinstance(targets, list) and not all(isinstance(t, str) for t in targets)
    ):
        raise PeftConversionError(
            f"{where!r}: target_modules must be a string or a list of strings, got {targets!r}"
        )
    dropout = config.get("lora_dropout", 0.0)
    if dropout is None:
        dropout = 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise PeftConversionError(f"{where!r}: lora_dropout must be a probability in [0, 1), got {dropout!r}")
    for key in ("use_rslora", "use_dora"):
        if not isinstance(config.get(key, False), bool):
            raise PeftConversionError(f"{where!r}: {key} must be true or false, got {config[key]!r}")


def _parse_peft_key(key: str, where: str) -> tuple[str, str]:
    match = re.fullmatch(
        r"base_model\.model\.(.+)\.(?:(lora_A|lora_B)\.weight|(lora_embedding_A|lora_embedding_B|lora_magnitude_vector))",
        key,
    )
    if match is None:
        raise PeftConversionError(
            f"{where!r}: tensor {key!r} is not a LoRA factor ('base_model.model.<layer>.lora_A/lora_B.weight', "
            "'...lora_embedding_A/B', '...lora_magnitude_vector'); only LoRA and DoRA on Linear, Conv and "
            "Embedding layers convert"
        )
    return match.group(1), match.group(2) or match.group(3)


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
    targets = config.get("target_modules") or ()  # validated present by _check_values
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
            f"layer {layer!r} is a {type(module).__name__}; our LoRA wraps Linear, Conv and Embedding layers"
        )
    if _is_embedding(module, framework):
        if getattr(module, "max_norm", None) is not None:
            raise PeftConversionError(
                f"layer {layer!r}: an embedding with max_norm={module.max_norm}, which our LoRA refuses"
            )
        return
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

        return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding))
    from flax import nnx

    return isinstance(module, (nnx.Linear, nnx.Conv, nnx.Embed))


def _is_embedding(module: Any, framework: str) -> bool:
    if framework == "torch":
        from torch import nn

        return isinstance(module, nn.Embedding)
    from flax import nnx

    return isinstance(module, nnx.Embed)


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
    targets = [_escape_glob(layer) for layer in adapter.layers]
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


def _escape_glob(name: str) -> str:
    """A glob matching exactly ``name`` (``*``, ``?`` and ``[`` are literal)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# --- writing PEFT ------------------------------------------------------------------------------


def _from_model(model: Any) -> tuple[list[str], dict[str, Any], dict[str, np.ndarray], list[str]]:
    adapter_class = getattr(model.adapter_class, "__name__", str(model.adapter_class))
    if adapter_class != "LoRA":
        raise PeftConversionError(f"{adapter_class} adapters have no PEFT LoRA equivalent; only LoRA exports")
    if getattr(model, "unfrozen_module_names", None):
        raise PeftConversionError(
            f"unfrozen_layers {model.unfrozen_module_names[:8]} would need PEFT's modules_to_save, which this "
            "exporter does not write; export an AdaptedModel without unfrozen_layers"
        )
    framework = _framework(model)
    for layer in model.replace_layers:
        lora = _submodule(model.adapted_model, layer, framework)
        if getattr(lora, "merged", False):
            raise PeftConversionError(
                f"layer {layer!r} is merged into its base weight; unmerge_lora(model) first"
            )
        _check_peft_geometry(layer, _wrapped(lora), framework)
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


def _peft_config(layers: Sequence[str], kwargs: Mapping[str, Any], base_model: str | None) -> dict[str, Any]:
    # A regex matched with re.fullmatch selects exactly these layers; a list would also select
    # every module whose name merely ends with '.<layer>'.
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": int(kwargs["rank"]),
        "lora_alpha": kwargs["alpha"],
        "target_modules": "(?:" + "|".join(re.escape(layer) for layer in layers) + ")",
        "lora_dropout": float(kwargs["dropout"]),
        "bias": "none",
        "use_rslora": bool(kwargs["use_rslora"]),
        "use_dora": bool(kwargs["use_dora"]),
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


def _framework(model: Any) -> str:
    """``'torch'`` or ``'flax'`` for an AdaptedModel of either twin (refused otherwise)."""
    framework = framework_of(model)
    if framework is None:
        raise TypeError(f"expected a torch_impl or flax_impl AdaptedModel, got {type(model).__name__}")
    return framework
