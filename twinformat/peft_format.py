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
(``lora_bias``, ``fan_in_fan_out``, the LoRA variants but DoRA, ...); ``bias != 'none'``; the
initialisations of :data:`BASE_CHANGING_INITS`, which rewrite the base weights (so the adapter
alone does not describe the model); DoRA on an embedding; any tensor but those above.

Two PEFT features need a model that holds them, so a reader asks for them
(``allow_patterns``, ``allow_modules_to_save``; the twins' ``AdaptedModel.from_pretrained`` does,
the file converters do not yet): layers given different ranks or alphas by
``rank_pattern``/``alpha_pattern`` (:attr:`PeftAdapter.layer_kwargs`, our per-layer
``layer_adapter_kwargs``), and ``modules_to_save``, fully trained copies of whole modules, which
are our ``unfrozen_layers`` (PEFT writes them as ``base_model.model.<module>.<param>``, without
its in-memory ``modules_to_save.default``).

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

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
    "glob_regex",
    "layout_renamer",
    "load_peft_adapter",
    "modules_to_save_refusal",
    "ours_config",
    "parse_peft_key",
    "peft_adapter",
    "peft_adapter_directory",
    "peft_adapter_names",
    "peft_adapter_subdirectory",
    "peft_config",
    "peft_files",
    "peft_options",
    "peft_patterns",
    "peft_refusal",
    "peft_selects",
    "peft_target_modules",
    "read_adapter_directory",
    "read_peft_directory",
    "renamed_peft_adapter",
    "renamed_tensors",
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
#: Why a reader that does not hold ``modules_to_save`` refuses them.
MODULES_TO_SAVE = "modules_to_save (fully trained extra modules)"
#: PEFT's name for the adapter at the root of a directory; every other adapter of PEFT's
#: multi-adapter layout (``PeftModel.save_pretrained`` of several adapters) is in ``<name>/``.
DEFAULT_ADAPTER_NAME = "default"

T = TypeVar("T")


# --- PEFT configs ------------------------------------------------------------------------------


def check_peft_config(
    config: Mapping[str, Any], where: str, *, allow_modules_to_save: bool = False
) -> list[str]:
    """Check a PEFT ``adapter_config.json`` (as a dict) as ``PeftModel.from_pretrained`` would,
    and for what our LoRA cannot compute; returns notes for the load report.

    Raises :class:`PeftConversionError` naming ``where`` and the field; ``modules_to_save``
    too unless ``allow_modules_to_save`` (the reader holds them as unfrozen layers).

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
    to_save = config.get("modules_to_save")
    if to_save not in (None, [], ""):
        if not allow_modules_to_save:
            raise PeftConversionError(
                f"{where!r}: {MODULES_TO_SAVE} (modules_to_save={to_save!r}) has no equivalent in our "
                "LoRA files; AdaptedModel.from_pretrained reads them as unfrozen layers"
            )
        if not isinstance(to_save, list) or not all(isinstance(n, str) and n for n in to_save):
            raise PeftConversionError(
                f"{where!r}: modules_to_save must be a list of module names, got {to_save!r}"
            )
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
    target_modules: str | list[str] | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    modules_to_save: Sequence[str] | None = None,
    task_type: str | None = None,
    auto_mapping: Mapping[str, str] | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` (as JSON) for our LoRA of these arguments on exactly ``layers``.

    ``target_modules`` defaults to a regular expression PEFT matches with ``re.fullmatch`` that
    lists ``layers`` (a list would also select every module whose name merely ends with
    ``.<layer>``); give the user's own (:func:`peft_target_modules` checks that it selects exactly
    ``layers``). ``auto_mapping`` (the base model's transformers class, as PEFT writes it when
    ``task_type`` is None) lets ``peft.AutoPeftModel.from_pretrained`` rebuild the base model.

    >>> config = peft_config(["q"], rank=2, alpha=4, target_modules=["q"], task_type="FEATURE_EXTRACTION")
    >>> config["target_modules"], config["task_type"], "auto_mapping" in config
    (['q'], 'FEATURE_EXTRACTION', False)
    """
    if not layers or "" in layers:
        raise PeftConversionError(
            "PEFT's format needs named target layers (the adapter wraps the root module itself)"
        )
    options = peft_options(
        {"rank": rank, "alpha": alpha, "dropout": dropout, "use_rslora": use_rslora, "use_dora": use_dora}
    )
    if target_modules is None:
        target_modules = _exact_regex(layers)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or None,
        **options,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    if revision is not None:
        config["revision"] = revision
    if auto_mapping is not None and task_type is None:
        config["auto_mapping"] = dict(auto_mapping)
    return config


def peft_target_modules(
    layers: Sequence[str],
    module_names: Sequence[str],
    candidates: Sequence[str | list[str] | None],
) -> str | list[str]:
    """The ``target_modules`` to write for an adapter on exactly ``layers`` of a model whose
    modules are ``module_names``: the first of ``candidates`` (what a PEFT config said, the
    user's glob patterns as a regular expression, ...) that selects exactly ``layers`` as PEFT
    selects (:func:`peft_selects`), else a regular expression listing them.

    >>> names = ["", "a", "a.query", "a.value", "b", "b.query", "b.value"]
    >>> peft_target_modules(["a.query", "b.query"], names, [["query"]])
    ['query']
    >>> peft_target_modules(["a.query"], names, [["query"], glob_regex(["a.q*"])])
    '(?:a\\\\.q.*)'
    >>> peft_target_modules(["a.query"], names, [["query"]])
    '(?:a\\\\.query)'
    """
    wanted = set(layers)
    for candidate in candidates:
        if candidate is None or candidate == [] or candidate == "":
            continue
        config = {"target_modules": candidate}
        if {name for name in module_names if name and peft_selects(config, name)} == wanted:
            return candidate
    return _exact_regex(layers)


def glob_regex(patterns: Sequence[str]) -> str | None:
    """Our shell-style ``target_layers`` patterns (``fnmatch`` on whole dotted names) as one
    regular expression PEFT matches with ``re.fullmatch``; None for no pattern.

    >>> glob_regex(["encoder.layer.*.query", "fc[12]", "x[!a]"])
    '(?:encoder\\\\.layer\\\\..*\\\\.query|fc[12]|x[^a])'
    """
    if not patterns:
        return None
    return "(?:" + "|".join(_one_glob_regex(p) for p in patterns) + ")"


def _one_glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif (
            char == "["
            and (end := pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)) > 0
        ):
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _exact_regex(layers: Sequence[str]) -> str:
    return "(?:" + "|".join(re.escape(layer) for layer in layers) + ")"


def peft_patterns(
    layer_kwargs: Mapping[str, Mapping[str, Any]],
    layers: Sequence[str],
    *,
    rank: int,
    alpha: float,
    recorded: Mapping[str, Any] | None = None,
) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """``(r, lora_alpha, rank_pattern, alpha_pattern)`` giving each of ``layers`` its rank and
    alpha: ``rank``/``alpha`` unless ``layer_kwargs[layer]`` says otherwise. The ``recorded``
    PEFT config's own fields when they still give every layer the same values (so a directory
    read and written back keeps the user's patterns), else one escaped exact name per layer that
    differs.

    >>> peft_patterns({"a.q": {"rank": 2}}, ["a.q", "a.v"], rank=4, alpha=8)
    (4, 8, {'a\\\\.q': 2}, {})
    >>> peft_patterns({"a.q": {"rank": 2}}, ["a.q", "a.v"], rank=4, alpha=8,
    ...               recorded={"r": 4, "lora_alpha": 8, "rank_pattern": {"q": 2}})
    (4, 8, {'q': 2}, {})
    """
    wanted = {
        layer: (
            int(layer_kwargs.get(layer, {}).get("rank", rank)),
            float(layer_kwargs.get(layer, {}).get("alpha", alpha)),
        )
        for layer in layers
    }
    if recorded is not None:
        r, a = recorded.get("r", 8), recorded.get("lora_alpha", 8)
        ranks, alphas = recorded.get("rank_pattern") or {}, recorded.get("alpha_pattern") or {}
        got = {
            layer: (int(_pattern_value(ranks, layer, r)), float(_pattern_value(alphas, layer, a)))
            for layer in layers
        }
        if got == wanted:
            return r, a, dict(ranks), dict(alphas)
    rank_pattern = {re.escape(layer): r_ for layer, (r_, _) in wanted.items() if r_ != int(rank)}
    alpha_pattern = {re.escape(layer): a_ for layer, (_, a_) in wanted.items() if a_ != float(alpha)}
    return rank, alpha, rank_pattern, alpha_pattern


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
    ``embeddings`` the layers whose adapter is an embedding's; ``layer_kwargs`` the layers whose
    rank or alpha ``rank_pattern``/``alpha_pattern`` make differ from ``rank``/``alpha`` (only
    those keys); ``modules_to_save`` the modules PEFT trains whole (our unfrozen layers), whose
    tensors are in ``tensors`` under ``adapted_model.<module>.<name>``.
    """

    config: dict[str, Any]
    layers: list[str]
    rank: int
    alpha: float
    tensors: dict[str, T]
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    embeddings: list[str] = field(default_factory=list)
    layer_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)

    @property
    def adapter_kwargs(self) -> dict[str, Any]:
        """Our LoRA's ``adapter_kwargs`` for this adapter."""
        return {"rank": self.rank, "alpha": self.alpha, **self.options}


def renamed_tensors(tensors: Mapping[str, T], rename: Callable[[str], str]) -> dict[str, T]:
    """Our adapter tensors (``adapted_model.<name>``) with each ``<name>`` renamed (a dotted
    name's prefix swapped: the same tensors under another model's names).

    >>> renamed_tensors({"adapted_model.lm.q.adapter_down_proj.weight": 1}, lambda n: n.replace("lm.", "model.", 1))
    {'adapted_model.model.q.adapter_down_proj.weight': 1}
    """
    out = {}
    for key, value in tensors.items():
        if not key.startswith(OURS_PREFIX):
            raise PeftConversionError(f"tensor {key!r} is not under {OURS_PREFIX!r}: not an adapter tensor")
        out[OURS_PREFIX + rename(key[len(OURS_PREFIX) :])] = value
    return out


class _Renamable(Protocol):
    """What :func:`renamed_peft_adapter` renames: PeftAdapter's, and converters.peft's adapter
    records', name-bearing fields."""

    layers: list[str]
    tensors: Any
    embeddings: list[str]
    layer_kwargs: dict[str, dict[str, Any]]
    modules_to_save: list[str]


A = TypeVar("A", bound=_Renamable)


def renamed_peft_adapter(adapter: A, rename: Callable[[str], str]) -> A:
    """``adapter`` with every layer and module name, and its tensors' keys, ``rename``d: a PEFT
    adapter of a bigger model (``model.language_model.layers.0.self_attn.q_proj``) in the names of
    the twin that holds that part (``model.layers.0.self_attn.q_proj``). The config is kept as
    read: its ``target_modules`` speak of the bigger model, as the adapter will when written back.

    ``adapter`` is a :class:`PeftAdapter` or any dataclass with its ``layers``, ``tensors``,
    ``embeddings``, ``layer_kwargs`` and ``modules_to_save`` fields."""
    return replace(  # type: ignore[type-var]  # a dataclass, as the docstring says
        adapter,
        layers=[rename(layer) for layer in adapter.layers],
        tensors=renamed_tensors(adapter.tensors, rename),
        embeddings=[rename(layer) for layer in adapter.embeddings],
        layer_kwargs={rename(layer): dict(kwargs) for layer, kwargs in adapter.layer_kwargs.items()},
        modules_to_save=[rename(module) for module in adapter.modules_to_save],
    )


def layout_renamer(layout: Any) -> Callable[[str], str]:
    """A twin's dotted names -> those of the bigger model ``layout`` describes (a
    ``flax_impl.models.pretrained.CheckpointLayout``: ``checkpoint_name``, ``model_class``,
    ``part``, ``renames``); ``None``: the names as they are. A name the layout does not hold is
    refused: PEFT could not load it in the bigger model."""

    def rename(name: str) -> str:
        new = layout.checkpoint_name(name) if layout is not None else name
        if new is None:
            raise PeftConversionError(
                f"{name!r} has no name in {layout.model_class} ({layout.part}: {dict(layout.renames)})"
            )
        return str(new)

    return rename


def peft_adapter(
    config: Mapping[str, Any],
    tensors: Mapping[str, T],
    *,
    where: str,
    weights: str | None = None,
    allow_patterns: bool = False,
    allow_modules_to_save: bool = False,
) -> PeftAdapter[T]:
    """Check a PEFT config (:func:`check_peft_config`) and its tensors (PEFT's keys) and map
    them to ours.

    ``tensors`` may be numpy or torch arrays (``.T``, ``.reshape`` and ``.shape`` are used);
    embedding factors come back as transposed views. Raises :class:`PeftConversionError` naming
    ``where`` (the config) or ``weights`` (the tensor file) for anything our LoRA cannot compute
    exactly: a missing or unexpected factor, shapes that do not fit ``r``, DoRA on an embedding;
    layers of different ranks or alphas unless ``allow_patterns`` (then in
    :attr:`PeftAdapter.layer_kwargs`); ``modules_to_save`` unless ``allow_modules_to_save``.
    """
    weights = weights or where
    notes = check_peft_config(config, where, allow_modules_to_save=allow_modules_to_save)
    factors: dict[str, dict[str, T]] = {}
    saved: dict[str, T] = {}
    to_save = list(config.get("modules_to_save") or [])
    for key, value in tensors.items():
        module = _saved_module(key, to_save) if to_save else None
        if module is not None:
            saved[f"{OURS_PREFIX}{key[len(PEFT_PREFIX) :]}"] = value
            continue
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
    layer_kwargs: dict[str, dict[str, Any]] = {}
    if len(set(ranks.values())) > 1:
        if not allow_patterns:
            shown = ", ".join(f"{layer!r}: r={r_}, alpha={a_}" for layer, (r_, a_) in list(ranks.items())[:8])
            raise PeftConversionError(
                "the PEFT adapter gives its layers different ranks or alphas (rank_pattern/alpha_pattern: "
                f"{shown}); this reader holds one rank and one alpha for all the LoRA layers (a file merge "
                "does): read it with AdaptedModel.from_pretrained or converters.import_peft_adapter, which hold "
                "per-layer ranks and alphas"
            )
        rank, alpha = int(r), float(lora_alpha)
        for layer, (r_, a_) in ranks.items():
            differs: dict[str, int | float] = {"rank": int(r_)} if r_ != rank else {}
            differs.update({"alpha": float(a_)} if a_ != alpha else {})
            if differs:
                layer_kwargs[layer] = differs
    else:
        rank, alpha = next(iter(ranks.values()))
    options = {
        "dropout": float(config.get("lora_dropout") or 0.0),
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": use_dora,
    }
    options = {key: value for key, value in options.items() if value != _OUR_DEFAULTS[key]}
    modules = sorted({_saved_module(key, to_save) or "" for key in tensors} - {""})
    out.update(saved)
    return PeftAdapter(
        dict(config),
        list(factors),
        int(rank),
        float(alpha),
        out,
        notes,
        options,
        embeddings,
        layer_kwargs,
        modules,
    )


def _saved_module(key: str, to_save: Sequence[str]) -> str | None:
    """The ``modules_to_save`` module (its full dotted name) a PEFT tensor ``key`` belongs to, or
    None: the shortest prefix of the key's layer path that ends with one of ``to_save`` (PEFT wraps
    the outermost module a name selects)."""
    if not key.startswith(PEFT_PREFIX) or re.search(r"\.lora_[A-Za-z_]+(\.weight)?$", key):
        return None
    parts = key[len(PEFT_PREFIX) :].split(".")
    for end in range(1, len(parts)):
        module = ".".join(parts[:end])
        if any(module == name or module.endswith(f".{name}") for name in to_save):
            return module
    return None


def to_peft_tensors(
    tensors: Mapping[str, T],
    layers: Sequence[str],
    *,
    embeddings: Collection[str] = (),
    use_dora: bool = False,
    modules_to_save: Sequence[str] = (),
    where: str = "the adapter",
) -> dict[str, T]:
    """Our LoRA tensors (``state_dict()`` keys, torch layout) of ``layers`` as PEFT's.

    ``embeddings`` are the layers that wrap an embedding (their down factor is transposed);
    ``use_dora`` adds each layer's magnitude, reshaped to PEFT's ``(1, out, 1..)`` for convs;
    the tensors of ``modules_to_save`` (our unfrozen layers) go under their own names, as PEFT
    writes them. A missing factor, or any tensor besides, raises :class:`PeftConversionError`
    naming it. Embedding factors come back as transposed views: the writer makes them contiguous.
    """
    out: dict[str, T] = {}
    used: set[str] = set()
    for key in tensors:
        rest = key[len(OURS_PREFIX) :] if key.startswith(OURS_PREFIX) else None
        if rest is not None and any(rest.startswith(f"{module}.") for module in modules_to_save if module):
            out[PEFT_PREFIX + rest] = tensors[key]
            used.add(key)
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
    absent = [module for module in adapter.modules_to_save if module not in modules]
    if absent:
        raise PeftConversionError(
            f"{where!r}: modules_to_save holds module(s) {absent[:8]} which the model does not have"
        )
    refusal = modules_to_save_refusal(adapter.modules_to_save, adapter.layers)
    if refusal is not None:
        raise PeftConversionError(f"{where!r}: {refusal}")
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
    modules_to_save: bool = False,
) -> str | None:
    """Why PEFT's format cannot hold an adapter, or None when it can: ``adapter_class`` is None
    for LoRA, else the class's name; ``layer_refusal(name)`` is the framework's geometry check.
    Unfrozen layers are refused unless the writer writes them as ``modules_to_save``
    (:func:`modules_to_save_refusal`).

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
    if unfrozen_layers and not modules_to_save:
        return f"unfrozen layers {list(unfrozen_layers)[:8]} would need PEFT's modules_to_save, which is not written"
    if not layers or "" in layers:
        return "the adapter wraps the root module itself, which PEFT cannot target"
    refusal = modules_to_save_refusal(unfrozen_layers, layers)
    if refusal is not None:
        return refusal
    for name in layers:
        refusal = layer_refusal(name)
        if refusal is not None:
            return refusal
    return None


def modules_to_save_refusal(modules: Sequence[str], layers: Sequence[str]) -> str | None:
    """Why PEFT's ``modules_to_save`` cannot hold these unfrozen ``modules`` beside LoRA on
    ``layers``, or None: PEFT trains a copy of a whole module, so it cannot be the root, nor hold
    or sit inside an adapted layer (PEFT would wrap one wrapper in the other).

    >>> modules_to_save_refusal(["pooler"], ["encoder.query"]) is None
    True
    >>> modules_to_save_refusal(["encoder"], ["encoder.query"])
    "unfrozen layer 'encoder' holds the adapted layer 'encoder.query'; PEFT's modules_to_save copies whole modules that hold no LoRA layer"
    """
    for module in modules:
        if not module:
            return "the root module is unfrozen; PEFT's modules_to_save copies named submodules"
        for layer in layers:
            if layer == module or layer.startswith(f"{module}.") or module.startswith(f"{layer}."):
                relation = "is" if layer == module else "holds" if layer.startswith(module) else "lies inside"
                return (
                    f"unfrozen layer {module!r} {relation} the adapted layer {layer!r}; PEFT's modules_to_save "
                    "copies whole modules that hold no LoRA layer"
                )
    return None


def adapted_model_refusal(
    model: Any, layer_refusal: Callable[[str], str | None], *, full: bool = False
) -> str | None:
    """:func:`peft_refusal` of an ``AdaptedModel`` of either twin, read from its adapter class
    and kwargs, unfrozen and adapted layers; ``layer_refusal(name)`` is the twin's check of the
    layer wrapped at ``name``. ``full``: the writer also writes unfrozen layers as
    ``modules_to_save`` and per-layer kwargs as ``rank_pattern``/``alpha_pattern`` (the twins'
    ``save_pretrained`` does; a writer of the factors alone refuses both).

    >>> from types import SimpleNamespace
    >>> model = SimpleNamespace(adapter_class=SimpleNamespace(__name__="Houlsby"), adapter_kwargs={},
    ...                         unfrozen_module_names=[], replace_layers=["fc"])
    >>> adapted_model_refusal(model, lambda name: None)
    "Houlsby adapters have no PEFT LoRA equivalent; only LoRA is written in PEFT's format"
    """
    lora = adapter_of(model.adapter_class) is LORA
    if lora and not full and getattr(model, "layer_adapter_kwargs", None):
        return (
            f"layers {sorted(model.layer_adapter_kwargs)[:8]} have their own adapter kwargs, which need PEFT's "
            "rank_pattern/alpha_pattern: write them with AdaptedModel.save_pretrained"
        )
    return peft_refusal(
        adapter_class=None if lora else getattr(model.adapter_class, "__name__", str(model.adapter_class)),
        adapter_kwargs=model.adapter_kwargs,
        unfrozen_layers=model.unfrozen_module_names,
        layers=model.replace_layers,
        layer_refusal=layer_refusal,
        modules_to_save=full,
    )


def peft_files(
    tensors: Mapping[str, T],
    layers: Sequence[str],
    adapter_kwargs: Mapping[str, Any],
    *,
    embeddings: Collection[str] = (),
    base_model_name_or_path: str | None = None,
    where: str = "the adapter",
    layer_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    modules_to_save: Sequence[str] = (),
    module_names: Sequence[str] | None = None,
    target_patterns: Sequence[str] = (),
    recorded: Mapping[str, Any] | None = None,
    task_type: str | None = None,
    auto_mapping: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, T]]:
    """The config and the tensors of PEFT's directory for our LoRA (``adapter_kwargs``, each
    layer's exceptions in ``layer_kwargs``) on ``layers``: :func:`peft_config` and
    :func:`to_peft_tensors` together.

    With the model's ``module_names``, ``target_modules`` is what the ``recorded`` PEFT config
    (the one the model was read from) said, else the user's ``target_patterns`` as a regular
    expression, whichever selects exactly ``layers`` (:func:`peft_target_modules`);
    ``rank_pattern``/``alpha_pattern`` likewise (:func:`peft_patterns`). ``task_type``,
    ``base_model_name_or_path`` and ``auto_mapping`` default to the recorded config's.
    """
    kwargs = {"rank": 16, "alpha": 1.0, **_OUR_DEFAULTS, **adapter_kwargs}
    recorded = dict(recorded or {})
    rank, alpha, rank_pattern, alpha_pattern = peft_patterns(
        layer_kwargs or {},
        layers,
        rank=kwargs.pop("rank"),
        alpha=kwargs.pop("alpha"),
        recorded=recorded or None,
    )
    targets = None
    if module_names is not None:
        targets = peft_target_modules(
            layers, module_names, [recorded.get("target_modules"), glob_regex(target_patterns)]
        )
    if recorded.get("modules_to_save") and _same_saved(
        recorded["modules_to_save"], modules_to_save, module_names
    ):
        to_save: Sequence[str] = recorded["modules_to_save"]
    else:
        to_save = modules_to_save
    task_type = task_type if task_type is not None else recorded.get("task_type")
    config = peft_config(
        layers,
        rank=rank,
        alpha=alpha,
        **kwargs,
        base_model_name_or_path=base_model_name_or_path or recorded.get("base_model_name_or_path"),
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=to_save,
        task_type=task_type,
        auto_mapping=recorded.get("auto_mapping") or auto_mapping,
        revision=recorded.get("revision"),
    )
    out = to_peft_tensors(
        tensors,
        layers,
        embeddings=embeddings,
        use_dora=bool(kwargs["use_dora"]),
        modules_to_save=modules_to_save,
        where=where,
    )
    return config, out


def _same_saved(names: Any, modules: Sequence[str], module_names: Sequence[str] | None) -> bool:
    """Whether PEFT's ``modules_to_save`` entries ``names`` select exactly ``modules`` (full names)
    among ``module_names``, each module's outermost match as PEFT wraps it."""
    if module_names is None or not isinstance(names, list):
        return False
    selected: set[str] = set()
    for name in module_names:
        if name and any(name == n or name.endswith(f".{n}") for n in names):
            if not any(name.startswith(f"{s}.") for s in selected):
                selected.add(name)
    return selected == set(modules)


def load_peft_adapter(
    found: AdapterDirectory,
    read_tensors: Callable[[Path], Mapping[str, T]],
    *,
    allow_patterns: bool = False,
    allow_modules_to_save: bool = False,
) -> PeftAdapter[T]:
    """Check the config of the PEFT directory ``found``, then read its weights with
    ``read_tensors(path)`` (each side its own way) and map them (:func:`peft_adapter`, which
    the two ``allow_`` flags are given to)."""
    where = str(found.weights.with_name(PEFT_CONFIG_NAME))
    check_peft_config(
        found.config, where, allow_modules_to_save=allow_modules_to_save
    )  # before the weights are read
    return peft_adapter(
        found.config,
        read_tensors(found.weights),
        where=where,
        weights=str(found.weights),
        allow_patterns=allow_patterns,
        allow_modules_to_save=allow_modules_to_save,
    )


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
    layer_adapter_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The JSON of ``peft_twins_adapter.json``: what ``from_pretrained`` needs to rebuild the
    adapters (exact layer names, not patterns) and how the file was made; the layers whose
    kwargs differ (``layer_adapter_kwargs``, PEFT's rank/alpha patterns) only where there are any,
    so that other directories stay as they were.

    >>> ours_config(framework="torch", adapter_class="HoulsbyAdapterLinear", adapter_kwargs={"projection_size": 4},
    ...             adapted_layers=["fc"], unfrozen_layers=[])["adapted_layers"]
    ['fc']
    """
    config = {
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
    if layer_adapter_kwargs:
        config["layer_adapter_kwargs"] = {name: dict(value) for name, value in layer_adapter_kwargs.items()}
    return config


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
    per_layer = config.get("layer_adapter_kwargs", {})
    if not isinstance(per_layer, dict) or not all(
        name in config["adapted_layers"] and isinstance(value, dict) for name, value in per_layer.items()
    ):
        raise CheckpointError(
            f"{str(path)!r}: 'layer_adapter_kwargs' must map adapted layers to their own adapter kwargs"
        )
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


def peft_adapter_names(directory: str | os.PathLike[str]) -> list[str]:
    """The adapters a directory holds in PEFT's multi-adapter layout: ``'default'`` when its root
    is a PEFT adapter directory, then each subfolder that is one, by name.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for sub in ("", "french", "notes"):
    ...     (folder / sub).mkdir(exist_ok=True)
    >>> for sub in ("", "french"):
    ...     _ = (folder / sub / PEFT_CONFIG_NAME).write_text("{}"), (folder / sub / PEFT_WEIGHTS_NAME).write_bytes(b"")
    >>> peft_adapter_names(folder)
    ['default', 'french']
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory not found: {str(folder)!r}")
    # The root is 'default'; a subfolder of that name only where the root is not an adapter.
    names = [DEFAULT_ADAPTER_NAME] if _is_peft_directory(folder) else []
    names += sorted(
        sub.name
        for sub in folder.iterdir()
        if sub.name not in names and sub.is_dir() and _is_peft_directory(sub)
    )
    return names


def peft_adapter_directory(directory: str | os.PathLike[str], adapter_name: str | None = None) -> Path:
    """The folder holding the adapter ``adapter_name`` of ``directory`` in PEFT's multi-adapter
    layout: the root for ``'default'`` (and for None), ``directory/<adapter_name>`` for any other.
    An adapter the directory does not hold raises :class:`PeftConversionError` naming those it
    holds; a missing directory ``FileNotFoundError``.

    >>> import tempfile
    >>> try:
    ...     peft_adapter_directory(tempfile.mkdtemp(), "french")
    ... except PeftConversionError as error:
    ...     print(str(error).split("; ")[1])
    it holds [] (PEFT's multi-adapter layout: 'default' at the root, every other in a subfolder named after it)
    """
    folder = Path(directory)
    name = DEFAULT_ADAPTER_NAME if adapter_name is None else adapter_name
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise PeftConversionError(f"adapter name {name!r} is not allowed: a non-empty folder name")
    if name == DEFAULT_ADAPTER_NAME and _is_peft_directory(folder):
        return folder
    if _is_peft_directory(folder / name):
        return folder / name
    names = peft_adapter_names(folder)  # FileNotFoundError for a missing directory
    if adapter_name is None and not names:
        return folder  # the caller's reader names the missing file
    raise PeftConversionError(
        f"no adapter named {name!r} in {str(folder)!r}; it holds {names} (PEFT's multi-adapter layout: "
        f"{DEFAULT_ADAPTER_NAME!r} at the root, every other in a subfolder named after it)"
    )


def peft_adapter_subdirectory(directory: str | os.PathLike[str], adapter_name: str) -> Path:
    """Where PEFT's ``save_pretrained`` writes adapter ``adapter_name`` of several: the root of
    ``directory`` for ``'default'``, ``directory/<adapter_name>`` for any other.

    >>> peft_adapter_subdirectory("out", "default").as_posix(), peft_adapter_subdirectory("out", "fr").as_posix()
    ('out', 'out/fr')
    """
    return Path(directory) if adapter_name == DEFAULT_ADAPTER_NAME else Path(directory) / adapter_name


# --- helpers -----------------------------------------------------------------------------------


def _is_peft_directory(folder: Path) -> bool:
    return (folder / PEFT_CONFIG_NAME).is_file() and (folder / PEFT_WEIGHTS_NAME).is_file()


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
