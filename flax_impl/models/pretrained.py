"""``from_pretrained``: a Flax twin from a transformers ``save_pretrained`` directory, without torch.

The directory holds ``config.json`` and either ``model.safetensors`` or a sharded checkpoint
(``model.safetensors.index.json`` naming its shards). The twin is built from the config, every
tensor is checked (name, shape) before any is written, then the model is returned in **eval mode**
(dropout off), as transformers' ``from_pretrained`` returns it.

Which tensors belong to the twin:

- the names are transformers' (``feature_extractor.conv_layers.0.conv.weight``); a directory saved
  from a model with a head (``Wav2Vec2ForCTC``: ``wav2vec2.``; ``BertForSequenceClassification``:
  ``bert.``; ``WhisperModel``: ``encoder.``; ``WhisperForConditionalGeneration``: ``model.encoder.``)
  is read under that prefix, and the tensors outside it (the head, Whisper's decoder) are *left
  out*: named in ``report.notes``, never loaded, never an error;
- weight norm's older spelling (``weight_g``/``weight_v``, transformers 4 with an older torch) is
  renamed to ``parametrizations.weight.original0/original1``, with a note;
- integer tensors (``position_ids``, ``token_type_ids`` buffers) are not weights: left out, noted;
- anything else that does not fit (a missing, unexpected or mis-shaped tensor) refuses the load
  with a :class:`~twinformat.errors.CheckpointError` listing the keys (``strict=False``: loads
  what fits and reports the rest, the missing variables keeping their random initial values).

Example
-------
>>> import tempfile, json, os
>>> from flax import nnx
>>> from flax_impl.checkpoint import save_state_dict_file, torch_style_state_dict
>>> from flax_impl.models import BertModel
>>> config = {"model_type": "bert", "vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 1,
...           "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}
>>> directory = tempfile.mkdtemp()
>>> with open(os.path.join(directory, "config.json"), "w") as f:
...     json.dump(config, f)
>>> state = torch_style_state_dict(BertModel(config, rngs=nnx.Rngs(0)))
>>> save_state_dict_file({f"bert.{k}": v for k, v in state.items()},
...                      os.path.join(directory, "model.safetensors"))
>>> model, report = BertModel.from_pretrained(directory, output_loading_info=True)
>>> model.embeddings.dropout.deterministic, len(report.loaded) == len(state), report.ok
(True, True, True)
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinformat.errors import CheckpointError

__all__ = ["from_pretrained", "read_pretrained_tensors"]

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_LEGACY_WEIGHT_NORM = {
    ".weight_g": ".parametrizations.weight.original0",
    ".weight_v": ".parametrizations.weight.original1",
}


def read_pretrained_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config.json as a dict, {name: array})`` of a transformers ``save_pretrained`` directory.

    Reads ``model.safetensors`` or every shard of ``model.safetensors.index.json``. Raises
    ``FileNotFoundError`` / :class:`CheckpointError` naming the directory or file when one is
    missing, malformed, or is PyTorch's pickle format (which needs torch to read).
    """
    from flax_impl.checkpoint import load_state_dict_file

    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"not a directory saved with save_pretrained: {directory!r}")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory!r} has no config.json (is it a save_pretrained directory?)")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path!r} does not hold a JSON object")

    single, index = os.path.join(directory, _SINGLE), os.path.join(directory, _INDEX)
    if os.path.isfile(single):
        shards = [single]
    elif os.path.isfile(index):
        index_json = _read_json(index)
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index!r} has no valid 'weight_map' of tensor name -> shard file")
        shards = []
        for name in dict.fromkeys(weight_map.values()):
            shard = os.path.join(directory, name)
            if os.path.dirname(os.path.abspath(shard)) != os.path.abspath(directory):
                raise CheckpointError(f"{index!r} names a shard outside its directory: {name!r}")
            shards.append(shard)
    else:
        pickled = [
            n
            for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
            if os.path.exists(os.path.join(directory, n))
        ]
        hint = (
            f" It holds {pickled[0]}, PyTorch's pickle format, which needs torch: re-save it with "
            "save_pretrained(..., safe_serialization=True) or convert it with `python -m converters`."
            if pickled
            else ""
        )
        raise FileNotFoundError(f"{directory!r} has neither {_SINGLE} nor {_INDEX}.{hint}")

    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        arrays, _ = load_state_dict_file(shard)
        for name, array in arrays.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in two shards of {directory!r}")
            tensors[name] = array
    return config, tensors


def from_pretrained(
    cls: type,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    output_loading_info: bool = False,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    seed: int = 0,
    **model_kwargs: Any,
) -> Any:
    """Build ``cls`` (a Flax twin) from the directory ``path`` and load its weights; eval mode.

    Arguments
    ---------
    cls : type
        The twin class (``BertModel``, ``Wav2Vec2Model``, ...): built as ``cls(config, rngs=...)``.
    path : str or PathLike
        A transformers ``save_pretrained`` directory.
    strict : bool
        Refuse (before returning a model) on a missing, unexpected or mis-shaped tensor.
    output_loading_info : bool
        Also return the :class:`~twinformat.report.KeyReport` (loaded, missing, unexpected,
        notes: what was left out and why).
    dtype, param_dtype, precision
        As the twin's constructor takes them; tensors are cast to ``param_dtype``.
    seed : int
        Seeds the dropout streams (and, with ``strict=False``, the variables the file lacks).
    **model_kwargs
        Passed to the constructor (``attention_implementation="cudnn"``, BERT's ``add_pooling_layer``).

    Returns
    -------
    The model in eval mode, or ``(model, report)`` with ``output_loading_info=True``.
    """
    from flax_impl import interchange as bridge

    config, tensors = read_pretrained_tensors(path)
    expected_type = getattr(cls, "model_type", None)
    found_type = config.get("model_type")
    if expected_type and found_type and found_type != expected_type:
        raise CheckpointError(
            f"{os.fspath(path)!r} holds a {found_type!r} model (config.json model_type), not the "
            f"{expected_type!r} that {cls.__name__} twins"
        )

    def make() -> Any:
        return cls(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            rngs=nnx.Rngs(seed),
            **model_kwargs,
        )

    model = _without_initializers(make, seed) if strict else make()
    expected = {entry.key for entry in bridge.torch_entries(model, strict=False)}
    arrays, notes = _select(tensors, expected, _prefixes(cls))
    report, assignments = bridge._plan_load(model, arrays, strict=False)
    report.notes = notes + report.notes
    if report.mismatched or (strict and not report.ok):
        raise CheckpointError(
            f"cannot load {os.fspath(path)!r} into {cls.__name__} (nothing was loaded):\n{report.describe()}"
        )
    bridge._assign(assignments)
    model.eval()
    return (model, report) if output_loading_info else model


def _prefixes(cls: type) -> tuple[str, ...]:
    """Where a twin's tensors may sit in a checkpoint saved from a bigger transformers model."""
    explicit = getattr(cls, "checkpoint_prefixes", None)
    if explicit is not None:
        return ("", *explicit)
    base = getattr(cls, "base_model_prefix", None)
    return ("", f"{base}.") if base else ("",)


def _select(
    tensors: Mapping[str, np.ndarray], expected: set[str], prefixes: tuple[str, ...]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The tensors of the twin, under its own names, and notes on everything left out."""
    renamed = {}
    notes = []
    for name in tensors:
        new = name
        for old_suffix, new_suffix in _LEGACY_WEIGHT_NORM.items():
            candidate = name[: -len(old_suffix)] + new_suffix
            if name.endswith(old_suffix) and any(candidate == p + k for p in prefixes for k in expected):
                new = candidate
                notes.append(f"renamed {name} -> {new} (weight norm's older spelling)")
        renamed[name] = new

    def hits(prefix: str) -> int:
        return sum(1 for new in renamed.values() if new.startswith(prefix) and new[len(prefix) :] in expected)

    prefix = max(prefixes, key=hits)  # the first of equals: "" wins a tie
    selected: dict[str, np.ndarray] = {}
    left_out: Counter[str] = Counter()
    buffers = []
    for name, new in renamed.items():
        array = tensors[name]
        if not new.startswith(prefix):
            left_out[_group(new)] += 1
        elif np.issubdtype(np.asarray(array).dtype, np.integer) and new[len(prefix) :] not in expected:
            buffers.append(name)
        else:
            selected[new[len(prefix) :]] = array
    if prefix:
        notes.append(f"read the tensors under {prefix!r}")
    if left_out:
        listed = ", ".join(f"{group}* ({count})" for group, count in sorted(left_out.items()))
        notes.append(f"left out {sum(left_out.values())} tensor(s) outside this model: {listed}")
    notes.extend(f"{name}: integer buffer, not a weight, left out" for name in buffers)
    return selected, notes


def _group(name: str) -> str:
    """``'decoder.layers.0.fc1.weight'`` -> ``'decoder.'``: what a left-out tensor belongs to."""
    head, dot, _ = name.partition(".")
    return head + dot


def _without_initializers(make: Callable[[], Any], seed: int) -> Any:
    """``make()``'s module with zero-filled variables, built without running its initializers (a
    strict load overwrites every one), and distinct random keys for its dropout streams."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    base = jax.random.key(seed)
    counter = iter(range(1 << 30))

    def fill(abstract: jax.ShapeDtypeStruct) -> jax.Array:
        if jax.dtypes.issubdtype(abstract.dtype, jax.dtypes.prng_key):
            keys = jax.random.fold_in(base, next(counter))
            return jnp.broadcast_to(keys, abstract.shape) if abstract.shape else keys
        return jnp.zeros(abstract.shape, abstract.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {path!r}: {type(exc).__name__}: {exc}") from exc
