"""Where each parameter of a twin lives on a device mesh: partition rules, default rule sets, meshes.

A *rule* is ``(pattern, PartitionSpec)``. The pattern is a shell-style glob (``fnmatch``, as
``target_layers``, :mod:`twinformat.names`) over a variable's **Flax path**, dotted
(``model.layers.3.self_attn.q_proj.kernel``, ``model.embed_tokens.embedding``), and the spec is in
**Flax layout**: a Linear kernel is ``(in, out)``, an embedding ``(num, dim)``. What a rule matches
is exactly the array it partitions, so ``kernel.sharding.spec`` reads back the rule's spec. The first
matching rule wins; a variable no rule matches is replicated on the mesh. A rule set is either such a
sequence, or a function ``(shapes, mesh) -> rules`` of the model's ``{flax path: shape}`` (for rules
that depend on shapes, as FSDP's "largest dimension" does).

The default rule sets:

- :func:`data_parallel_rules`: every parameter replicated (the batch is what gets split);
- :func:`fsdp_rules`: every matrix (2 or more axes) split along its largest dimension that the
  ``fsdp`` axis divides (ZeRO-3 style; XLA gathers each weight where it is used); vectors replicated;
- :func:`tensor_parallel_rules`: Megatron-style for the LLM naming of transformers (Llama, Mistral,
  Qwen2, Qwen3, Gemma 3: ``q/k/v_proj`` and ``gate/up_proj`` column-parallel, ``o_proj`` and
  ``down_proj`` row-parallel, ``embed_tokens``/``lm_head`` over the vocabulary or the hidden size), and
  the same roles in BERT's, the speech encoders' (wav2vec2, HuBERT, WavLM) and Whisper's naming;
  ``fsdp_axis=`` splits their other axis too (2-D parallelism).

LoRA and the partitioning. Partition the *base* model (``from_pretrained(..., mesh=, rules=)``), then
adapt it: :class:`flax_impl.LoRA` puts its down factor ``(in, rank)`` like the kernel's input axis and
its up factor ``(rank, out)`` like its output axis; the rank axis is never split. Column-parallel
``q_proj`` ``P(None, 'model')`` thus gets ``down P(None, None)``, ``up P(None, 'model')``; row-parallel
``o_proj`` ``P('model', None)`` gets ``down P('model', None)``, ``up P(None, None)``; an FSDP kernel
``P('fsdp', None)`` gets ``down P('fsdp', None)``. Each factor's partitioning therefore matches the
activations it multiplies, and the LoRA branch needs no communication the base matmul does not.

Example
-------
>>> import jax
>>> rules = tensor_parallel_rules("llm")
>>> [spec for pattern, spec in rules if pattern.endswith((".q_proj.kernel", ".o_proj.kernel"))]
[P(None, 'model'), P('model', None)]
>>> mesh = make_mesh({"model": 1}, devices=jax.devices()[:1])
>>> specs, unused = partition_specs({"model.layers.0.self_attn.q_proj.kernel": (8, 8),
...                                  "model.norm.scale": (8,)}, mesh, rules)
>>> specs["model.layers.0.self_attn.q_proj.kernel"], specs["model.norm.scale"]
(P(None, 'model'), P())
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, TypeAlias

import jax
from jax.sharding import Mesh, PartitionSpec

from flax_impl.sharding import ShardingRuleError

__all__ = [
    "FAMILIES",
    "Rule",
    "Rules",
    "data_parallel_rules",
    "fsdp_rules",
    "make_mesh",
    "partition_specs",
    "tensor_parallel_rules",
]

P = PartitionSpec
Rule: TypeAlias = tuple[str, PartitionSpec]
Rules: TypeAlias = Sequence[Rule] | Callable[[Mapping[str, tuple[int, ...]], Mesh], Sequence[Rule]]
"""A sequence of rules, or a function of ``({flax path: shape}, mesh)`` that returns one."""

# Megatron roles of each family's variables (Flax paths). column: kernel (in, out) split on `out`,
# its bias with it; row: kernel split on `in` (its bias, if any, stays whole: it is added after the
# all-reduce); embedding: the (num, dim) table; head: a (hidden, vocab) output projection.
FAMILIES: dict[str, list[tuple[str, str]]] = {
    # transformers' LlamaForCausalLM naming, shared by Mistral, Qwen2, Qwen3 and Gemma 3.
    "llm": [
        ("*.self_attn.q_proj.*", "column"),
        ("*.self_attn.k_proj.*", "column"),
        ("*.self_attn.v_proj.*", "column"),
        ("*.self_attn.o_proj.*", "row"),
        ("*.mlp.gate_proj.*", "column"),
        ("*.mlp.up_proj.*", "column"),
        ("*.mlp.down_proj.*", "row"),
        ("*embed_tokens.embedding", "embedding"),
        ("lm_head.kernel", "head"),
    ],
    # transformers' Wav2Vec2Model naming, shared by HubertModel and WavLMModel (WavLM's relative
    # position tables stay replicated).
    "speech": [
        ("*.attention.q_proj.*", "column"),
        ("*.attention.k_proj.*", "column"),
        ("*.attention.v_proj.*", "column"),
        ("*.attention.out_proj.*", "row"),
        ("*.feed_forward.intermediate_dense.*", "column"),
        ("*.feed_forward.output_dense.*", "row"),
    ],
    # transformers' Whisper encoder naming.
    "whisper": [
        ("*.self_attn.q_proj.*", "column"),
        ("*.self_attn.k_proj.*", "column"),
        ("*.self_attn.v_proj.*", "column"),
        ("*.self_attn.out_proj.*", "row"),
        ("*.fc1.*", "column"),
        ("*.fc2.*", "row"),
    ],
    # transformers' BertModel naming.
    "bert": [
        ("*.attention.self.query.*", "column"),
        ("*.attention.self.key.*", "column"),
        ("*.attention.self.value.*", "column"),
        ("*.attention.output.dense.*", "row"),
        ("*.intermediate.dense.*", "column"),
        ("*.output.dense.*", "row"),
        ("*.word_embeddings.embedding", "embedding"),
    ],
}


def data_parallel_rules() -> list[Rule]:
    """Every parameter replicated: pure data parallelism (split the batch, not the weights).

    Example
    -------
    >>> data_parallel_rules()
    [('*', P())]
    """
    return [("*", P())]


def fsdp_rules(shapes: Mapping[str, tuple[int, ...]], mesh: Mesh, *, axis: str = "fsdp") -> list[Rule]:
    """FSDP (ZeRO-3): every variable of 2 or more axes split along its largest dimension over ``axis``.

    Pass the function itself as ``rules=fsdp_rules`` (or ``functools.partial(fsdp_rules, axis=...)``):
    it is called with the model's shapes and the mesh. Where the largest dimension is not a multiple
    of the axis size, the next largest that is; a matrix with none, and every vector, is replicated
    (vectors are under 0.1% of an LLM's bytes). One exact rule per split variable.

    Example
    -------
    >>> mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    >>> fsdp_rules({"lm_head.kernel": (16, 320), "model.norm.scale": (16,)}, mesh)
    [('lm_head.kernel', P(None, 'fsdp'))]
    """
    _check_axes(mesh, [axis], what="fsdp_rules")
    size = mesh.shape[axis]
    rules: list[Rule] = []
    for path, shape in shapes.items():
        if len(shape) < 2:
            continue
        by_size = sorted(range(len(shape)), key=lambda d: -shape[d])  # stable: first of equals
        dim = next((d for d in by_size if shape[d] % size == 0), None)
        if dim is not None:
            spec = [None] * len(shape)
            spec[dim] = axis  # type: ignore[call-overload]  # a list of axis names or None
            rules.append((_escape(path), P(*spec)))
    return rules


def tensor_parallel_rules(
    family: str = "llm", *, axis: str = "model", fsdp_axis: str | None = None, embedding: str = "vocab"
) -> list[Rule]:
    """Megatron-style tensor parallelism for ``family``'s naming (a key of :data:`FAMILIES`: ``'llm'``,
    ``'bert'``, ``'speech'`` for wav2vec2/HuBERT/WavLM, ``'whisper'``).

    Column-parallel kernels ``(in, out)`` get ``P(fsdp_axis, axis)`` and their biases ``P(axis)``;
    row-parallel kernels ``P(axis, fsdp_axis)``; the embedding table ``(vocab, hidden)``
    ``P(axis, fsdp_axis)`` (``embedding='vocab'``) or ``P(fsdp_axis, axis)`` (``'hidden'``); an
    untied ``lm_head`` kernel ``(hidden, vocab)`` is column-parallel. Norms and everything else are
    replicated. A model's tied ``lm_head`` is not a variable, so its rule just matches nothing.

    Example
    -------
    >>> [(pattern, spec) for pattern, spec in tensor_parallel_rules("llm", fsdp_axis="fsdp")
    ...  if "down_proj" in pattern]
    [('*.mlp.down_proj.kernel', P('model', 'fsdp')), ('*.mlp.down_proj.bias', P())]
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    if embedding not in ("vocab", "hidden"):
        raise ValueError(f"embedding must be 'vocab' or 'hidden', got {embedding!r}")
    rules: list[Rule] = []
    for pattern, role in FAMILIES[family]:
        layer = pattern[:-2] if pattern.endswith(".*") else None
        if role == "column":
            rules += [(f"{layer}.kernel", P(fsdp_axis, axis)), (f"{layer}.bias", P(axis))]
        elif role == "row":
            rules += [(f"{layer}.kernel", P(axis, fsdp_axis)), (f"{layer}.bias", P())]
        elif role == "embedding":
            rules.append((pattern, P(axis, fsdp_axis) if embedding == "vocab" else P(fsdp_axis, axis)))
        else:  # head: (hidden, vocab)
            rules.append((pattern, P(fsdp_axis, axis)))
    return rules


def make_mesh(axes: Mapping[str, int] | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh of ``devices`` (default: all) with the named ``axes`` ``{name: size}``; one size may be
    ``-1`` (the devices left). Default ``{'data': -1}``. Axes are ``AxisType.Auto`` (GSPMD decides
    the sharding of intermediates, as the rules leave activations unannotated).

    Example
    -------
    >>> mesh = make_mesh({"data": -1, "model": 1})
    >>> mesh.axis_names, mesh.shape["data"] == len(jax.devices())
    (('data', 'model'), True)
    """
    devices = list(devices) if devices is not None else jax.devices()
    axes = dict(axes) if axes else {"data": -1}
    free = [name for name, size in axes.items() if size == -1]
    if len(free) > 1 or any(size < 1 and size != -1 for size in axes.values()):
        raise ValueError(f"mesh axes {axes}: sizes must be >= 1, with at most one -1")
    fixed = math.prod(size for size in axes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices do not divide into the fixed axes {axes}")
        axes[free[0]] = len(devices) // fixed
    if math.prod(axes.values()) != len(devices):
        raise ValueError(
            f"mesh axes {axes} hold {math.prod(axes.values())} devices, but {len(devices)} are given; "
            "use -1 for one axis to take the rest"
        )
    return jax.make_mesh(
        tuple(axes.values()),
        tuple(axes),
        axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
        devices=devices,
    )


def partition_specs(
    shapes: Mapping[str, tuple[int, ...]], mesh: Mesh, rules: Rules | None
) -> tuple[dict[str, PartitionSpec], list[str]]:
    """``({flax path: spec}, unused patterns)``: the first matching rule's spec for each variable,
    ``P()`` (replicated) where none matches, checked against the shapes and the mesh.

    Raises
    ------
    ShardingRuleError
        A spec naming an axis the mesh lacks, with more entries than the variable has axes, or
        splitting a dimension the mesh axes do not divide; the message names the variable, the
        rule, and what would fit.
    """
    listed = list(rules(shapes, mesh) if callable(rules) else (rules or ()))
    for entry in listed:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
            raise TypeError(f"a partition rule is (glob pattern, PartitionSpec), got {entry!r}")
    used: set[int] = set()
    specs: dict[str, PartitionSpec] = {}
    for path, shape in shapes.items():
        index = next((i for i, (pattern, _) in enumerate(listed) if fnmatchcase(path, pattern)), None)
        if index is None:
            specs[path] = P()
            continue
        used.add(index)
        pattern, spec = listed[index]
        spec = spec if isinstance(spec, PartitionSpec) else P(*spec)
        _check_spec(path, shape, pattern, spec, mesh)
        specs[path] = spec
    unused = [pattern for i, (pattern, _) in enumerate(listed) if i not in used]
    return specs, unused


def _check_spec(path: str, shape: tuple[int, ...], pattern: str, spec: PartitionSpec, mesh: Mesh) -> None:
    where = f"variable {path!r} {tuple(shape)} (rule {pattern!r} -> {spec})"
    if len(spec) > len(shape):
        raise ShardingRuleError(f"{where}: the spec has {len(spec)} entries for {len(shape)} axes")
    for dim, entry in enumerate(spec):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        _check_axes(mesh, names, what=where)
        parts = math.prod(mesh.shape[name] for name in names)
        if shape[dim] % parts:
            raise ShardingRuleError(
                f"{where}: axis {dim} of length {shape[dim]} does not split into {parts} parts over "
                f"mesh axes {names}; give this variable a rule with another spec (or P() to replicate) "
                "before the rule that matched it"
            )


def _check_axes(mesh: Mesh, names: Sequence[str], *, what: str) -> None:
    unknown = [name for name in names if name not in mesh.axis_names]
    if unknown:
        raise ShardingRuleError(f"{what}: mesh axes {unknown} are not in the mesh {dict(mesh.shape)}")


def _escape(path: str) -> str:
    """``path`` as a glob matching only itself (``[`` is the one metacharacter a path may hold)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)
