"""Adapter directories: PEFT's LoRA format and our own, framework-free.

``AdaptedModel.save_pretrained(directory)`` (both twins) writes one of two adapter-only formats:

- **PEFT's**, where PEFT can represent the adapter (plain LoRA on Linear/Conv layers, nothing
  unfrozen): ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
  ``base_model.model.<layer>.lora_A.weight`` ``(r, in, *k)`` and ``...lora_B.weight``
  ``(out, r, 1..)``. ``peft.PeftModel.from_pretrained(base, directory)`` loads it. Ours names the
  same factors ``adapted_model.<layer>.adapter_down_proj.weight`` and ``...adapter_up_proj.weight``
  in the same layouts, and PEFT's ``scaling = lora_alpha / r`` is ours ``alpha / rank``, so the
  tensors cross unchanged.
- **Ours** otherwise (Houlsby adapters, ``unfrozen_layers``, LoRA options PEFT's plain LoRA has
  not): ``peft_twins_adapter.json`` (adapter class, kwargs, the exact adapted and unfrozen layers)
  and ``adapters.safetensors``, the file ``AdaptedModel.saver`` writes (keys as in
  ``state_dict()``, metadata with the adapter and the layer kinds).

``AdaptedModel.from_pretrained(base_model, directory)`` reads either (:func:`read_adapter_directory`).
A directory is written atomically: both files are staged in a sibling folder and moved in, and
the other format's files are removed first, so a directory never holds a mix of the two.

Example
-------
>>> config = peft_config(["encoder.query", "encoder.value"], rank=4, alpha=8.0)
>>> config["r"], config["lora_alpha"], config["target_modules"]
(4, 8.0, '(?:encoder\\\\.query|encoder\\\\.value)')
>>> to_peft_keys({"adapted_model.fc.adapter_down_proj.weight": 1})
{'base_model.model.fc.lora_A.weight': 1}
>>> from_peft_keys({"base_model.model.fc.lora_B.weight": 2}, where="adapter_model.safetensors")
{'adapted_model.fc.adapter_up_proj.weight': 2}
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import CheckpointError, PeftConversionError
from .format import FORMAT_NAME, FORMAT_VERSION, library_version

__all__ = [
    "OURS_CONFIG_NAME",
    "OURS_WEIGHTS_NAME",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "AdapterDirectory",
    "PeftLoRA",
    "check_peft_targets",
    "escape_glob",
    "from_peft_keys",
    "lora_from_peft",
    "ours_config",
    "peft_config",
    "peft_selects",
    "read_adapter_directory",
    "to_peft_keys",
    "write_adapter_directory",
]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
OURS_CONFIG_NAME = "peft_twins_adapter.json"
OURS_WEIGHTS_NAME = "adapters.safetensors"

_PEFT_PREFIX = "base_model.model."
_OURS_PREFIX = "adapted_model."
_FACTORS = {"lora_A": "adapter_down_proj", "lora_B": "adapter_up_proj"}
_PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight")
_OURS_KEY = re.compile(r"adapted_model\.(.+)\.(adapter_down_proj|adapter_up_proj)\.weight")

# PEFT LoRA options our plain LoRA cannot compute; a value other than None/False/empty refuses.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layers)",
    "target_parameters": "target_parameters (LoRA on bare parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "megatron_config": "Megatron parallel layers",
    "arrow_config": "Arrow routing",
}
# Initialisations that rewrite the base weights: the adapter alone no longer describes the model.
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga", "eva")

T = TypeVar("T")


# --- keys --------------------------------------------------------------------------------------


def to_peft_keys(tensors: Mapping[str, T]) -> dict[str, T]:
    """Our LoRA factor keys -> PEFT's; any other key raises :class:`PeftConversionError`."""
    out = {}
    for key, value in tensors.items():
        match = _OURS_KEY.fullmatch(key)
        if match is None:
            raise PeftConversionError(
                f"{key!r} is not a LoRA factor 'adapted_model.<layer>.adapter_down_proj/adapter_up_proj.weight'; "
                "PEFT's LoRA format has no place for it"
            )
        factor = "lora_A" if match.group(2) == "adapter_down_proj" else "lora_B"
        out[f"{_PEFT_PREFIX}{match.group(1)}.{factor}.weight"] = value
    return out


def from_peft_keys(tensors: Mapping[str, T], *, where: str) -> dict[str, T]:
    """PEFT's LoRA factor keys -> ours; raises :class:`PeftConversionError` naming ``where`` and
    the key for anything else (LoRA on embeddings, biases, DoRA magnitudes, ...)."""
    out = {}
    for key, value in tensors.items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise PeftConversionError(
                f"{where!r}: tensor {key!r} is not a LoRA factor 'base_model.model.<layer>.lora_A/lora_B.weight'; "
                "only plain LoRA on Linear and Conv layers loads"
            )
        out[f"{_OURS_PREFIX}{match.group(1)}.{_FACTORS[match.group(2)]}.weight"] = value
    return out


def escape_glob(name: str) -> str:
    """A shell-style pattern matching exactly ``name`` (``*``, ``?`` and ``[`` literal).

    >>> escape_glob("blocks[0].fc")
    'blocks[[]0].fc'
    """
    return re.sub(r"([*?\[])", r"[\1]", name)


# --- PEFT configs ------------------------------------------------------------------------------


def peft_config(
    layers: Sequence[str], *, rank: int, alpha: float, base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` (as JSON) for plain LoRA of ``rank`` and ``alpha`` on exactly ``layers``.

    ``target_modules`` is a regular expression PEFT matches with ``re.fullmatch``: a list would
    also select every module whose name merely ends with ``.<layer>``.
    """
    if not layers or "" in layers:
        raise PeftConversionError("PEFT's format needs named target layers (not the root module itself)")
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": float(alpha),
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


@dataclass
class PeftLoRA:
    """A PEFT LoRA adapter in our terms: the layers it adapts, one ``rank`` and ``alpha``
    (``scaling = alpha / rank``, or ``alpha / sqrt(rank)`` when ``use_rslora``), and the
    options our plain LoRA may or may not have (``dropout``)."""

    layers: list[str]
    rank: int
    alpha: float
    use_rslora: bool = False
    dropout: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)


def lora_from_peft(
    config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *, where: str
) -> PeftLoRA:
    """Check a PEFT ``adapter_config.json`` and the shapes of its tensors (our keys, as
    :func:`from_peft_keys` gives them); raises :class:`PeftConversionError` naming ``where``
    for anything our LoRA cannot compute exactly."""
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise PeftConversionError(f"{where!r}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, what in _UNSUPPORTED.items():
        value = config.get(key)
        if value not in (None, False, [], {}, "", 0):
            raise PeftConversionError(f"{where!r}: {what} ({key}={value!r}) has no equivalent in our LoRA")
    if config.get("bias", "none") != "none":
        raise PeftConversionError(
            f"{where!r}: bias={config['bias']!r} trains the base biases; only 'none' loads"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise PeftConversionError(
            f"{where!r}: init_lora_weights={init!r} rewrites the base weights, so the adapter alone "
            "does not describe the fine-tuned model"
        )
    if config.get("target_modules") is None:
        raise PeftConversionError(f"{where!r}: no target_modules: PEFT cannot tell which layers are adapted")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not _is_int(rank) or rank < 1:
        raise PeftConversionError(f"{where!r}: r must be a positive integer, got {rank!r}")
    if not _is_number(alpha):
        raise PeftConversionError(f"{where!r}: lora_alpha must be a number, got {alpha!r}")
    dropout = config.get("lora_dropout", 0.0) or 0.0
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise PeftConversionError(f"{where!r}: lora_dropout must be a number in [0, 1), got {dropout!r}")

    layers: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        match = _OURS_KEY.fullmatch(key)
        if match is None:  # pragma: no cover - from_peft_keys has refused it already
            raise PeftConversionError(f"{where!r}: {key!r} is not a LoRA factor")
        layers.setdefault(match.group(1), {})[match.group(2)] = tuple(shape)
    if not layers:
        raise PeftConversionError(f"{where!r} holds no LoRA weights")
    for layer, found in layers.items():
        if set(found) != set(_FACTORS.values()):
            missing = sorted(set(_FACTORS) - {k for k, v in _FACTORS.items() if v in found})
            raise PeftConversionError(f"{where!r}: layer {layer!r} lacks {missing[0]}.weight")
        layer_rank = _pattern_value(config.get("rank_pattern") or {}, layer, rank)
        layer_alpha = _pattern_value(config.get("alpha_pattern") or {}, layer, alpha)
        if layer_rank != rank or layer_alpha != alpha:
            raise PeftConversionError(
                f"{where!r}: layer {layer!r} has r={layer_rank}, lora_alpha={layer_alpha} (rank_pattern/"
                f"alpha_pattern) but the others r={rank}, lora_alpha={alpha}; our AdaptedModel has one rank and alpha"
            )
        down, up = found["adapter_down_proj"], found["adapter_up_proj"]
        if down[0] != rank or len(up) < 2 or up[1] != rank or any(n != 1 for n in up[2:]):
            raise PeftConversionError(
                f"{where!r}: layer {layer!r}: lora_A {down} / lora_B {up} do not fit r={rank} of {PEFT_CONFIG_NAME}"
            )
    return PeftLoRA(
        list(layers), int(rank), float(alpha), bool(config.get("use_rslora")), float(dropout), dict(config)
    )


def peft_selects(config: Mapping[str, Any], name: str) -> bool | None:
    """Whether PEFT's ``target_modules``/``exclude_modules`` select the module ``name``, or None
    when the config selects by rules this check does not model (``all-linear``,
    ``layers_to_transform``)."""
    targets = config.get("target_modules")
    if targets == "all-linear" or config.get("layers_to_transform") or config.get("layers_pattern"):
        return None
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if isinstance(targets, (list, tuple, set)):
        return name in targets or any(name.endswith(f".{t}") for t in targets)
    return None


def check_peft_targets(
    config: Mapping[str, Any], layers: Iterable[str], candidates: Iterable[str], *, where: str
) -> None:
    """Refuse an adapter whose ``target_modules`` select other layers of the model (its
    Linear/Conv ``candidates``) than those its weights hold: it was made for another model."""
    layers = sorted(layers)
    selected = []
    for name in candidates:
        chosen = peft_selects(config, name)
        if chosen is None:
            return
        if chosen and name:
            selected.append(name)
    if sorted(selected) != layers:
        extra = sorted(set(selected) - set(layers))
        absent = sorted(set(layers) - set(selected))
        raise PeftConversionError(
            f"{where!r}: target_modules={config.get('target_modules')!r} selects layers {extra[:8]} with no "
            f"weights in {PEFT_WEIGHTS_NAME}, or the weights hold layers {absent[:8]} it does not select "
            "among the model's Linear/Conv layers: this adapter was not made for this model"
        )


# --- our own directory format ------------------------------------------------------------------


def ours_config(
    *,
    framework: str,
    adapter_class: str,
    adapter_kwargs: Mapping[str, Any],
    adapted_layers: Sequence[str],
    unfrozen_layers: Sequence[str],
) -> dict[str, Any]:
    """The JSON of ``peft_twins_adapter.json``: what ``from_pretrained`` needs to rebuild the
    adapters (exact layer names, not patterns) and how the file was made.

    >>> ours_config(framework="torch", adapter_class="HoulsbyAdapterLinear", adapter_kwargs={"projection_size": 4},
    ...             adapted_layers=["fc"], unfrozen_layers=[])["adapted_layers"]
    ['fc']
    """
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "framework": framework,
        "adapter_class": adapter_class,
        "adapter_kwargs": dict(adapter_kwargs),
        "adapted_layers": list(adapted_layers),
        "unfrozen_layers": list(unfrozen_layers),
        "weights": OURS_WEIGHTS_NAME,
    }


@dataclass
class AdapterDirectory:
    """What :func:`read_adapter_directory` found: ``format`` is ``'peft'`` or ``'peft-twins'``."""

    format: str
    config: dict[str, Any]
    weights: Path


def read_adapter_directory(directory: str | os.PathLike[str]) -> AdapterDirectory:
    """Find which format ``directory`` holds and read its config (weights are the caller's:
    each twin reads safetensors its own way). Errors name the directory and the file."""
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {str(folder)!r}")
    if (folder / OURS_CONFIG_NAME).is_file():
        config = _read_json(folder / OURS_CONFIG_NAME)
        if config.get("format") != FORMAT_NAME:
            raise CheckpointError(
                f"{str(folder / OURS_CONFIG_NAME)!r}: format is {config.get('format')!r}, not {FORMAT_NAME!r}"
            )
        for key, kind in (
            ("adapter_class", str),
            ("adapter_kwargs", dict),
            ("adapted_layers", list),
            ("unfrozen_layers", list),
        ):
            if not isinstance(config.get(key), kind):
                raise CheckpointError(
                    f"{str(folder / OURS_CONFIG_NAME)!r}: {key!r} must be a {kind.__name__}"
                )
        if not all(isinstance(n, str) for n in (*config["adapted_layers"], *config["unfrozen_layers"])):
            raise CheckpointError(f"{str(folder / OURS_CONFIG_NAME)!r}: layer names must be strings")
        weights = folder / OURS_WEIGHTS_NAME
        fmt = FORMAT_NAME
    elif (folder / PEFT_CONFIG_NAME).is_file():
        config = _read_json(folder / PEFT_CONFIG_NAME)
        weights = folder / PEFT_WEIGHTS_NAME
        fmt = "peft"
    else:
        raise FileNotFoundError(
            f"{str(folder)!r} is not an adapter directory: neither {PEFT_CONFIG_NAME} (PEFT) nor "
            f"{OURS_CONFIG_NAME} (ours) is there"
        )
    if not weights.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a complete adapter directory: {weights.name} is missing"
        )
    return AdapterDirectory(fmt, config, weights)


def write_adapter_directory(
    directory: str | os.PathLike[str],
    *,
    peft: bool,
    config: Mapping[str, Any],
    write_weights: Callable[[str], None],
) -> Path:
    """Write an adapter directory in PEFT's format (``peft=True``) or ours, atomically.

    ``write_weights(path)`` writes the safetensors file. Both files are staged in a sibling
    folder first; then the other format's files are removed and the two moved in, so a failure
    while writing leaves an existing directory as it was and a new one not at all. Returns the folder.
    """
    folder = Path(directory)
    if not folder.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(folder)!r}: folder {str(folder.parent)!r} does not exist")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"cannot write the adapter directory {str(folder)!r}: a file is there")
    config_name, weights_name = (
        (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME) if peft else (OURS_CONFIG_NAME, OURS_WEIGHTS_NAME)
    )
    stale = (OURS_CONFIG_NAME, OURS_WEIGHTS_NAME) if peft else (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)
    created = not folder.exists()
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_weights(str(staging / weights_name))
        (staging / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        folder.mkdir(exist_ok=True)
        for name in stale:  # the config first: a half-replaced directory never reads as the old format
            if (folder / name).exists():
                os.unlink(folder / name)
        os.replace(staging / weights_name, folder / weights_name)
        os.replace(staging / config_name, folder / config_name)
    except BaseException:
        if created and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# --- helpers -----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object")
    return value


def _pattern_value(patterns: Mapping[str, Any], layer: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of the layer name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            return value
    return default


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
