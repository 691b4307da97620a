"""``from_pretrained``: a Flax twin from a transformers ``save_pretrained`` directory, without torch,
at any size: built abstractly, read one tensor at a time, each placed straight onto its devices.

The directory holds ``config.json`` and either ``model.safetensors`` or a sharded checkpoint
(``model.safetensors.index.json`` naming its shards). In order:

1. **Check** (headers only, no tensor read): the twin is built abstractly (``nnx.eval_shape``: no
   initializer runs, no array is allocated), its variables' PyTorch names and shapes are planned
   against the safetensors headers (:func:`twinformat.plan.plan_load`), and the partition rules
   against the shapes and the mesh. Any refusal raises here, having read nothing.
2. **Write**: shard by shard (``safe_open``, one file mapped at a time), tensor by tensor, each
   variable becomes a ``jax.Array`` built with ``jax.make_array_from_callback``: every device's
   block is read with ``get_slice``, re-laid out (torch ``(out, in)`` -> Flax ``(in, out)``, by the
   layout table of :mod:`twinformat.kinds`) and cast to the variable's ``param_dtype``. Host memory
   is the mapped shard plus one tensor's blocks (``benchmarks/results/loading.md`` measures it).
3. The model is returned in **eval mode** (dropout off), as transformers' ``from_pretrained`` does.

Which tensors belong to the twin:

- the names are transformers' (``feature_extractor.conv_layers.0.conv.weight``); a directory saved
  from a model with a head (``Wav2Vec2ForCTC``: ``wav2vec2.``; ``BertForSequenceClassification``:
  ``bert.``; ``WhisperModel``: ``encoder.``; ``WhisperForConditionalGeneration``: ``model.encoder.``)
  is read under that prefix, and the tensors outside it (the head, Whisper's decoder) are *left
  out*: named in ``report.notes``, never loaded, never an error;
- weight norm's older spelling (``weight_g``/``weight_v``, transformers 4 with an older torch) is
  renamed to ``parametrizations.weight.original0/original1``, with a note;
- a twin may stand for a part of a bigger transformers model whose checkpoint has another
  ``model_type`` and names that are not one prefix away: ``checkpoint_layouts``, a tuple of
  :class:`CheckpointLayout` (Gemma 3's text twins read the language model of a
  ``Gemma3ForConditionalGeneration``, ``model_type`` ``gemma3``, in either of its two spellings). The
  layout with the most hits is read; the parts it names (a vision tower) are *left out*, noted,
  and the twin records the layout as ``peft_layout`` (:class:`CheckpointLayout`);
- integer tensors (``position_ids``, ``token_type_ids`` buffers) are not weights: left out, noted;
- **tied weights**: a twin may set ``tied_weights = {tied key: key it is tied to}`` (an LLM with
  ``tie_word_embeddings``: ``{"lm_head.weight": "model.embed_tokens.weight"}``), naming a key it
  does not store. The file may omit the tied key (transformers does); a file holding it has it
  compared with its source, value for value, before anything is placed: equal, it is dropped with
  a note; different, the load is refused naming both keys; alone, it loads the source, noted;
- anything else that does not fit (a missing, unexpected or mis-shaped tensor) refuses the load
  with a :class:`~twinformat.errors.CheckpointError` listing the keys (``strict=False``: builds the
  model concretely, loads what fits and reports the rest, the missing variables keeping their
  random initial values).

On a mesh (``mesh=``, ``rules=``, see :mod:`flax_impl.models.partitioning`) each variable is
partitioned by the first rule whose glob matches its Flax path, replicated when none does; then
:class:`flax_impl.AdaptedModel` puts each LoRA factor where the kernel it adapts lives.

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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from twinformat.dtypes import TensorSpec, nbytes, numpy_dtype
from twinformat.errors import CheckpointError
from twinformat.format import read_safetensors_header
from twinformat.kinds import WEIGHT_NORM_SPELLINGS, permutation
from twinformat.names import dotted
from twinformat.plan import plan_load
from twinformat.report import KeyReport
from twinformat.state import FlatState

from .partitioning import Rules, partition_specs

__all__ = ["CheckpointLayout", "from_pretrained", "read_pretrained_tensors"]

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
# Tied tensors are compared this many bytes at a time: the comparison must not hold two copies of
# an LLM's embedding (Llama 3 8B: 128256 x 4096 x 2 bytes = 1 GiB each) on top of the budget.
_COMPARE_BYTES = 64 << 20
# A transposed tensor is read this many bytes at a time into its Flax-layout block.
_SLAB_BYTES = 16 << 20
_TILE = 128


@dataclass(frozen=True)
class CheckpointLayout:
    """Where a twin's tensors sit in the checkpoint (or PEFT adapter) of a bigger transformers model,
    one spelling of it: the twin stands for a part of ``model_class`` and holds nothing else.

    ``renames`` are ``(checkpoint prefix, twin prefix)`` pairs, both ending in ``"."`` (or a twin
    prefix ``""``: the part is the twin's root); a name under none of the checkpoint prefixes is
    outside the twin. ``other_parts`` are the prefixes of what the twin leaves out (a vision
    tower), named in notes and refusals; ``part`` says in words what the twin holds. The layout
    is declared for the checkpoints whose ``config.json`` says ``model_type``.

    A twin declares its layouts as ``checkpoint_layouts``; the first of a ``model_type`` is
    transformers' module names, which PEFT's adapter keys use: ``from_pretrained`` records it as
    the twin's ``peft_layout``, whatever spelling the file had (see :mod:`flax_impl.pretrained`).
    (:func:`from_pretrained` also describes a twin's own checkpoints, under one prefix each, as
    layouts with an empty ``model_class``.)

    Example
    -------
    >>> layout = CheckpointLayout("gemma3", "Gemma3ForConditionalGeneration", "language model",
    ...                           (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    ...                           ("model.vision_tower.",))
    >>> layout.twin_name("model.language_model.layers.0.mlp.up_proj.weight")
    'model.layers.0.mlp.up_proj.weight'
    >>> layout.twin_name("model.vision_tower.encoder.layers.0.fc1.weight") is None
    True
    >>> layout.checkpoint_name("model.layers.0.self_attn.q_proj"), layout.checkpoint_name("model")
    ('model.language_model.layers.0.self_attn.q_proj', 'model.language_model')
    """

    model_type: str
    model_class: str
    part: str
    renames: tuple[tuple[str, str], ...]
    other_parts: tuple[str, ...] = ()

    def twin_name(self, name: str) -> str | None:
        """The twin's name for the checkpoint's dotted ``name`` (a tensor's or a module's), or None
        when it lies outside the twin."""
        for checkpoint_prefix, twin_prefix in self.renames:
            if f"{name}.".startswith(checkpoint_prefix):
                return (twin_prefix + name[len(checkpoint_prefix) :]).rstrip(".")
        return None

    def checkpoint_name(self, name: str) -> str | None:
        """The checkpoint's name for the twin's dotted ``name``, or None when no rename covers it
        (the twin's root, where the part is not the root)."""
        for checkpoint_prefix, twin_prefix in self.renames:
            if f"{name}.".startswith(twin_prefix):
                return (checkpoint_prefix + name[len(twin_prefix) :]).rstrip(".")
        return None

    def other_part(self, name: str) -> str | None:
        """The prefix of :attr:`other_parts` that ``name`` lies in, or None."""
        return next((p for p in self.other_parts if f"{name}.".startswith(p)), None)

    def note(self) -> str:
        """What a load under this layout read, and what it left out."""
        renames = ", ".join(f"{c}* as {t + '*' if t else 'the root'}" for c, t in self.renames)
        return f"read the {self.part} of a {self.model_class} checkpoint ({renames}); its other parts are not in this twin"


@dataclass(frozen=True)
class _Checkpoint:
    """A ``save_pretrained`` directory seen through its headers: nothing read but them."""

    directory: str
    config: dict[str, Any]
    files: list[str]  # the safetensors files, in the index's order
    specs: dict[str, TensorSpec]  # every tensor, file by file in offset order
    file_of: dict[str, str]


def _open_checkpoint(path: str | os.PathLike[str]) -> _Checkpoint:
    """Read ``config.json``, find the safetensors files, and read and cross-check their headers."""
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
    weight_map: dict[str, str] | None = None
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        index_json = _read_json(index)
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index!r} has no valid 'weight_map' of tensor name -> shard file")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            shard = os.path.join(directory, name)
            if os.path.dirname(os.path.abspath(shard)) != os.path.abspath(directory):
                raise CheckpointError(f"{index!r} names a shard outside its directory: {name!r}")
            files.append(shard)
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

    specs: dict[str, TensorSpec] = {}
    file_of: dict[str, str] = {}
    for file in files:
        header, _ = read_safetensors_header(file)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if name in specs:
                raise CheckpointError(f"tensor {name!r} appears in two shards of {directory!r}")
            if weight_map is not None and weight_map.get(name) != os.path.basename(file):
                raise CheckpointError(
                    f"{file!r} holds tensor {name!r}, which {_INDEX} maps to {weight_map.get(name)!r}"
                )
            numpy_dtype(info["dtype"], where=f"{file!r}, tensor {name!r}")
            specs[name] = (info["dtype"], tuple(info["shape"]))
            file_of[name] = file
    if weight_map is not None:
        absent = [name for name in weight_map if name not in specs]
        if absent:
            raise CheckpointError(f"{index!r} names tensors its shards lack: {absent[:5]}")
    return _Checkpoint(directory, config, files, specs, file_of)


def read_pretrained_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config.json as a dict, {name: array})`` of a transformers ``save_pretrained`` directory.

    Reads ``model.safetensors`` or every shard of ``model.safetensors.index.json``, whole: for a
    model that fits in memory twice (:func:`from_pretrained` streams instead). Raises
    ``FileNotFoundError`` / :class:`CheckpointError` naming the directory or file when one is
    missing, malformed, or is PyTorch's pickle format (which needs torch to read).
    """
    from flax_impl.checkpoint import load_state_dict_file

    checkpoint = _open_checkpoint(path)
    tensors: dict[str, np.ndarray] = {}
    for file in checkpoint.files:
        tensors.update(load_state_dict_file(file)[0])
    return checkpoint.config, tensors


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
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    **model_kwargs: Any,
) -> Any:
    """Build ``cls`` (a Flax twin) from the directory ``path`` and load its weights; eval mode.

    Arguments
    ---------
    cls : type
        The twin class (``BertModel``, ``Wav2Vec2Model``, ...): built as ``cls(config, rngs=...)``.
    path : str or PathLike
        A transformers ``save_pretrained`` directory (one file or a sharded index).
    strict : bool
        Refuse (before reading any tensor) on a missing, unexpected or mis-shaped tensor. With
        ``strict=False`` the model is built concretely (random initial values for what the file
        lacks), which costs one full initialisation; a mis-shaped tensor is refused either way.
    output_loading_info : bool
        Also return the :class:`~twinformat.report.KeyReport` (loaded, missing, unexpected,
        notes: what was left out, tied, cast, and why).
    dtype, param_dtype, precision
        As the twin's constructor takes them; tensors are cast to ``param_dtype`` (a cast is
        noted): ``param_dtype=jnp.bfloat16`` loads an LLM in half the memory of float32.
    seed : int
        Seeds the dropout streams (and, with ``strict=False``, the variables the file lacks).
    mesh : jax.sharding.Mesh, optional
        The devices to place the weights on; default: one device (``jax.devices()[0]``).
    rules : list, optional
        ``(glob, PartitionSpec)`` pairs, or a function of ``(shapes, mesh)`` returning them.
        Partition rules over the variables' dotted Flax paths, specs in Flax layout (see
        :mod:`flax_impl.models.partitioning` for the rules and the default sets); first match
        wins, unmatched variables are replicated on ``mesh``. Needs ``mesh``.
    **model_kwargs
        Passed to the constructor (``attention_implementation="cudnn"``, BERT's ``add_pooling_layer``).

    Returns
    -------
    The model in eval mode, or ``(model, report)`` with ``output_loading_info=True``.

    Raises
    ------
    CheckpointError
        The file does not fit the twin (the message lists the keys), tied tensors differ, or a
        tensor cannot be read; nothing is returned.
    flax_impl.sharding.ShardingRuleError
        A rule naming an axis the mesh lacks, or splitting a dimension the mesh does not divide.

    Example
    -------
    >>> import tempfile, json, os, jax
    >>> from flax import nnx
    >>> from flax_impl.checkpoint import save_state_dict_file, torch_style_state_dict
    >>> from flax_impl.models import BertModel
    >>> from flax_impl.models.partitioning import make_mesh, tensor_parallel_rules
    >>> config = {"model_type": "bert", "vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1,
    ...           "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 8}
    >>> directory = tempfile.mkdtemp()
    >>> with open(os.path.join(directory, "config.json"), "w") as f:
    ...     json.dump(config, f)
    >>> save_state_dict_file(torch_style_state_dict(BertModel(config, rngs=nnx.Rngs(0))),
    ...                      os.path.join(directory, "model.safetensors"))
    >>> mesh = make_mesh({"model": -1})  # every device
    >>> model = BertModel.from_pretrained(directory, mesh=mesh, rules=tensor_parallel_rules("bert"))
    >>> model.encoder.layer[0].attention.self.query.kernel[...].sharding.spec
    P(None, 'model')
    """
    from flax_impl import interchange as bridge

    if rules is not None and mesh is None:
        raise ValueError(
            "rules= partitions the weights over a mesh: pass mesh= too (see partitioning.make_mesh)"
        )
    checkpoint = _open_checkpoint(path)
    config = checkpoint.config
    layouts = _layouts(cls, config.get("model_type"), os.fspath(path))

    def make() -> Any:
        return cls(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            rngs=nnx.Rngs(seed),
            **model_kwargs,
        )

    # Strict: every variable is overwritten, so build shapes only (an 8B LLM: no 32 GB of random
    # float32 first). Not strict: what the file lacks keeps its random initial value.
    model = nnx.eval_shape(make) if strict else make()

    # ---- check: headers, names, shapes, tied keys, partition rules; nothing read yet
    entries = {entry.key: entry for entry in bridge.torch_entries(model, strict=False)}
    tied = {k: v for k, v in dict(getattr(model, "tied_weights", None) or {}).items() if k not in entries}
    names, notes, layout = _select(checkpoint.specs, set(entries) | set(tied), layouts)
    source = FlatState({key: checkpoint.specs[name] for key, name in names.items()}, framework="dict")
    target = bridge.model_state(model)
    target.aliases = {**target.aliases, **tied}  # the bridge declares ties it knows; keep both
    plan = plan_load(source, target, strict=False)
    report = plan.report
    report.notes = notes + report.notes
    for alias, primary in plan.alias_checks:
        if source.specs[alias] != source.specs[primary]:
            report.mismatched.append(
                f"{alias}: tied to {primary}, but the file holds {source.specs[alias]} and {source.specs[primary]}"
            )
    if report.mismatched or (strict and not report.ok):
        raise CheckpointError(
            f"cannot load {os.fspath(path)!r} into {cls.__name__} (nothing was loaded):\n{report.describe()}"
        )
    shardings = _shardings(model, mesh, rules, report)
    for alias, primary in plan.alias_checks:  # values: the one check that reads (two tensors)
        if not _same_tensor(checkpoint, names[alias], names[primary]):
            raise CheckpointError(
                f"cannot load {os.fspath(path)!r} into {cls.__name__} (nothing was loaded): {alias} is "
                f"tied to {primary} in this model, but the file holds different values for "
                f"{names[alias]!r} and {names[primary]!r}; load it into a twin built with "
                "tie_word_embeddings=False (config.json), which stores both"
            )

    # ---- write: shard by shard, tensor by tensor, each straight onto its devices
    by_file: dict[str, list[str]] = {}
    for key, source_key in plan.reads.items():
        by_file.setdefault(checkpoint.file_of[names[source_key]], []).append(key)
    order = {name: i for i, name in enumerate(checkpoint.specs)}  # offset order: sequential reads
    placed: set[int] = set()
    for file in checkpoint.files:
        keys = sorted(by_file.get(file, []), key=lambda k: order[names[plan.reads[k]]])
        if not keys:
            continue
        with _safe_open(file) as handle:
            for key in keys:
                entry = entries[key]
                sharding = shardings[dotted(entry.path)]
                entry.variable.set_value(_read_array(handle, file, names[plan.reads[key]], entry, sharding))
                placed.add(id(entry.variable))
    _place_the_rest(model, shardings, placed, seed)
    if layout.model_class:
        model.peft_layout = layouts[0]  # transformers' module names, which PEFT's keys use
    model.eval()
    return (model, report) if output_loading_info else model


def _shardings(model: Any, mesh: Mesh | None, rules: Rules | None, report: KeyReport) -> dict[str, Any]:
    """``{flax path: sharding}`` of every variable: ``rules``' specs on ``mesh`` (random-key
    streams replicated), or the default device. Checked against the shapes; notes unused rules."""
    variables = {dotted(path): variable for path, variable in nnx.to_flat_state(nnx.state(model))}
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return dict.fromkeys(variables, device)
    shapes = {
        path: tuple(variable.get_value().shape)
        for path, variable in variables.items()
        if not isinstance(variable, nnx.RngState)
    }
    specs, unused = partition_specs(shapes, mesh, rules)
    if unused:  # a rule set serves a family: a model without biases or lm_head leaves some idle
        report.notes.append(f"partition rules that matched no variable: {unused}")
    return {path: NamedSharding(mesh, specs.get(path, PartitionSpec())) for path in variables}


def _read_array(handle: Any, file: str, name: str, entry: Any, sharding: Any) -> jax.Array:
    """Tensor ``name`` of the open ``file`` as a ``jax.Array`` in Flax layout and the variable's
    dtype, with ``sharding``: each device's block alone is read (``get_slice``) and re-laid out."""
    value = entry.variable.get_value()
    shape, dtype = tuple(value.shape), np.dtype(value.dtype)
    perm = permutation(entry.kind, entry.torch_name, len(shape))  # flax axis i = torch axis perm[i]
    blocks: dict[tuple[Any, ...], np.ndarray] = {}  # replicas share one read

    def read_block(index: tuple[slice, ...] | None) -> np.ndarray:
        index = index if index is not None else (slice(None),) * len(shape)
        bounds = tuple(s.indices(n) for s, n in zip(index, shape, strict=True))
        if bounds not in blocks:
            try:
                blocks[bounds] = _read_block(handle, name, index, shape, perm, dtype)
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read tensor {name!r} from {file!r}: {exc}") from None
        return blocks[bounds]

    return jax.make_array_from_callback(shape, sharding, read_block)


def _read_block(
    handle: Any,
    name: str,
    index: tuple[slice, ...],
    shape: tuple[int, ...],
    perm: tuple[int, ...],
    dtype: Any,
) -> np.ndarray:
    """``flax_tensor[index]`` as a new C-contiguous array of ``dtype``, read from the torch-layout
    tensor ``name`` in slabs of its first axis, each transposed into place: reading the block
    whole, then transposing it, would hold it twice (Llama 3 8B's embedding: 2 x 1 GiB)."""
    if not shape:
        return np.asarray(handle.get_tensor(name), dtype=dtype)
    torch_index: list[slice] = [slice(None)] * len(shape)
    for flax_axis, torch_axis in enumerate(perm):
        torch_index[torch_axis] = index[flax_axis]
    tensor = handle.get_slice(name)
    if perm == tuple(range(len(shape))):  # same layout: the read is the block
        return np.asarray(tensor[tuple(torch_index)], dtype=dtype, order="C")
    out = np.empty([len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True)], dtype)
    first = torch_index[0].indices(shape[perm.index(0)])  # torch axis 0 is flax axis perm.index(0)
    rows = len(range(*first))
    row_bytes = max(1, out.nbytes // max(1, rows))
    step = max(1, _SLAB_BYTES // row_bytes)
    target: list[slice] = [slice(None)] * len(shape)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        torch_index[0] = slice(first[0] + start * first[2], first[0] + stop * first[2], first[2])
        target[perm.index(0)] = slice(start, stop)
        _copy_tiled(out[tuple(target)], np.transpose(tensor[tuple(torch_index)], perm))
    return out


def _copy_tiled(out: np.ndarray, view: np.ndarray) -> None:
    """``out[...] = view`` for a transposed ``view``, 128 x 128 tiles at a time when it is a matrix:
    numpy's plain strided copy misses the cache on nearly every element (a 4096 x 1024 bf16
    kernel: 62 ms plain, 14 ms tiled). The same idea as ``converters.files.contiguous``, which
    flax_impl cannot import."""
    if view.ndim != 2 or view.size < _TILE * _TILE:
        out[...] = view
        return
    rows, cols = view.shape
    for i in range(0, rows, _TILE):
        for j in range(0, cols, _TILE):
            out[i : i + _TILE, j : j + _TILE] = view[i : i + _TILE, j : j + _TILE]


def _place_the_rest(model: Any, shardings: Mapping[str, Any], placed: set[int], seed: int) -> None:
    """Give every variable the file did not fill a value on its sharding: random keys for the
    dropout streams, zeros for buffers the file lacks (strict), and the random initial values of
    a concrete (``strict=False``) model moved onto the mesh."""
    base = jax.random.key(seed)
    for number, (path, variable) in enumerate(nnx.to_flat_state(nnx.state(model))):
        if id(variable) in placed:
            continue
        value, sharding = variable.get_value(), shardings[dotted(path)]
        if isinstance(value, jax.ShapeDtypeStruct):
            if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
                keys = jax.random.fold_in(base, number)
                value = jnp.broadcast_to(keys, value.shape) if value.shape else keys
            else:
                value = jnp.zeros(value.shape, value.dtype)
        variable.set_value(jax.device_put(value, sharding))


def _same_tensor(checkpoint: _Checkpoint, first: str, second: str) -> bool:
    """Whether two tensors of equal spec hold the same bits, compared a slab of rows at a time."""
    spec = checkpoint.specs[first]
    rows = spec[1][0] if spec[1] else 1
    step = max(1, _COMPARE_BYTES // max(1, nbytes(spec) // max(1, rows)))
    with _safe_open(checkpoint.file_of[first]) as a, _safe_open(checkpoint.file_of[second]) as b:
        for start in range(0, max(rows, 1), step):
            if spec[1]:
                stop = min(start + step, rows)  # safetensors refuses a slice past the end
                x, y = a.get_slice(first)[start:stop], b.get_slice(second)[start:stop]
            else:
                x, y = a.get_tensor(first), b.get_tensor(second)
            if x.tobytes() != y.tobytes():
                return False
    return True


@contextmanager
def _safe_open(file: str) -> Iterator[Any]:
    """``safe_open(file)`` (memory-mapped; unmapped on exit), its errors naming the file."""
    from safetensors import safe_open

    try:
        handle = safe_open(file, framework="numpy")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot open {file!r}: {exc}") from None
    with handle:
        yield handle


def _layouts(cls: type, found_type: Any, where: str) -> tuple[CheckpointLayout, ...]:
    """The layouts a checkpoint of ``model_type`` ``found_type`` may have for ``cls``: the twin's
    own names under each of its prefixes (``checkpoint_prefixes``, else ``base_model_prefix``), or
    the twin's ``checkpoint_layouts`` declared for ``found_type``; another type is refused."""
    expected_type = getattr(cls, "model_type", None)
    declared = tuple(
        layout for layout in getattr(cls, "checkpoint_layouts", ()) if layout.model_type == found_type
    )
    if declared:
        return declared
    if expected_type and found_type and found_type != expected_type:
        raise CheckpointError(
            f"{where!r} holds a {found_type!r} model (config.json model_type), not the "
            f"{expected_type!r} that {cls.__name__} twins"
        )
    explicit = getattr(cls, "checkpoint_prefixes", None)
    base = getattr(cls, "base_model_prefix", None)
    prefixes = ("", *explicit) if explicit is not None else ("", f"{base}.") if base else ("",)
    return tuple(CheckpointLayout(expected_type or "", "", "", ((p, ""),)) for p in prefixes)


def _select(
    specs: Mapping[str, TensorSpec], expected: set[str], layouts: Sequence[CheckpointLayout]
) -> tuple[dict[str, str], list[str], CheckpointLayout]:
    """``{the twin's key: the file's tensor name}`` for the tensors of the twin, notes on
    everything left out (decided from the headers' names and dtypes alone), and the layout read:
    of ``layouts``, the one under which most names are the twin's (the first of equals)."""
    renamed = {}
    notes = []
    for name in specs:
        new = name
        for old, current in WEIGHT_NORM_SPELLINGS.items():
            old_suffix, new_suffix = f".{old}", f".{current}"
            candidate = name[: -len(old_suffix)] + new_suffix
            if name.endswith(old_suffix) and any(
                layout.twin_name(candidate) in expected for layout in layouts
            ):
                new = candidate
                notes.append(f"renamed {name} -> {new} (weight norm's older spelling)")
        renamed[name] = new

    def hits(layout: CheckpointLayout) -> int:
        return sum(1 for new in renamed.values() if layout.twin_name(new) in expected)

    layout = max(layouts, key=hits)  # the first of equals: "" wins a tie
    selected: dict[str, str] = {}
    left_out: Counter[str] = Counter()
    buffers = []
    for name, new in renamed.items():
        key = layout.twin_name(new)
        if key is None:
            left_out[layout.other_part(new) or _group(new)] += 1
        elif numpy_dtype(specs[name][0]).kind in "iu" and key not in expected:
            buffers.append(name)
        else:
            selected[key] = name
    if layout.model_class:
        notes.append(layout.note())
    elif layout.renames[0][0]:
        notes.append(f"read the tensors under {layout.renames[0][0]!r}")
    if left_out:
        listed = ", ".join(f"{group}* ({count})" for group, count in sorted(left_out.items()))
        notes.append(f"left out {sum(left_out.values())} tensor(s) outside this model: {listed}")
    notes.extend(f"{name}: integer buffer, not a weight, left out" for name in buffers)
    return selected, notes, layout


def _group(name: str) -> str:
    """``'decoder.layers.0.fc1.weight'`` -> ``'decoder.'``: what a left-out tensor belongs to."""
    head, dot, _ = name.partition(".")
    return head + dot


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {path!r}: {type(exc).__name__}: {exc}") from exc
