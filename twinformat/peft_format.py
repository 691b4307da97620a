"""PEFT's LoRA directory format, and our own adapter directories, framework-free.

The one place that knows PEFT's format: the file names, the tensor keys and layouts, the config
fields and their checks, which options cross and which are refused, the per-layer patterns, and
how a directory is read and written atomically. ``converters.peft`` (import/export between
models and PEFT directories) and both twins' ``AdaptedModel.save_pretrained`` /
``from_pretrained`` call it; what they keep is what needs a model (walking its modules, the
geometry of its layers, building the adapters).

PEFT's directory is ``adapter_config.json`` + ``adapter_model.safetensors``. Its keys and ours
(``state_dict()`` names, torch layout):

========================================================  ==============================================
PEFT                                                       ours
========================================================  ==============================================
``base_model.model.<layer>.lora_A.weight`` ``(r, in, *k)``  ``adapted_model.<layer>.adapter_down_proj.weight``
``base_model.model.<layer>.lora_B.weight`` ``(out, r, 1..)``  ``adapted_model.<layer>.adapter_up_proj.weight``
``...<layer>.lora_embedding_A`` ``(r, num)``                ``...adapter_down_proj.weight`` ``(num, r)``: transposed
``...<layer>.lora_embedding_B`` ``(dim, r)``                ``...adapter_up_proj.weight``
``...<layer>.lora_magnitude_vector`` ``(out,)``; convs      ``...adapter_magnitude`` ``(out,)``
``(1, out, 1..)``
========================================================  ==============================================

The options cross as they are (:data:`OPTIONS`): ``r`` <-> ``rank``, ``lora_alpha`` <->
``alpha`` (``scaling = alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora``),
``lora_dropout`` <-> ``dropout``, ``use_rslora`` and ``use_dora`` themselves. The config is
checked as ``PeftModel.from_pretrained`` checks it; refused with :class:`PeftConversionError`,
never approximated: any ``peft_type`` but LORA; the fields of :data:`UNSUPPORTED`
(``modules_to_save``, ``lora_bias``, ``fan_in_fan_out``, the LoRA variants but DoRA, ...);
``bias != 'none'``; the initialisations of :data:`BASE_CHANGING_INITS`, which rewrite the base
weights (so the adapter alone does not describe the model); DoRA on an embedding; layers given
different ranks or alphas by ``rank_pattern``/``alpha_pattern`` (an AdaptedModel has one);
any tensor but those above.

Our own format, for what PEFT cannot represent (Houlsby adapters, ``unfrozen_layers``, ...):
``peft_twins_adapter.json`` (adapter class, kwargs, the exact adapted and unfrozen layers) and
``adapters.safetensors``, the file ``AdaptedModel.saver`` writes.

Example
-------
>>> import numpy as np
>>> config = peft_config(["encoder.query"], rank=2, alpha=4.0, use_dora=True)
>>> config["r"], config["lora_alpha"], config["use_dora"], config["target_modules"]
(2, 4.0, True, '(?:encoder\\\\.query)')
>>> ours = {"adapted_model.encoder.query.adapter_down_proj.weight": np.ones((2, 3)),
...         "adapted_model.encoder.query.adapter_up_proj.weight": np.ones((5, 2)),
...         "adapted_model.encoder.query.adapter_magnitude": np.ones(5)}
>>> theirs = to_peft_tensors(ours, ["encoder.query"], use_dora=True)
>>> sorted(theirs)
['base_model.model.encoder.query.lora_A.weight', 'base_model.model.encoder.query.lora_B.weight', 'base_model.model.encoder.query.lora_magnitude_vector']
>>> adapter = peft_adapter(config, theirs, where="adapter")
>>> adapter.layers, adapter.adapter_kwargs
(['encoder.query'], {'rank': 2, 'alpha': 4.0, 'use_dora': True})
>>> sorted(adapter.tensors) == sorted(ours)
True
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from .adapters import LORA, adapter_of
from .errors import CheckpointError, PeftConversionError
from .format import FORMAT_NAME, FORMAT_VERSION, library_version

__all__ = [
    "BASE_CHANGING_INITS",
    "OPTIONS",
    "OURS_CONFIG_NAME",
    "OURS_WEIGHTS_NAME",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "UNSUPPORTED",
    "AdapterDirectory",
    "adapted_model_refusal",
    "PeftAdapter",
    "check_peft_config",
    "check_peft_model",
    "escape_glob",
    "load_peft_adapter",
    "ours_config",
    "parse_peft_key",
    "peft_adapter",
    "peft_config",
    "peft_files",
    "peft_options",
    "peft_refusal",
    "peft_selects",
    "read_adapter_directory",
    "read_peft_directory",
    "to_peft_tensors",
    "write_adapter_directory",
]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
OURS_CONFIG_NAME = "peft_twins_adapter.json"
OURS_WEIGHTS_NAME = "adapters.safetensors"

PEFT_PREFIX = "base_model.model."
OURS_PREFIX = "adapted_model."
DOWN, UP, MAGNITUDE = "adapter_down_proj.weight", "adapter_up_proj.weight", "adapter_magnitude"
#: PEFT's factor names (after the layer) -> ours, for Linear/Conv layers and for embeddings.
FACTORS = {"lora_A.weight": DOWN, "lora_B.weight": UP}
EMBEDDING_FACTORS = {"lora_embedding_A": DOWN, "lora_embedding_B": UP}
PEFT_MAGNITUDE = "lora_magnitude_vector"

#: PEFT's LoraConfig field -> our LoRA's argument, and its default (PEFT's default where it has one).
OPTIONS = {
    "r": ("rank", 8),
    "lora_alpha": ("alpha", 8),
    "lora_dropout": ("dropout", 0.0),
    "use_rslora": ("use_rslora", False),
    "use_dora": ("use_dora", False),
}
_OUR_DEFAULTS = {"dropout": 0.0, "use_rslora": False, "use_dora": False}

#: PEFT LoraConfig fields whose presence (a value other than None/False/empty) we cannot compute:
#: everything changing the forward or the trained set of PEFT's LoRA but DoRA, rsLoRA and dropout
#: (``peft.LoraConfig``'s ``is_lora_variant`` fields among them).
UNSUPPORTED = {
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
#: ``init_lora_weights`` values (prefixes) that rewrite the base weights at initialisation
#: (``peft/tuners/lora/layer.py``: ``pissa_init``, ``olora_init``, ``loftq_init``, ``corda_init``
#: and ``lora_ga_init`` assign ``base_layer.weight``): the adapter alone no longer describes the
#: fine-tuned model. Not ``"eva"``, ``"orthogonal"``, ``"gaussian"`` or ``"mica"``: they only
#: initialise the factors, which the saved weights overwrite.
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")

T = TypeVar("T")


# --- PEFT configs ------------------------------------------------------------------------------


def check_peft_config(config: Mapping[str, Any], where: str) -> list[str]:
    """Check a PEFT ``adapter_config.json`` (as a dict) as ``PeftModel.from_pretrained`` would,
    and for what our LoRA cannot compute; returns notes for the load report.

    Raises :class:`PeftConversionError` naming ``where`` and the field.

    >>> check_peft_config({"peft_type": "LORA", "target_modules": ["q"], "lora_dropout": 0.1}, "a")
    ['lora_dropout=0.1: carried as dropout (on in training mode only)']
    >>> check_peft_config({"peft_type": "LORA", "target_modules": ["q"], "init_lora_weights": "pissa"}, "a")
    Traceback (most recent call last):
    ...
    twinformat.errors.PeftConversionError: 'a': init_lora_weights='pissa' rewrites the base weights at initialisation, so the adapter alone does not describe the fine-tuned model
    """
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise PeftConversionError(f"{where!r}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, what in UNSUPPORTED.items():
        value = config.get(key)
        if value not in (None, False, [], {}, "", 0):
            raise PeftConversionError(f"{where!r}: {what} ({key}={value!r}) has no equivalent in our LoRA")
    if config.get("bias", "none") != "none":
        raise PeftConversionError(
            f"{where!r}: bias={config['bias']!r} trains the base layers' biases; only bias='none' converts"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
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
    if not _is_int(r) or r < 1:
        raise PeftConversionError(f"{where!r}: r must be a positive integer, got {r!r}")
    if not _is_number(config.get("lora_alpha", 8)):
        raise PeftConversionError(f"{where!r}: lora_alpha must be a number, got {config['lora_alpha']!r}")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        table = config.get(key) or {}
        if not isinstance(table, dict):
            raise PeftConversionError(
                f"{where!r}: {key} must be a JSON object {{pattern: value}}, got {table!r}"
            )
        for pattern, value in table.items():
            _check_regex(rf"(.*\.)?({pattern})$", f"{key} key {pattern!r}", where)
            if not (_is_int(value) and value >= 1 if integer else _is_number(value)):
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
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), str):
            _check_regex(config[key], f"{key} {config[key]!r}", where)
    dropout = config.get("lora_dropout", 0.0)
    dropout = 0.0 if dropout is None else dropout
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise PeftConversionError(f"{where!r}: lora_dropout must be a probability in [0, 1), got {dropout!r}")
    for key in ("use_rslora", "use_dora"):
        if not isinstance(config.get(key, False), bool):
            raise PeftConversionError(f"{where!r}: {key} must be true or false, got {config[key]!r}")


def peft_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Our LoRA kwargs as PEFT's config fields (:data:`OPTIONS`); a kwarg PEFT has no field for
    raises :class:`PeftConversionError`.

    >>> peft_options({"rank": 4, "alpha": 8, "use_rslora": True})
    {'r': 4, 'lora_alpha': 8.0, 'lora_dropout': 0.0, 'use_rslora': True, 'use_dora': False}
    """
    ours = {name: peft for peft, (name, _) in OPTIONS.items()}
    extra = sorted(set(kwargs) - set(ours))
    if extra:
        raise PeftConversionError(f"LoRA options {extra} have no field in PEFT's LoraConfig")
    given = {"rank": 16, "alpha": 1.0, **_OUR_DEFAULTS, **kwargs}  # our LoRA's own defaults
    return {
        "r": int(given["rank"]),
        "lora_alpha": float(given["alpha"]),
        "lora_dropout": float(given["dropout"]),
        "use_rslora": bool(given["use_rslora"]),
        "use_dora": bool(given["use_dora"]),
    }


def peft_config(
    layers: Sequence[str],
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` (as JSON) for our LoRA of these arguments on exactly ``layers``.

    ``target_modules`` is a regular expression PEFT matches with ``re.fullmatch``: a list would
    also select every module whose name merely ends with ``.<layer>``.
    """
    if not layers or "" in layers:
        raise PeftConversionError(
            "PEFT's format needs named target layers (the adapter wraps the root module itself)"
        )
    options = peft_options(
        {"rank": rank, "alpha": alpha, "dropout": dropout, "use_rslora": use_rslora, "use_dora": use_dora}
    )
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        **options,
        "target_modules": "(?:" + "|".join(re.escape(layer) for layer in layers) + ")",
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }


# --- tensors -----------------------------------------------------------------------------------


def parse_peft_key(key: str, where: str) -> tuple[str, str]:
    """``(layer, factor)`` of a PEFT LoRA tensor key; anything else raises :class:`PeftConversionError`.

    >>> parse_peft_key("base_model.model.emb.lora_embedding_A", "f")
    ('emb', 'lora_embedding_A')
    """
    match = re.fullmatch(
        r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)",
        key,
    )
    if match is None:
        raise PeftConversionError(
            f"{where!r}: tensor {key!r} is not a LoRA factor ('base_model.model.<layer>.lora_A/lora_B.weight', "
            "'...lora_embedding_A/B', '...lora_magnitude_vector'); only LoRA and DoRA on Linear, Conv and "
            "Embedding layers convert"
        )
    return match.group(1), match.group(2)


@dataclass
class PeftAdapter(Generic[T]):
    """A PEFT LoRA adapter read into our terms.

    ``tensors`` holds our adapter keys (``adapted_model.<layer>.adapter_down_proj.weight``, ...)
    in torch layout, as arrays of whatever kind the caller gave (numpy, torch); ``layers`` the
    adapted layers' dotted names; ``rank``, ``alpha`` and ``options`` (``dropout``,
    ``use_rslora``, ``use_dora``, those that differ from the defaults) our LoRA's arguments;
    ``embeddings`` the layers whose adapter is an embedding's.
    """

    config: dict[str, Any]
    layers: list[str]
    rank: int
    alpha: float
    tensors: dict[str, T]
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    embeddings: list[str] = field(default_factory=list)

    @property
    def adapter_kwargs(self) -> dict[str, Any]:
        """Our LoRA's ``adapter_kwargs`` for this adapter."""
        return {"rank": self.rank, "alpha": self.alpha, **self.options}


def peft_adapter(
    config: Mapping[str, Any], tensors: Mapping[str, T], *, where: str, weights: str | None = None
) -> PeftAdapter[T]:
    """Check a PEFT config (:func:`check_peft_config`) and its tensors (PEFT's keys) and map
    them to ours.

    ``tensors`` may be numpy or torch arrays (``.T``, ``.reshape`` and ``.shape`` are used);
    embedding factors come back as transposed views. Raises :class:`PeftConversionError` naming
    ``where`` (the config) or ``weights`` (the tensor file) for anything our LoRA cannot compute
    exactly: a missing or unexpected factor, shapes that do not fit ``r``, DoRA on an embedding,
    layers of different ranks or alphas.
    """
    weights = weights or where
    notes = check_peft_config(config, where)
    factors: dict[str, dict[str, T]] = {}
    for key, value in tensors.items():
        layer, factor = parse_peft_key(key, weights)
        factors.setdefault(layer, {})[factor] = value
    if not factors:
        raise PeftConversionError(f"{weights!r} holds no LoRA weights")
    r, lora_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    use_dora = bool(config.get("use_dora"))
    ranks: dict[str, tuple[int, float]] = {}
    out: dict[str, T] = {}
    embeddings = []
    for layer, found in factors.items():
        embedding = any(name in EMBEDDING_FACTORS for name in found)
        names = EMBEDDING_FACTORS if embedding else FACTORS
        if embedding and use_dora:
            raise PeftConversionError(
                f"{weights!r}: layer {layer!r} is an embedding adapted with DoRA, which our LoRA "
                "does not support (DoRA wraps Linear and Conv layers)"
            )
        expected = set(names) | ({PEFT_MAGNITUDE} if use_dora else set())
        if set(found) != expected:
            missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
            if missing:
                what = f"lacks {missing[0]}"
                if missing[0] == PEFT_MAGNITUDE:
                    what += " (its config says use_dora=True: DoRA needs each layer's magnitude)"
            else:
                what = f"holds {extra[0]}, unexpected with use_dora={use_dora}"
            raise PeftConversionError(f"{weights!r}: layer {layer!r} {what}")
        a, b = (found[name] for name in names)
        a_shape, b_shape = tuple(a.shape), tuple(b.shape)  # type: ignore[attr-defined]
        layer_r = _pattern_value(config.get("rank_pattern") or {}, layer, r)
        layer_alpha = _pattern_value(config.get("alpha_pattern") or {}, layer, lora_alpha)
        if embedding:
            fits = len(a_shape) == 2 and len(b_shape) == 2 and a_shape[0] == layer_r and b_shape[1] == layer_r
        else:
            fits = (
                len(a_shape) >= 2
                and len(b_shape) >= 2
                and a_shape[0] == layer_r
                and b_shape[1] == layer_r
                and all(n == 1 for n in b_shape[2:])
            )
        if not fits:
            raise PeftConversionError(
                f"layer {layer!r}: {'/'.join(names)} of shapes {a_shape} / {b_shape} do not fit rank "
                f"{layer_r} from {where!r}"
            )
        ranks[layer] = (layer_r, layer_alpha)
        prefix = f"{OURS_PREFIX}{layer}"
        out[f"{prefix}.{DOWN}"] = a.T if embedding else a  # type: ignore[attr-defined]
        out[f"{prefix}.{UP}"] = b
        if use_dora:
            magnitude = found[PEFT_MAGNITUDE]
            shape = tuple(magnitude.shape)  # type: ignore[attr-defined]
            if math.prod(shape) != b_shape[0] or sum(n != 1 for n in shape) > 1:
                raise PeftConversionError(
                    f"layer {layer!r}: {PEFT_MAGNITUDE} of shape {shape} does not fit {b_shape[0]} outputs"
                )
            out[f"{prefix}.{MAGNITUDE}"] = magnitude.reshape(-1)  # type: ignore[attr-defined]
        if embedding:
            embeddings.append(layer)
    if len(set(ranks.values())) > 1:
        shown = ", ".join(f"{layer!r}: r={r_}, alpha={a_}" for layer, (r_, a_) in list(ranks.items())[:8])
        raise PeftConversionError(
            "the PEFT adapter gives its layers different ranks or alphas (rank_pattern/alpha_pattern: "
            f"{shown}); our AdaptedModel has one rank and one alpha for all its LoRA layers"
        )
    rank, alpha = next(iter(ranks.values()))
    options = {
        "dropout": float(config.get("lora_dropout") or 0.0),
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": use_dora,
    }
    options = {key: value for key, value in options.items() if value != _OUR_DEFAULTS[key]}
    return PeftAdapter(dict(config), list(factors), int(rank), float(alpha), out, notes, options, embeddings)


def to_peft_tensors(
    tensors: Mapping[str, T],
    layers: Sequence[str],
    *,
    embeddings: Collection[str] = (),
    use_dora: bool = False,
    where: str = "the adapter",
) -> dict[str, T]:
    """Our LoRA tensors (``state_dict()`` keys, torch layout) of ``layers`` as PEFT's.

    ``embeddings`` are the layers that wrap an embedding (their down factor is transposed);
    ``use_dora`` adds each layer's magnitude, reshaped to PEFT's ``(1, out, 1..)`` for convs.
    A missing factor, or any tensor besides, raises :class:`PeftConversionError` naming it.
    Embedding factors come back as transposed views: the writer makes them contiguous.
    """
    out: dict[str, T] = {}
    used: set[str] = set()
    for layer in layers:
        ours, theirs = f"{OURS_PREFIX}{layer}", f"{PEFT_PREFIX}{layer}"
        needed = (DOWN, UP, MAGNITUDE) if use_dora else (DOWN, UP)
        missing = [f"{ours}.{name}" for name in needed if f"{ours}.{name}" not in tensors]
        if missing:
            raise PeftConversionError(f"{where!r}: layer {layer!r} has no {missing[0]!r}")
        down, up = tensors[f"{ours}.{DOWN}"], tensors[f"{ours}.{UP}"]
        if layer in embeddings:
            out[f"{theirs}.lora_embedding_A"] = down.T  # type: ignore[attr-defined]
            out[f"{theirs}.lora_embedding_B"] = up
        else:
            out[f"{theirs}.lora_A.weight"] = down
            out[f"{theirs}.lora_B.weight"] = up
        if use_dora:
            ndim = len(down.shape)  # type: ignore[attr-defined]
            # PEFT keeps a conv's magnitude as (1, out, 1, ...), a Linear's as (out,).
            shape = (1, -1) + (1,) * (ndim - 2) if ndim > 2 else (-1,)
            out[f"{theirs}.{PEFT_MAGNITUDE}"] = tensors[f"{ours}.{MAGNITUDE}"].reshape(shape)  # type: ignore[attr-defined]
        used.update(f"{ours}.{name}" for name in needed)
    extra = [key for key in tensors if key not in used]
    if extra:
        raise PeftConversionError(
            f"{where!r}: {extra[0]!r} is not a LoRA factor of the adapted layers; PEFT's LoRA format has no "
            "place for it (unfrozen layers would need PEFT's modules_to_save)"
        )
    return out


# --- models ------------------------------------------------------------------------------------


def peft_selects(config: Mapping[str, Any], name: str) -> bool | None:
    """Whether PEFT's ``target_modules``/``exclude_modules`` select the module ``name``, or None
    when the config selects by rules this check does not model (``all-linear``,
    ``layers_to_transform``).

    >>> peft_selects({"target_modules": ["query"]}, "encoder.layer.0.query")
    True
    >>> peft_selects({"target_modules": "(?:query)"}, "encoder.layer.0.query")
    False
    """
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


def check_peft_model(
    adapter: PeftAdapter[Any],
    modules: Mapping[str, tuple[str | None, str]],
    *,
    where: str,
    layer_refusal: Callable[[str], str | None] | None = None,
) -> None:
    """Refuse a PEFT adapter that does not fit a model, before anything is changed.

    ``modules`` maps each named module of the base model to ``(kind, type name)``, ``kind``
    being ``'linear'``, ``'conv'`` or ``'embedding'`` for a layer our LoRA wraps, None for
    others. Refused: an adapted layer the model lacks, or which our LoRA cannot wrap, or whose
    factors are an embedding's and the layer not (or the reverse); ``target_modules`` that select
    other layers of the model than the weights hold (the adapter was made for another model).
    ``layer_refusal(name)``, the framework's check of a layer's geometry (a conv's dilation,
    ...), says why PEFT's LoRA on it would compute something else, or None.
    """
    missing = [layer for layer in adapter.layers if layer not in modules]
    if missing:
        raise PeftConversionError(
            f"{where!r}: the PEFT adapter adapts layer(s) {missing[:8]} which the model does not have"
        )
    for layer in adapter.layers:
        kind, type_name = modules[layer]
        if kind is None:
            raise PeftConversionError(
                f"{where!r}: layer {layer!r} is a {type_name}; our LoRA wraps Linear, Conv and Embedding layers"
            )
        if (kind == "embedding") != (layer in adapter.embeddings):
            theirs = "lora_embedding_A/B" if layer in adapter.embeddings else "lora_A/lora_B"
            raise PeftConversionError(
                f"{where!r}: layer {layer!r} is a {type_name} but the adapter holds {theirs} for it: this "
                "adapter was not made for this model"
            )
        refusal = layer_refusal(layer) if layer_refusal is not None else None
        if refusal is not None:
            raise PeftConversionError(f"{where!r}: {refusal}")
    selected = []
    for name, (kind, _) in modules.items():
        if kind is None or not name:
            continue
        chosen = peft_selects(adapter.config, name)
        if chosen is None:
            return
        if chosen:
            selected.append(name)
    if sorted(selected) != sorted(adapter.layers):
        extra = sorted(set(selected) - set(adapter.layers))
        absent = sorted(set(adapter.layers) - set(selected))
        raise PeftConversionError(
            f"{where!r}: target_modules={adapter.config.get('target_modules')!r} selects layers {extra[:8]} that "
            f"have no weights in {PEFT_WEIGHTS_NAME}, or the weights hold layers {absent[:8]} it does not "
            "select: this adapter was not made for this model"
        )


def peft_refusal(
    *,
    adapter_class: str | None,
    adapter_kwargs: Mapping[str, Any],
    unfrozen_layers: Sequence[str],
    layers: Sequence[str],
    layer_refusal: Callable[[str], str | None],
) -> str | None:
    """Why PEFT's format cannot hold an adapter, or None when it can: ``adapter_class`` is None
    for LoRA, else the class's name; ``layer_refusal(name)`` is the framework's geometry check.

    >>> peft_refusal(adapter_class=None, adapter_kwargs={"rank": 2, "use_dora": True}, unfrozen_layers=[],
    ...              layers=["fc"], layer_refusal=lambda name: None) is None
    True
    >>> peft_refusal(adapter_class="HoulsbyAdapterLinear", adapter_kwargs={}, unfrozen_layers=[], layers=["fc"],
    ...              layer_refusal=lambda name: None)
    "HoulsbyAdapterLinear adapters have no PEFT LoRA equivalent; only LoRA is written in PEFT's format"
    """
    if adapter_class is not None:
        return f"{adapter_class} adapters have no PEFT LoRA equivalent; only LoRA is written in PEFT's format"
    try:
        peft_options(adapter_kwargs)
    except PeftConversionError as exc:
        return str(exc)
    if unfrozen_layers:
        return f"unfrozen layers {list(unfrozen_layers)[:8]} would need PEFT's modules_to_save, which is not written"
    if not layers or "" in layers:
        return "the adapter wraps the root module itself, which PEFT cannot target"
    for name in layers:
        refusal = layer_refusal(name)
        if refusal is not None:
            return refusal
    return None


def adapted_model_refusal(model: Any, layer_refusal: Callable[[str], str | None]) -> str | None:
    """:func:`peft_refusal` of an ``AdaptedModel`` of either twin, read from its adapter class
    and kwargs, unfrozen and adapted layers; ``layer_refusal(name)`` is the twin's check of the
    layer wrapped at ``name``.

    >>> from types import SimpleNamespace
    >>> model = SimpleNamespace(adapter_class=SimpleNamespace(__name__="Houlsby"), adapter_kwargs={},
    ...                         unfrozen_module_names=[], replace_layers=["fc"])
    >>> adapted_model_refusal(model, lambda name: None)
    "Houlsby adapters have no PEFT LoRA equivalent; only LoRA is written in PEFT's format"
    """
    lora = adapter_of(model.adapter_class) is LORA
    return peft_refusal(
        adapter_class=None if lora else getattr(model.adapter_class, "__name__", str(model.adapter_class)),
        adapter_kwargs=model.adapter_kwargs,
        unfrozen_layers=model.unfrozen_module_names,
        layers=model.replace_layers,
        layer_refusal=layer_refusal,
    )


def peft_files(
    tensors: Mapping[str, T],
    layers: Sequence[str],
    adapter_kwargs: Mapping[str, Any],
    *,
    embeddings: Collection[str] = (),
    base_model_name_or_path: str | None = None,
    where: str = "the adapter",
) -> tuple[dict[str, Any], dict[str, T]]:
    """The config and the tensors of PEFT's directory for our LoRA (``adapter_kwargs``) on
    ``layers``: :func:`peft_config` and :func:`to_peft_tensors` together."""
    kwargs = {"rank": 16, "alpha": 1.0, **_OUR_DEFAULTS, **adapter_kwargs}
    config = peft_config(layers, **kwargs, base_model_name_or_path=base_model_name_or_path)
    out = to_peft_tensors(
        tensors, layers, embeddings=embeddings, use_dora=bool(kwargs["use_dora"]), where=where
    )
    return config, out


def load_peft_adapter(
    found: AdapterDirectory, read_tensors: Callable[[Path], Mapping[str, T]]
) -> PeftAdapter[T]:
    """Check the config of the PEFT directory ``found``, then read its weights with
    ``read_tensors(path)`` (each side its own way) and map them (:func:`peft_adapter`)."""
    where = str(found.weights.with_name(PEFT_CONFIG_NAME))
    check_peft_config(found.config, where)  # before the weights are read
    return peft_adapter(found.config, read_tensors(found.weights), where=where, weights=str(found.weights))


def escape_glob(name: str) -> str:
    """A shell-style pattern matching exactly ``name`` (``*``, ``?`` and ``[`` literal).

    >>> escape_glob("blocks[0].fc")
    'blocks[[]0].fc'
    """
    return re.sub(r"([*?\[])", r"[\1]", name)


# --- directories -------------------------------------------------------------------------------


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


def read_peft_directory(directory: str | os.PathLike[str]) -> AdapterDirectory:
    """Read a PEFT adapter directory's config (the weights are the caller's: each side reads
    safetensors its own way). A missing directory or file raises ``FileNotFoundError``, a config
    that is not a JSON object :class:`PeftConversionError`, naming the file."""
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory not found: {str(folder)!r}")
    for name in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a PEFT adapter directory: {name} is missing")
    config = _read_json(folder / PEFT_CONFIG_NAME, PeftConversionError)
    return AdapterDirectory("peft", config, folder / PEFT_WEIGHTS_NAME)


def read_adapter_directory(directory: str | os.PathLike[str]) -> AdapterDirectory:
    """Find which format ``directory`` holds, ours or PEFT's, and read its config (weights are
    the caller's). Errors name the directory and the file."""
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {str(folder)!r}")
    if not (folder / OURS_CONFIG_NAME).is_file():
        if not (folder / PEFT_CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} is not an adapter directory: neither {PEFT_CONFIG_NAME} (PEFT) nor "
                f"{OURS_CONFIG_NAME} (ours) is there"
            )
        return read_peft_directory(folder)
    path = folder / OURS_CONFIG_NAME
    config = _read_json(path, CheckpointError)
    if config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{str(path)!r}: format is {config.get('format')!r}, not {FORMAT_NAME!r}")
    for key, kind in (
        ("adapter_class", str),
        ("adapter_kwargs", dict),
        ("adapted_layers", list),
        ("unfrozen_layers", list),
    ):
        if not isinstance(config.get(key), kind):
            raise CheckpointError(f"{str(path)!r}: {key!r} must be a {kind.__name__}")
    if not all(isinstance(n, str) for n in (*config["adapted_layers"], *config["unfrozen_layers"])):
        raise CheckpointError(f"{str(path)!r}: layer names must be strings")
    if not (folder / OURS_WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a complete adapter directory: {OURS_WEIGHTS_NAME} is missing"
        )
    return AdapterDirectory(FORMAT_NAME, config, folder / OURS_WEIGHTS_NAME)


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


def _read_json(path: Path, error: type[CheckpointError]) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{str(path)!r} is not valid JSON: {exc}") from None
    except RecursionError:  # json recurses per nesting level: a hostile file can exhaust the stack
        raise error(f"{str(path)!r} is nested too deeply to be an adapter config") from None
    if not isinstance(value, dict):
        raise error(f"{str(path)!r} must hold a JSON object")
    return value


def _check_regex(pattern: str, what: str, where: str) -> None:
    """PEFT matches these with ``re``: a pattern ``re`` cannot compile fails there too."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise PeftConversionError(f"{where!r}: {what} is not a regular expression: {exc}") from None


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
