"""Adapter checkpoints cross between the twins: torch_impl's saver -> flax_impl's loader and back.

Skipped where torch is not installed (flax_impl itself never imports torch).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_impl
from flax_impl.checkpoint import load_torch_style_state_dict, torch_style_state_dict
from tests.zoo import flax_models

torch = pytest.importorskip("torch")
torch_impl = pytest.importorskip("torch_impl")
torch_models = pytest.importorskip("tests.zoo.torch_models")

# Stride 2 and padding 1: a conv kernel crosses the twins with PyTorch's geometry.
CONV_GEOMETRY = {
    "ndim": 2,
    "in_channels": 3,
    "out_channels": 4,
    "kernel_size": (3, 3),
    "stride": (2, 2),
    "padding": (1, 1),
    "dilation": (1, 1),
}


CONFIGS = {
    "lora_linear": (
        torch_models.SeedMLP,
        lambda r: flax_models.SeedMLP(r),
        "LoRA",
        {
            "target_layers": ["layer[13]"],
            "unfrozen_layers": ["layer2"],
            "adapter_kwargs": {"rank": 2, "alpha": 4.0},
        },
    ),
    "houlsby": (
        torch_models.SeedMLP,
        lambda r: flax_models.SeedMLP(r),
        "HoulsbyAdapterLinear",
        {"target_layers": ["layer2"], "adapter_kwargs": {"projection_size": 3}},
    ),
    "lora_conv": (
        lambda: torch_models.ConvGeometryNet(**CONV_GEOMETRY),
        lambda r: flax_models.ConvGeometryNet(**CONV_GEOMETRY, rngs=r),
        "LoRA",
        {"all_conv": True, "unfrozen_layers": "head", "adapter_kwargs": {"rank": 2}},
    ),
}


def _twins(config: str, seed: int):
    torch_factory, flax_factory, adapter, kwargs = CONFIGS[config]
    torch.manual_seed(seed)
    torch_model = torch_impl.AdaptedModel(torch_factory(), getattr(torch_impl, adapter), **kwargs)
    with torch.no_grad():
        for param in torch_model.parameters():
            param.normal_()  # non-zero up projections, so the adapters matter
    flax_model = flax_impl.AdaptedModel(
        flax_factory(nnx.Rngs(seed)), getattr(flax_impl, adapter), rngs=nnx.Rngs(seed + 1), **kwargs
    )
    return torch_model, flax_model


def _torch_state(model) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy() for key, value in model.state_dict().items()}


def _forward_both(config, torch_model, flax_model):
    if config == "lora_conv":
        x = np.random.default_rng(0).normal(size=(2, 3, 7, 7)).astype(np.float32)
        flax_x = np.transpose(x, (0, 2, 3, 1))
    else:
        x = flax_x = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    return np.asarray(flax_model(jnp.asarray(flax_x))), expected


@pytest.mark.parametrize("config", list(CONFIGS))
def test_torch_saved_adapters_load_into_the_flax_twin_and_compute_the_same(tmp_path, config):
    torch_model, flax_model = _twins(config, seed=0)
    # The base weights travel separately (converters' job); here through the torch layout.
    base = {k: v for k, v in _torch_state(torch_model).items() if k not in torch_model.trainable_state_dict()}
    load_torch_style_state_dict(flax_model, base, strict=False)
    path = tmp_path / "torch.safetensors"
    torch_model.saver(str(path))
    flax_model.loader(str(path))
    trainable = set(torch_model.trainable_state_dict())
    flax_state = torch_style_state_dict(flax_model)
    for key, value in _torch_state(torch_model).items():
        np.testing.assert_array_equal(flax_state[key], value, err_msg=key)
    assert trainable == set(flax_model.trainable_state_dict())
    ours, expected = _forward_both(config, torch_model, flax_model)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("config", ["lora_linear", "lora_conv"])
def test_flax_saved_adapters_load_into_the_torch_twin(tmp_path, config):
    torch_model, flax_model = _twins(config, seed=3)
    for _, variable in nnx.to_flat_state(nnx.state(flax_model, flax_model.trainable)):
        variable[...] = variable[...] + 0.5
    path = tmp_path / "flax.safetensors"
    flax_model.saver(str(path))
    torch_model.loader(str(path))
    torch_state = _torch_state(torch_model)
    for key, value in flax_model.trainable_state_dict().items():
        np.testing.assert_array_equal(torch_state[key], value, err_msg=key)
