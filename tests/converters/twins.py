"""Twin layers and small twin models for the converter tests, declared with PyTorch's semantics.

Every torch layer here has a Flax twin that computes the same function once the weights are
converted (SPEC "Writing twins": norms with epsilon=1e-5 and exact variance, explicit symmetric
conv padding, BatchNorm in inference mode with torch's running statistics).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from flax import nnx
from torch import nn

# Flax twins start from zeros: their weights are overwritten by every test, and a random
# initialiser costs a fresh XLA compilation (~0.4 s) per new shape.
ZERO = nnx.initializers.zeros
Linear = partial(nnx.Linear, kernel_init=ZERO)
Conv = partial(nnx.Conv, kernel_init=ZERO)
Embed = partial(nnx.Embed, embedding_init=ZERO)

DTYPES = ("float32", "bfloat16", "float16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# kind name -> (torch factory, flax factory); conv twins use explicit symmetric padding.
LAYER_KINDS = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "layernorm",
    "groupnorm",
    "rmsnorm",
    "embedding",
    "batchnorm",
)


def torch_layer(kind: str, dtype: str = "float32") -> nn.Module:
    """A torch layer of ``kind`` with random weights (and running statistics) in ``dtype``."""
    factories = {
        "linear": lambda: nn.Linear(5, 4),
        "conv1d": lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1),
        "conv2d": lambda: nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
        "conv3d": lambda: nn.Conv3d(2, 3, 2, padding=1),
        "layernorm": lambda: nn.LayerNorm(6),
        "groupnorm": lambda: nn.GroupNorm(2, 6),
        "rmsnorm": lambda: nn.RMSNorm(6, eps=1e-6),
        "embedding": lambda: nn.Embedding(7, 5),
        "batchnorm": lambda: nn.BatchNorm1d(6),
    }
    layer = factories[kind]()
    randomize_torch(layer)
    for param in layer.parameters():
        param.data = param.data.to(TORCH_DTYPES[dtype])
    return layer.eval()


def flax_layer(kind: str, dtype: str = "float32", seed: int = 0) -> nnx.Module:
    """The Flax twin of :func:`torch_layer` (fresh random weights)."""
    rngs = nnx.Rngs(seed)
    p = JAX_DTYPES[dtype]
    factories = {
        "linear": lambda: Linear(5, 4, param_dtype=p, rngs=rngs),
        "conv1d": lambda: Conv(3, 4, (3,), strides=2, padding=[(1, 1)], param_dtype=p, rngs=rngs),
        "conv2d": lambda: Conv(
            3,
            4,
            (3, 2),
            strides=(1, 2),
            padding=[(1, 1), (0, 0)],
            kernel_dilation=(2, 1),
            param_dtype=p,
            rngs=rngs,
        ),
        "conv3d": lambda: Conv(2, 3, (2, 2, 2), padding=[(1, 1)] * 3, param_dtype=p, rngs=rngs),
        "layernorm": lambda: nnx.LayerNorm(
            6, epsilon=1e-5, use_fast_variance=False, param_dtype=p, rngs=rngs
        ),
        "groupnorm": lambda: nnx.GroupNorm(
            6, num_groups=2, epsilon=1e-5, use_fast_variance=False, param_dtype=p, rngs=rngs
        ),
        "rmsnorm": lambda: nnx.RMSNorm(6, epsilon=1e-6, param_dtype=p, rngs=rngs),
        "embedding": lambda: Embed(7, 5, param_dtype=p, rngs=rngs),
        "batchnorm": lambda: nnx.BatchNorm(
            6, momentum=0.9, epsilon=1e-5, use_running_average=True, param_dtype=p, rngs=rngs
        ),
    }
    layer = factories[kind]()
    randomize_flax(layer, seed)
    return layer


def layer_input(kind: str, seed: int = 0) -> tuple[torch.Tensor, jax.Array]:
    """The same float32 input for both twins (channels first for torch, last for Flax)."""
    rng = np.random.default_rng(seed)
    if kind == "embedding":
        tokens = rng.integers(0, 7, size=(2, 4))
        return torch.from_numpy(tokens), jnp.asarray(tokens)
    shapes = {
        "linear": (2, 5),
        "conv1d": (2, 3, 9),
        "conv2d": (2, 3, 7, 6),
        "conv3d": (1, 2, 4, 3, 5),
        "batchnorm": (4, 6),
    }
    x = rng.standard_normal(shapes.get(kind, (3, 6)), dtype=np.float32) * 2 + 0.5
    return torch.from_numpy(x), jnp.asarray(channels_last(x) if kind.startswith("conv") else x)


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


# --- small twin models with every layer kind, same dotted names -------------------------------


class TorchTokenNet(nn.Module):
    """Embedding -> Linear -> LayerNorm -> RMSNorm -> Linear, on token ids (B, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.rms = nn.RMSNorm(16, eps=1e-6)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.emb(tokens)))
        return self.fc2(self.rms(self.norm(h)))


class FlaxTokenNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.emb = Embed(11, 8, rngs=rngs)
        self.fc1 = Linear(8, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.rms = nnx.RMSNorm(16, epsilon=1e-6, rngs=rngs)
        self.fc2 = Linear(16, 6, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = nnx.relu(self.fc1(self.emb(tokens)))
        return self.fc2(self.rms(self.norm(h)))


class TorchConvNet(nn.Module):
    """Conv1d -> GroupNorm -> BatchNorm1d -> Conv1d -> mean -> Linear, on (B, C, L)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.bn = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.gn(self.conv1(x))))
        return self.head(torch.relu(self.conv2(h)).mean(dim=2))


class FlaxConvNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = Conv(3, 8, (3,), padding=[(1, 1)], rngs=rngs)
        self.gn = nnx.GroupNorm(8, num_groups=2, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, use_running_average=True, rngs=rngs)
        self.conv2 = Conv(8, 8, (3,), strides=2, padding=[(1, 1)], rngs=rngs)
        self.head = Linear(8, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn(self.gn(self.conv1(x))))
        return self.head(jnp.mean(nnx.relu(self.conv2(h)), axis=1))


def token_batch(seed: int = 0) -> tuple[torch.Tensor, jax.Array]:
    tokens = np.random.default_rng(seed).integers(0, 11, size=(3, 5))
    return torch.from_numpy(tokens), jnp.asarray(tokens)


def conv_batch(seed: int = 0) -> tuple[torch.Tensor, jax.Array]:
    x = np.random.default_rng(seed).standard_normal((2, 3, 10), dtype=np.float32)
    return torch.from_numpy(x), jnp.asarray(channels_last(x))
