"""Place a base model's weights on a device mesh, layer by layer, with the adapters' glob patterns.

A model written without partitioning annotations (a twin such as
:class:`flax_impl.models.BertModel`) is partitioned here after construction: each rule names
layers with the same shell-style patterns as ``target_layers`` and gives the
``PartitionSpec`` of their weight in Flax layout (a Linear kernel is ``(in, out)``), e.g.
Megatron-style ``{"*.query": (None, "model"), "*.attention.output.dense": ("model", None)}``.
Every other variable is replicated on the mesh, so that one jitted step sees one set of devices.

Shard the *base* model, then adapt it: :class:`~flax_impl.adapters.LoRA` and
:class:`~flax_impl.adapters.HoulsbyAdapterLinear` put their factors where the kernel they adapt
lives (down factor partitioned like the kernel's input axis, up factor like its output axis).

An abstract model (``nnx.eval_shape``, whose variables hold ``jax.ShapeDtypeStruct``) is
annotated rather than moved: each value gets the sharding it will have, and
:func:`converters.load_flax_sharded` then reads, on each device, only its slice.

Example
-------
>>> import jax
>>> from flax import nnx
>>> mesh = jax.make_mesh((1, jax.device_count()), ("data", "model"),
...                      axis_types=(jax.sharding.AxisType.Auto,) * 2)
>>> model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 8, rngs=nnx.Rngs(1)))
>>> specs = shard_model(model, mesh, {"layers.0": (None, "model"), "layers.1": ("model", None)})
>>> specs["layers.0.kernel"], specs["layers.0.bias"], specs["layers.1.bias"]
(P(None, 'model'), P('model',), P(None,))
>>> model.layers[0].kernel[...].sharding.spec
P(None, 'model')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from twinformat.adapters import adapter_of
from twinformat.errors import AdapterError
from twinformat.names import as_patterns, check_all_matched, dotted, matches_any

from .graph import named_modules

__all__ = ["ShardingRuleError", "has_explicit_axes", "shard_model"]


def has_explicit_axes(array: jax.Array) -> bool:
    """Whether ``array``'s type carries a sharding over a mesh with ``Explicit`` axes
    (``jax.make_mesh``'s default), where a contraction or gather over a sharded axis must name its
    output's sharding. The fused LoRA backward and the twins' token lookups ask it.

    >>> import jax.numpy as jnp
    >>> has_explicit_axes(jnp.ones(3))  # no mesh
    False
    """
    mesh = jax.typeof(array).sharding.mesh
    return any(axis_type == AxisType.Explicit for axis_type in mesh.axis_types)


class ShardingRuleError(AdapterError):
    """A sharding rule that does not fit the model: wrong rank, unknown mesh axis, or a layer
    that already holds adapters."""


def shard_model(
    model: nnx.Module, mesh: Mesh, rules: Mapping[str, Sequence[str | None]] | None = None
) -> dict[str, PartitionSpec]:
    """Put every variable of ``model`` on ``mesh``: partitioned where a rule says, else replicated.

    A rule ``pattern -> spec`` applies to the variables held directly by each layer whose dotted
    name matches ``pattern`` (the first matching rule wins): a variable with ``len(spec)`` axes
    gets ``spec`` (a Linear kernel ``(in, out)``, a conv kernel ``(*k, in, out)``, an embedding
    ``(num, dim)``), a 1-D variable gets the spec's last entry (the bias of the output axis, or a
    norm's scale). Concrete values are moved with ``jax.device_put``; abstract ones
    (``jax.ShapeDtypeStruct``) get the sharding as an annotation.

    Arguments
    ---------
    model: nnx.Module
        The base model, changed in place. Shard it before inserting adapters.
    mesh: jax.sharding.Mesh
        The device mesh.
    rules: mapping of str to sequence of (str or None)
        ``{layer pattern: partition spec in Flax layout}``. A pattern matching no layer raises
        ``ValueError`` (as ``target_layers`` does).

    Returns
    -------
    dict of str to PartitionSpec
        The spec given to each variable, keyed by its dotted path (``layers.0.kernel``).

    Raises
    ------
    ShardingRuleError
        A spec naming an axis the mesh lacks, a spec whose rank fits no variable of a matched
        layer, or a model that already contains adapters.
    """
    rules = {pattern: tuple(spec) for pattern, spec in dict(rules or {}).items()}
    named = list(named_modules(model))
    check_all_matched(as_patterns(list(rules)), [name for name, _ in named], argument="rules")
    for pattern, spec in rules.items():
        unknown = [axis for axis in _axes(spec) if axis not in mesh.axis_names]
        if unknown:
            raise ShardingRuleError(
                f"rule {pattern!r}: spec {spec} names mesh axes {unknown}; the mesh has {mesh.axis_names}"
            )
    _refuse_adapters(named)

    placed: dict[str, PartitionSpec] = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        layer = dotted(path[:-1])
        spec = next((spec for pattern, spec in rules.items() if matches_any(layer, (pattern,))), ())
        partition = PartitionSpec(*_variable_spec(dotted(path), variable, spec, layer))
        _place(variable, NamedSharding(mesh, partition))
        placed[dotted(path)] = partition
    return placed


def _variable_spec(path: str, variable: nnx.Variable, spec: Sequence[Any], layer: str) -> tuple[Any, ...]:
    ndim = len(getattr(variable.get_value(), "shape", ()))
    if not spec or ndim == 0:
        return ()
    if ndim == len(spec):
        return tuple(spec)
    if ndim == 1:
        return (spec[-1],)
    raise ShardingRuleError(
        f"the rule for layer {layer!r} gives a spec of {len(spec)} axes {spec}, "
        f"but its variable {path!r} has {ndim} axes"
    )


def _place(variable: nnx.Variable, sharding: NamedSharding) -> None:
    value = variable.get_value()
    if isinstance(value, jax.ShapeDtypeStruct):
        variable.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
    else:
        variable.set_value(jax.device_put(value, sharding))


def _axes(spec: Sequence[Any]) -> list[str]:
    axes: list[str] = []
    for entry in spec:
        if isinstance(entry, (tuple, list)):
            axes.extend(entry)
        elif entry is not None:
            axes.append(entry)
    return axes


def _refuse_adapters(named: list[tuple[str, Any]]) -> None:
    adapted = [name or "<root>" for name, module in named if adapter_of(module) is not None]
    if adapted:
        raise ShardingRuleError(
            f"the model already holds adapters at {adapted[:5]}; shard the base model first and adapt "
            "it afterwards, so that each adapter's factors follow the kernel they adapt"
        )
