"""What an adapter file records about its adapters, checked against the model that loads it.

Framework-free. Our savers record the adapter class (its declaration's ``name``) and the
adapter's keyword arguments in the file's metadata (:func:`twinformat.format.adapter_metadata`),
and the kind of every layer they write (``layer_kinds``). A loader compares the recorded class
and kwargs with the model's, defaults filled in from the declaration, so that a model built with
``alpha=1`` refuses a file trained with ``alpha=16`` instead of computing with the wrong scaling.
Files that record nothing (SpeechBrain's ``.ckpt``, foreign safetensors) are not checked.

Class-valued kwargs (Houlsby's ``activation``) are recorded as dotted names; the two twins' own
classes (``torch_impl.activations.Swish``, ``flax_impl.activations.Swish``) are the same
activation, so such names are compared by the class name alone.

Example
-------
>>> meta = {"adapter_class": "LoRA", "adapter_kwargs": '{"rank": 8, "alpha": 16.0}'}
>>> check_recorded_adapter(meta, "LoRA", {"rank": 8, "alpha": 16}, where="a.safetensors")
>>> check_recorded_adapter(meta, "LoRA", {"rank": 8}, where="a.safetensors")
Traceback (most recent call last):
...
twinformat.errors.CheckpointError: checkpoint 'a.safetensors' does not fit this AdaptedModel: it was saved from LoRA(alpha=16.0, dropout=0.0, rank=8, use_dora=False, use_rslora=False) but this model has LoRA(alpha=1.0, dropout=0.0, rank=8, use_dora=False, use_rslora=False): alpha differs (file 16.0, model 1.0); build the AdaptedModel with adapter_kwargs matching the file
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, cast

from .adapters import ADAPTERS, get_adapter
from .errors import CheckpointError

__all__ = [
    "LAYER_KWARGS_FIELD",
    "check_recorded_layer_kwargs",
    "layer_kwargs_entry",
    "TWIN_PACKAGES",
    "check_recorded_adapter",
    "class_path",
    "is_persistence_name",
    "not_forwarded_message",
    "layer_kinds_entry",
    "recorded_adapter",
    "recorded_jsonable",
    "resolve_recorded_class",
    "signature_defaults",
]

# Dotted names under these packages name a twin's own class: the same class in the other twin.
TWIN_PACKAGES = ("torch_impl", "flax_impl")


def class_path(value: type) -> str:
    """The dotted name a file records for a class-valued kwarg (``'torch_impl.activations.Swish'``)."""
    return f"{value.__module__}.{value.__qualname__}"


def recorded_adapter(metadata: Mapping[str, str], *, where: str) -> tuple[str, dict[str, Any]] | None:
    """``(adapter class name, recorded kwargs)`` of a file's metadata, or None when it records none.

    Raises :class:`CheckpointError` naming ``where`` when ``adapter_kwargs`` is not a JSON object.

    >>> recorded_adapter({"adapter_class": "LoRA", "adapter_kwargs": '{"rank": 2}'}, where="f")
    ('LoRA', {'rank': 2})
    >>> recorded_adapter({}, where="f") is None
    True
    """
    name = metadata.get("adapter_class") or ""
    if not name:
        return None
    raw = metadata.get("adapter_kwargs") or "{}"
    try:
        kwargs = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where!r}: metadata 'adapter_kwargs' is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where!r}: metadata 'adapter_kwargs' must be a JSON object, got {raw!r:.100}")
    return str(name), kwargs


def check_recorded_adapter(
    metadata: Mapping[str, str],
    adapter_class: str,
    adapter_kwargs: Mapping[str, Any] | None,
    *,
    where: str,
    class_defaults: Mapping[str, Any] | None = None,
) -> None:
    """Raise :class:`CheckpointError` when the file's recorded adapter differs from the model's.

    Parameters
    ----------
    metadata : mapping
        The file's header metadata (``{}`` for files that record nothing: nothing is checked).
    adapter_class : str
        The model's adapter class name (its declaration's ``name``).
    adapter_kwargs : mapping
        The model's ``adapter_kwargs`` as given to ``AdaptedModel``.
    where : str
        The file, for the message.
    class_defaults : mapping, optional
        Keyword defaults of the model's adapter class (from its signature), filled in after the
        declaration's, so an option a class has but its declaration omits compares as its default.
    """
    recorded = recorded_adapter(metadata, where=where)
    if recorded is None:
        return
    file_class, file_kwargs = recorded
    if file_class != adapter_class:
        raise CheckpointError(
            f"checkpoint {where!r} does not fit this AdaptedModel: it holds {file_class} adapters but "
            f"this model has {adapter_class} adapters; "
            f"build the AdaptedModel with adapter_class={file_class}"
        )
    defaults = recorded_jsonable(dict(class_defaults or {}))
    if file_class in ADAPTERS:
        defaults.update(recorded_jsonable(dict(get_adapter(file_class).defaults)))
    file_full = {**defaults, **file_kwargs}
    model_full = {**defaults, **recorded_jsonable(dict(adapter_kwargs or {}))}
    differ = [
        key
        for key in sorted(set(file_full) | set(model_full))
        if not _same(file_full.get(key, _ABSENT), model_full.get(key, _ABSENT))
    ]
    if differ:
        details = ", ".join(
            f"{key} differs (file {_show(file_full.get(key, _ABSENT))}, model {_show(model_full.get(key, _ABSENT))})"
            for key in differ
        )
        raise CheckpointError(
            f"checkpoint {where!r} does not fit this AdaptedModel: it was saved from "
            f"{file_class}({_signature(file_full)}) but this model has "
            f"{adapter_class}({_signature(model_full)}): {details}; build the AdaptedModel with "
            "adapter_kwargs matching the file"
        )


#: The metadata field of the layers whose adapter kwargs differ from the file-wide ones (PEFT's
#: ``rank_pattern`` / ``alpha_pattern``): JSON ``{layer: {"rank": ..., "alpha": ...}}``.
LAYER_KWARGS_FIELD = "layer_adapter_kwargs"


def layer_kwargs_entry(layer_kwargs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The metadata entry recording ``layer_kwargs`` (nothing when empty, so a file without
    per-layer options is byte for byte what it was).

    >>> layer_kwargs_entry({})
    {}
    >>> layer_kwargs_entry({"fc": {"alpha": 4.0}})
    {'layer_adapter_kwargs': '{"fc": {"alpha": 4.0}}'}
    """
    if not layer_kwargs:
        return {}
    return {
        LAYER_KWARGS_FIELD: json.dumps(
            recorded_jsonable({k: dict(v) for k, v in layer_kwargs.items()}), sort_keys=True
        )
    }


def check_recorded_layer_kwargs(
    metadata: Mapping[str, str], layer_kwargs: Mapping[str, Mapping[str, Any]], *, where: str
) -> None:
    """Raise :class:`CheckpointError` when a file of ours records other per-layer adapter kwargs
    than the model has (a layer's alpha from PEFT's ``alpha_pattern`` at an unchanged rank would
    otherwise load and scale its update wrongly). Files that record no adapter (SpeechBrain's)
    are not checked.

    >>> check_recorded_layer_kwargs({}, {"fc": {"alpha": 4.0}}, where="x")
    >>> meta = {"adapter_class": "LoRA", "adapter_kwargs": "{}", **layer_kwargs_entry({"fc": {"alpha": 4.0}})}
    >>> check_recorded_layer_kwargs(meta, {}, where="x.safetensors")
    Traceback (most recent call last):
    ...
    twinformat.errors.CheckpointError: checkpoint 'x.safetensors' does not fit this AdaptedModel: layer 'fc' was saved with {'alpha': 4.0} but this model has the model-wide adapter_kwargs there; build the model with AdaptedModel(..., layer_adapter_kwargs={'fc': {'alpha': 4.0}}) (AdaptedModel.from_pretrained of a PEFT directory sets them)
    """
    if not metadata.get("adapter_class"):
        return
    raw = metadata.get(LAYER_KWARGS_FIELD)
    try:
        recorded = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise CheckpointError(
            f"checkpoint {where!r}: its {LAYER_KWARGS_FIELD} metadata is not JSON"
        ) from None
    ours = recorded_jsonable({k: dict(v) for k, v in layer_kwargs.items()})
    for layer in sorted(set(recorded) | set(ours)):
        if recorded.get(layer) != ours.get(layer):
            wide = "the model-wide adapter_kwargs there"
            theirs = recorded.get(layer, "the file-wide adapter_kwargs")
            raise CheckpointError(
                f"checkpoint {where!r} does not fit this AdaptedModel: layer {layer!r} was saved with "
                f"{theirs} but this model has {ours.get(layer, wide)}; build the model with "
                f"AdaptedModel(..., layer_adapter_kwargs={recorded or {}!r}) (AdaptedModel.from_pretrained "
                "of a PEFT directory sets them)"
            )


def layer_kinds_entry(kinds: Mapping[str, str], keys: Iterable[str]) -> str:
    """The ``layer_kinds`` metadata value for a file holding ``keys``: the kind of every module
    that owns one of them (JSON, sorted).

    >>> layer_kinds_entry({"fc": "linear", "ln": "layer_norm"}, ["fc.weight", "fc.bias"])
    '{"fc": "linear"}'
    """
    owners = {key.rpartition(".")[0] for key in keys}
    return json.dumps({module: kind for module, kind in kinds.items() if module in owners}, sort_keys=True)


class _Absent:
    def __repr__(self) -> str:
        return "<not given>"


_ABSENT = _Absent()
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, str) and isinstance(b, str):
        # a kwarg without a JSON form is recorded as its repr, whose memory address changes
        # from one process to the next: compare without it
        a, b = _ADDRESS.sub("", a), _ADDRESS.sub("", b)
        return a == b or _twin_class_name(a) == _twin_class_name(b) != ""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _twin_class_name(name: str) -> str:
    """``'Swish'`` for ``'torch_impl.activations.Swish'`` or ``'flax_impl.activations.Swish'``."""
    if name.split(".")[0] in TWIN_PACKAGES and "." in name:
        return name.rpartition(".")[2]
    return ""


def recorded_jsonable(value: Any) -> Any:
    """Adapter kwargs as a file records them (classes as dotted names, tuples as lists).

    >>> recorded_jsonable({"rank": 2, "activation": int, "sizes": (1, 2)})
    {'rank': 2, 'activation': 'builtins.int', 'sizes': [1, 2]}
    """
    if isinstance(value, dict):
        return {str(k): recorded_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [recorded_jsonable(v) for v in value]
    if isinstance(value, type):
        return class_path(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _show(value: Any) -> str:
    return repr(value)


def _signature(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={_show(value)}" for key, value in sorted(kwargs.items()))


def signature_defaults(adapter_class: Any) -> dict[str, Any]:
    """The keyword defaults of an adapter class's constructor, less the wrapped layer and ``rngs``.

    >>> class Adapter:
    ...     def __init__(self, target, rank=16, alpha=1.0, *, rngs=None): ...
    >>> signature_defaults(Adapter)
    {'rank': 16, 'alpha': 1.0}
    """
    import inspect

    # The constructor itself: a metaclass (NNX's) may hide it behind ``(*args, **kwargs)``.
    # (``cast``: mypy refuses ``__init__`` on a narrowed ``type``; the class's own is what we want.)
    init = cast(Any, adapter_class).__init__ if isinstance(adapter_class, type) else adapter_class
    try:
        parameters = list(inspect.signature(init).parameters.values())
    except (TypeError, ValueError):
        return {}
    skip = 2 if isinstance(adapter_class, type) else 1  # self, the wrapped layer
    return {
        p.name: p.default
        for p in parameters[skip:]
        if p.default is not inspect.Parameter.empty and p.name != "rngs"
    }


def resolve_recorded_class(path: str, *, twin: str, refuse: Iterable[str], where: str) -> type:
    """The class a file records as the dotted name ``path``, in the twin ``twin``.

    A name under either twin's package resolves in ``twin`` (the twins mirror each other file
    for file: ``flax_impl.activations.Swish`` is ``torch_impl.activations.Swish`` there); a name
    under a package of ``refuse`` (the other framework) or ``converters`` raises
    :class:`CheckpointError`, as does any name that does not import.

    >>> resolve_recorded_class("collections.OrderedDict", twin="torch_impl", refuse=("jax",), where="f")
    <class 'collections.OrderedDict'>
    >>> resolve_recorded_class("jax.nn.gelu", twin="torch_impl", refuse=("jax",), where="f")
    Traceback (most recent call last):
    ...
    twinformat.errors.CheckpointError: 'f' records the class 'jax.nn.gelu', which torch_impl cannot use
    """
    import importlib

    root, _, rest = path.partition(".")
    if root in TWIN_PACKAGES and rest:
        path = f"{twin}.{rest}"
    elif root in (*refuse, "converters"):
        raise CheckpointError(f"{where!r} records the class {path!r}, which {twin} cannot use")
    module_name, _, qualname = path.rpartition(".")
    try:
        value: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"{where!r} records the class {path!r}, which does not import: {exc}") from None
    if not isinstance(value, type):
        raise CheckpointError(f"{where!r} records {path!r}, which is not a class")
    return value


# Attributes of a wrapped model that save, load or convert it as if it were not adapted:
# transformers' save_pretrained would write 'query.pretrained_module.weight' keys that its own
# from_pretrained then reports missing and initialises at random.
_PERSISTENCE_NAMES = frozenset(
    {
        "push_to_hub",
        "save_pretrained",
        "from_pretrained",
        "from_config",
        "to_bettertransformer",
        "reverse_bettertransformer",
        "merge_and_unload",
        "unload",
        "dequantize",
        # transformers' own PEFT integration would put a second kind of adapter on the bare model
        "add_adapter",
        "set_adapter",
        "delete_adapter",
        "enable_adapters",
        "disable_adapters",
        "active_adapter",
        "active_adapters",
    }
)
_PERSISTENCE_PREFIXES = (
    "save_",
    "load_",
    "from_",
    "push_to_",
    "export_",
    "convert_",
    "to_onnx",
    "to_torchscript",
)


def is_persistence_name(name: str) -> bool:
    """Whether an ``AdaptedModel`` must not hand the attribute ``name`` to the wrapped model:
    it would save, load or convert that model as if it were not adapted.

    >>> [is_persistence_name(n) for n in ("push_to_hub", "load_adapter", "get_adapter_state_dict")]
    [True, True, True]
    >>> [is_persistence_name(n) for n in ("config", "pretrained_module", "gradient_checkpointing_enable")]
    [False, False, False]
    """
    return (
        name in _PERSISTENCE_NAMES
        or name.startswith(_PERSISTENCE_PREFIXES)
        or name.endswith("_pretrained")
        or "state_dict" in name
    )


def not_forwarded_message(wrapper: str, wrapped: str, name: str) -> str:
    """The message of the ``AttributeError`` for an attribute :func:`is_persistence_name` keeps."""
    return (
        f"{wrapper} does not pass {name!r} to the wrapped {wrapped}: it would save, load or convert "
        f"the {wrapped} as if it were not adapted (its adapted layers hold 'pretrained_module' children). "
        f"Use {wrapper}.save_pretrained / {wrapper}.from_pretrained / saver / loader for the adapters, or call "
        f"model.adapted_model.{name} explicitly if you mean the wrapped model itself"
    )
