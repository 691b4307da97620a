"""How adapter factors are created: size checks, the wrapped layer's dtype and precision, and the
sharding they follow (down factor like the kernel's input axis, up factor like its output axis)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

__all__ = [
    "TORCH_DEFAULT_KERNEL_INIT",
    "check_size",
    "kernel_spec",
    "layer_kwargs",
    "place_like",
    "sharding_kwargs",
]

# PyTorch's default Linear/Conv weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so that adapters
# start from the same distribution in both twins (nnx's default, lecun_normal, is 3x wider in
# variance). Flax computes fan_in of a conv kernel (*k, in, out) as in * prod(k), as PyTorch does.
TORCH_DEFAULT_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def check_size(argument: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be an integer >= 1, got {value!r}")


def layer_kwargs(module: nnx.Linear | nnx.Conv) -> dict[str, Any]:
    """New adapter factors are stored in the wrapped kernel's dtype and compute like the wrapped
    layer (SpeechBrain's adapters are always float32, which breaks a bf16 model)."""
    return {
        "param_dtype": module.kernel[...].dtype,
        "dtype": module.dtype,
        "precision": module.precision,
    }


def kernel_spec(kernel: nnx.Variable) -> tuple[Any, ...] | None:
    """How ``kernel`` is partitioned, one entry per axis: its ``out_sharding`` metadata, else
    the spec of its array's ``NamedSharding``; None when it is not sharded."""
    names = kernel.get_metadata().get("out_sharding")
    if not names:
        sharding = getattr(kernel.get_value(), "sharding", None)
        names = sharding.spec if isinstance(sharding, NamedSharding) else None
    if not names or all(name is None for name in names):
        return None
    names = tuple(names)
    return names + (None,) * (kernel.ndim - len(names))


def sharding_kwargs(
    kernel: nnx.Variable, kernel_spec: tuple[Any, ...], bias_spec: tuple[Any, ...] | None = None
) -> dict[str, Any]:
    """``kernel_metadata``/``bias_metadata`` for an adapter factor of a kernel that carries
    sharding metadata (``nnx.with_partitioning``), so the factor is partitioned as ``kernel_spec``
    on the same mesh and rules; ``{}`` when the kernel carries none."""
    metadata = kernel.get_metadata()
    if not metadata.get("out_sharding"):
        return {}
    common = {"eager_sharding": metadata.get("eager_sharding", True)}
    for key in ("mesh", "sharding_rules"):
        if metadata.get(key) is not None:
            common[key] = metadata[key]
    sharding = getattr(kernel.get_value(), "sharding", None)
    if common.get("mesh") is None and isinstance(sharding, NamedSharding):
        if jax.sharding.get_abstract_mesh().empty:
            # The model was built inside `jax.set_mesh(...)` and is adapted outside it.
            common["mesh"] = sharding.mesh
    kwargs = {"kernel_metadata": {**common, "out_sharding": kernel_spec}}
    if bias_spec is not None:
        kwargs["bias_metadata"] = {**common, "out_sharding": bias_spec}
    return kwargs


def place_like(
    kernel: nnx.Variable,
    layer: nnx.Linear | nnx.Conv,
    kernel_spec: tuple[Any, ...],
    bias_spec: tuple[Any, ...] | None = None,
) -> None:
    """Put an adapter factor where the kernel lives when the kernel was placed by an explicit
    ``jax.device_put`` rather than by sharding metadata: on its mesh, partitioned as
    ``kernel_spec``, or on its device."""
    sharding = getattr(kernel.get_value(), "sharding", None)
    if kernel.get_metadata().get("out_sharding") or sharding is None:
        return
    targets = [(layer.kernel, kernel_spec)]
    if bias_spec is not None and layer.bias is not None:
        targets.append((layer.bias, bias_spec))
    for variable, spec in targets:
        if isinstance(sharding, NamedSharding):
            placed = NamedSharding(sharding.mesh, PartitionSpec(*spec))
        else:  # a single device, which need not be the default one
            placed = sharding
        variable.set_value(jax.device_put(variable.get_value(), placed))
