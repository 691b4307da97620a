"""PyTorch <-> Flax parameter names and tensor layouts, per layer kind.

Framework-free (numpy only). The *kind* of a layer is decided by the caller from the module's
type (``nn.Linear``, ``nnx.Conv``, ...), never from a tensor's name or rank: a square Linear
weight loaded untransposed has the right shape and computes the wrong function.

=========  =============================  ===============================
kind       PyTorch (name, layout)         Flax NNX (name, layout)
=========  =============================  ===============================
linear     weight (out, in), bias         kernel (in, out), bias
conv       weight (out, in, *k), bias     kernel (*k, in, out), bias
layernorm  weight, bias                   scale, bias
groupnorm  weight, bias                   scale, bias
rmsnorm    weight                         scale
embedding  weight (num, dim)              embedding (num, dim)
batchnorm  weight, bias,                  scale, bias,
           running_mean, running_var      mean, var
=========  =============================  ===============================

Every returned array is C-contiguous: ``safetensors.numpy.save_file`` writes wrong values for a
non-contiguous view such as a transposed kernel.

Example
-------
>>> import numpy as np
>>> w = np.arange(6, dtype=np.float32).reshape(2, 3)          # torch Linear(3, 2).weight
>>> name, kernel = torch_to_flax("linear", "weight", w)
>>> name, kernel.shape, bool(kernel.flags["C_CONTIGUOUS"])
('kernel', (3, 2), True)
>>> flax_to_torch("linear", "kernel", kernel)[1].tolist() == w.tolist()
True
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BUFFERS_WITHOUT_FLAX_TWIN",
    "KINDS",
    "LayoutError",
    "flax_to_torch",
    "flax_to_torch_shape",
    "flax_name",
    "torch_name",
    "torch_to_flax",
    "torch_to_flax_shape",
    "torch_to_flax_view",
    "flax_to_torch_view",
]


class LayoutError(KeyError):
    """A parameter name that the layer kind does not have on the other side."""

    def __str__(self) -> str:  # KeyError quotes its message; ours is a sentence.
        return str(self.args[0])


# kind -> {torch parameter/buffer name: flax variable name}
_NAMES: dict[str, dict[str, str]] = {
    "linear": {"weight": "kernel", "bias": "bias"},
    "conv": {"weight": "kernel", "bias": "bias"},
    "layernorm": {"weight": "scale", "bias": "bias"},
    "groupnorm": {"weight": "scale", "bias": "bias"},
    "rmsnorm": {"weight": "scale"},
    "embedding": {"weight": "embedding"},
    "batchnorm": {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"},
}
KINDS: tuple[str, ...] = tuple(_NAMES)

# Torch buffers that Flax has no variable for. Converters report them by name instead of
# dropping them silently.
BUFFERS_WITHOUT_FLAX_TWIN: dict[str, set[str]] = {"batchnorm": {"num_batches_tracked"}}


def flax_name(kind: str, torch_param: str) -> str:
    """The Flax variable name of PyTorch's ``torch_param`` in a layer of ``kind``."""
    try:
        return _kind(kind)[torch_param]
    except KeyError:
        raise LayoutError(
            f"a {kind} layer has no PyTorch parameter {torch_param!r}; expected one of {sorted(_kind(kind))}"
        ) from None


def torch_name(kind: str, flax_param: str) -> str:
    """The PyTorch parameter name of Flax's ``flax_param`` in a layer of ``kind``."""
    for torch_param, flax_param_ in _kind(kind).items():
        if flax_param_ == flax_param:
            return torch_param
    raise LayoutError(
        f"a {kind} layer has no Flax variable {flax_param!r}; expected one of {sorted(_kind(kind).values())}"
    )


def torch_to_flax(kind: str, torch_param: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """Map one PyTorch tensor (as numpy) to its Flax name and layout. Bits are unchanged."""
    name = flax_name(kind, torch_param)
    if name == "kernel":
        array = _torch_weight_to_kernel(kind, array)
    return name, np.ascontiguousarray(array)


def flax_to_torch(kind: str, flax_param: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """Map one Flax variable (as numpy) to its PyTorch name and layout. Bits are unchanged."""
    name = torch_name(kind, flax_param)
    if flax_param == "kernel":
        array = _kernel_to_torch_weight(kind, array)
    return name, np.ascontiguousarray(array)


def torch_to_flax_view(kind: str, torch_param: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """As :func:`torch_to_flax`, but returns a view in the Flax layout (no copy, possibly not
    contiguous), for callers that copy it in their own way (e.g. a cache-blocked transpose).

    Example
    -------
    >>> name, kernel = torch_to_flax_view("linear", "weight", np.zeros((2, 3), np.float32))
    >>> name, kernel.shape, bool(kernel.flags["C_CONTIGUOUS"])
    ('kernel', (3, 2), False)
    """
    name = flax_name(kind, torch_param)
    if name == "kernel":
        array = _torch_weight_to_kernel(kind, array)
    return name, array


def flax_to_torch_view(kind: str, flax_param: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """As :func:`flax_to_torch`, but returns a view in the PyTorch layout (no copy)."""
    name = torch_name(kind, flax_param)
    if flax_param == "kernel":
        array = _kernel_to_torch_weight(kind, array)
    return name, array


def torch_to_flax_shape(kind: str, torch_param: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """The Flax name and shape of PyTorch's ``torch_param`` of ``shape``, without any data.

    Lets a file converter write the output header before reading a single tensor.

    Example
    -------
    >>> torch_to_flax_shape("conv", "weight", (8, 3, 5, 5))
    ('kernel', (5, 5, 3, 8))
    """
    name = flax_name(kind, torch_param)
    if name == "kernel":
        shape = _torch_weight_to_kernel(kind, _shape_only(shape)).shape
    return name, tuple(shape)


def flax_to_torch_shape(kind: str, flax_param: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """The PyTorch name and shape of Flax's ``flax_param`` of ``shape``, without any data.

    Example
    -------
    >>> flax_to_torch_shape("linear", "kernel", (3, 2))
    ('weight', (2, 3))
    """
    name = torch_name(kind, flax_param)
    if flax_param == "kernel":
        shape = _kernel_to_torch_weight(kind, _shape_only(shape)).shape
    return name, tuple(shape)


def _shape_only(shape: tuple[int, ...]) -> np.ndarray:
    """A zero-byte view of ``shape``: the same permutations apply, nothing is allocated."""
    return np.broadcast_to(np.empty((), dtype=np.uint8), tuple(shape))


def _kind(kind: str) -> dict[str, str]:
    try:
        return _NAMES[kind]
    except KeyError:
        raise LayoutError(f"unknown layer kind {kind!r}; supported kinds: {list(KINDS)}") from None


def _torch_weight_to_kernel(kind: str, weight: np.ndarray) -> np.ndarray:
    if kind == "linear":
        _expect_ndim(weight, 2, "Linear weight (out, in)")
        return weight.T
    _expect_ndim(weight, (3, 4, 5), "ConvNd weight (out, in, *kernel)")
    # (out, in, *k) -> (*k, in, out)
    return np.transpose(weight, (*range(2, weight.ndim), 1, 0))


def _kernel_to_torch_weight(kind: str, kernel: np.ndarray) -> np.ndarray:
    if kind == "linear":
        _expect_ndim(kernel, 2, "Linear kernel (in, out)")
        return kernel.T
    _expect_ndim(kernel, (3, 4, 5), "Conv kernel (*kernel, in, out)")
    # (*k, in, out) -> (out, in, *k)
    n = kernel.ndim - 2
    return np.transpose(kernel, (n + 1, n, *range(n)))


def _expect_ndim(array: np.ndarray, ndim: int | tuple[int, ...], what: str) -> None:
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if array.ndim not in allowed:
        raise ValueError(f"expected a {what} of rank {ndim}, got shape {tuple(array.shape)}")
