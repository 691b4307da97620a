"""Fill, read and run twin models as numpy: the helpers every conversion test uses on the zoo.

Not models: test utilities beside the zoo, so that a test reaches a model and the way to
compare its twins from one package.

- :func:`randomize_torch`, :func:`randomize_flax`: random values in every float parameter and
  buffer (variances positive).
- :func:`torch_arrays`, :func:`flax_arrays`: a model's tensors as numpy, keyed by dotted name.
- :func:`same_bits`: the keys whose arrays differ in any bit.
- :func:`torch_output`, :func:`flax_output`, :func:`channels_last`: outputs in one layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn


def channels_last(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


def randomize_torch(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every float parameter and buffer with random values (variances positive)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.dtype.is_floating_point:
                continue
            values = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            tensor.copy_(values.to(tensor.dtype))
    return module


def randomize_flax(module: nnx.Module, seed: int = 0) -> nnx.Module:
    """Fill every float variable (params and batch statistics) with random values."""
    rng = np.random.default_rng(seed + 1000)
    for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))):
        value = variable.get_value()
        values = rng.standard_normal(value.shape).astype(np.float32)
        if path[-1] == "var":
            values = np.abs(values) + 0.5
        variable.set_value(jnp.asarray(values, dtype=value.dtype))
    return module


def flax_arrays(module: nnx.Module) -> dict[str, np.ndarray]:
    """Every Param/BatchStat of ``module`` as numpy, keyed by its dotted path."""
    return {
        ".".join(str(p) for p in path): np.asarray(variable.get_value())
        for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))
    }


def torch_arrays(module: nn.Module) -> dict[str, np.ndarray]:
    """``state_dict()`` as numpy bits (bf16 through a uint16 view)."""
    out = {}
    for key, tensor in module.state_dict().items():
        tensor = tensor.detach().contiguous()
        out[key] = tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    return out


def same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray], skip: tuple[str, ...] = ()) -> list[str]:
    """Keys whose arrays differ in dtype size, shape or any bit (empty when identical)."""
    keys = [k for k in a if not k.endswith(skip)]
    assert sorted(keys) == sorted(k for k in b if not k.endswith(skip)), (sorted(a), sorted(b))
    return [
        k
        for k in keys
        if a[k].shape != b[k].shape
        or a[k].dtype.itemsize != b[k].dtype.itemsize
        or not np.array_equal(
            np.ascontiguousarray(a[k]).view(np.uint8), np.ascontiguousarray(b[k]).view(np.uint8)
        )
    ]


def torch_output(module: nn.Module, x: torch.Tensor, kind: str = "") -> np.ndarray:
    """``module(x)`` as float32 numpy, channels last for a conv ``kind`` (x cast to the weights' dtype)."""
    with torch.no_grad():
        out = module(x.to(_first_float_dtype(module)) if x.is_floating_point() else x)
    out = out.float().numpy()
    return channels_last(out) if kind.startswith("conv") else out


def flax_output(module: nnx.Module, x: jax.Array) -> np.ndarray:
    return np.asarray(module(x)).astype(np.float32)


def _first_float_dtype(module: nn.Module) -> torch.dtype:
    for param in module.parameters():
        return param.dtype
    return torch.float32
