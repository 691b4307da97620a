"""A new layer kind and a new adapter class through the public extension points alone.

The layer kind is one ``register_kind`` entry plus one line in each twin's type table
(``KIND_OF_TYPE``); the adapter is its class in each twin plus one ``register_adapter``
declaration. Nothing else in the library is edited, yet models holding them convert, save, load
and (the adapter merges) merge, in models and in files.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # both frameworks: the single-framework CI environments skip
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")
nn = torch.nn

import converters  # noqa: E402
import flax_impl  # noqa: E402
import flax_impl.interchange  # noqa: E402
import torch_impl  # noqa: E402
import torch_impl.interchange  # noqa: E402
from converters.files import TensorFile  # noqa: E402
from twinformat import adapters as vocabulary  # noqa: E402
from twinformat import kinds as kind_table  # noqa: E402

# --- the test-only layer kind: a mixing matrix and a per-feature gain ---------------------------
MIX = kind_table.LayerKind(
    "test_mix", (kind_table.Param("mix", "m", "o i -> i o"), kind_table.Param("gain", "g"))
)


class TorchMix(nn.Module):
    """``y = (x @ mix.T) * gain``; ``mix`` is ``(out, in)``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(features, features))
        self.gain = nn.Parameter(torch.rand(features) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.mix.T) * self.gain


class FlaxMix(nnx.Module):
    """The twin: ``m`` is ``(in, out)``."""

    def __init__(self, features: int, *, rngs: nnx.Rngs) -> None:
        self.m = nnx.Param(jnp.zeros((features, features)))
        self.g = nnx.Param(jnp.ones((features,)))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return (x @ self.m[...]) * self.g[...]


# --- the test-only adapter: a rank-one update scaled by a gain -------------------------------
def _gain_merge(weight: np.ndarray, tensors: dict[str, np.ndarray], kwargs: dict[str, Any]) -> np.ndarray:
    a, b = tensors["adapter_a.weight"], tensors["adapter_b.weight"]  # (1, in), (out, 1)
    delta = (b.astype(np.float32) @ a.astype(np.float32)) * np.float32(kwargs["gain"])
    return (weight.astype(np.float32) + delta).astype(weight.dtype)


GAIN_LORA = vocabulary.AdapterKind(
    name="GainLoRA",
    wrapped="base_layer",
    factors=("adapter_a", "adapter_b"),
    defaults={"gain": 1.0},
    wraps=("linear",),
    factor_kinds={"adapter_a": "linear", "adapter_b": "linear"},
    merge=_gain_merge,
)


class TorchGainLoRA(nn.Module):
    adapter_kind: ClassVar[vocabulary.AdapterKind] = GAIN_LORA

    def __init__(self, target: nn.Linear, gain: float = 1.0) -> None:
        super().__init__()
        self.base_layer = target.requires_grad_(False)
        self.adapter_a = nn.Linear(target.in_features, 1, bias=False)
        self.adapter_b = nn.Linear(1, target.out_features, bias=False)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.adapter_b(self.adapter_a(x)) * self.gain


class FlaxGainLoRA(nnx.Module):
    adapter_kind: ClassVar[vocabulary.AdapterKind] = GAIN_LORA

    def __init__(self, target: nnx.Linear, gain: float = 1.0, *, rngs: nnx.Rngs) -> None:
        self.base_layer = target
        self.adapter_a = nnx.Linear(target.in_features, 1, use_bias=False, rngs=rngs)
        self.adapter_b = nnx.Linear(1, target.out_features, use_bias=False, rngs=rngs)
        self.gain = gain

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.base_layer(x) + self.adapter_b(self.adapter_a(x)) * self.gain


class TorchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = TorchMix(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mix(x))


class FlaxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.mix = FlaxMix(4, rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.fc(self.mix(x))


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    """The extension: one kind entry, one line per type table, one adapter declaration."""
    kind_table.register_kind(MIX)
    torch_impl.interchange.KIND_OF_TYPE.append((TorchMix, "test_mix"))
    flax_impl.interchange.KIND_OF_TYPE.append((FlaxMix, "test_mix"))
    vocabulary.register_adapter(GAIN_LORA)
    yield
    del kind_table.KINDS["test_mix"], vocabulary.ADAPTERS["GainLoRA"]
    torch_impl.interchange.KIND_OF_TYPE.remove((TorchMix, "test_mix"))
    flax_impl.interchange.KIND_OF_TYPE.remove((FlaxMix, "test_mix"))


def _torch_adapted() -> torch_impl.AdaptedModel:
    torch.manual_seed(0)
    model = torch_impl.AdaptedModel(
        TorchNet(), TorchGainLoRA, target_layers="fc", unfrozen_layers="mix", adapter_kwargs={"gain": 0.5}
    )
    with torch.no_grad():  # a trained adapter: non-zero factors
        model.adapted_model.fc.adapter_b.weight.normal_()
    return model


def _flax_adapted(seed: int = 1) -> flax_impl.AdaptedModel:
    return flax_impl.AdaptedModel(
        FlaxNet(nnx.Rngs(seed)),
        FlaxGainLoRA,
        target_layers="fc",
        unfrozen_layers="mix",
        adapter_kwargs={"gain": 0.5},
        rngs=nnx.Rngs(seed + 1),
    )


def _outputs(torch_model: nn.Module, flax_model: nnx.Module) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    with torch.no_grad():
        return torch_model(torch.from_numpy(x)).numpy(), np.asarray(flax_model(jnp.asarray(x)))


def test_new_kind_and_adapter_convert_between_models_both_ways():
    source, twin = _torch_adapted(), _flax_adapted()
    report = converters.torch_to_flax(source, twin)
    assert report.ok and "adapted_model.mix.mix" in report.loaded
    np.testing.assert_array_equal(
        np.asarray(twin.adapted_model.mix.m[...]), source.adapted_model.mix.mix.detach().numpy().T
    )
    ours, theirs = _outputs(source, twin)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    back = torch_impl.AdaptedModel(TorchNet(), TorchGainLoRA, target_layers="fc", unfrozen_layers="mix")
    assert converters.flax_to_torch(twin, back).ok
    for key, value in source.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_new_adapter_checkpoints_cross_twins_and_layouts(tmp_path):
    source = _torch_adapted()
    source.saver(str(tmp_path / "adapter.safetensors"))
    with TensorFile(tmp_path / "adapter.safetensors") as f:
        assert f.metadata["adapter_class"] == "GainLoRA"
        assert sorted(f.names) == [
            "adapted_model.fc.adapter_a.weight",
            "adapted_model.fc.adapter_b.weight",
            "adapted_model.mix.gain",
            "adapted_model.mix.mix",
        ]
    twin = _flax_adapted()
    twin.loader(str(tmp_path / "adapter.safetensors"))
    ours, theirs = _outputs(source, twin)
    assert not np.allclose(ours, 0)
    # The base weights did not travel: copy them, then the twins compute the same function.
    converters.torch_to_flax(source, twin)
    ours, theirs = _outputs(source, twin)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)

    twin.saver(str(tmp_path / "from_flax.safetensors"))
    again = _torch_adapted()
    with torch.no_grad():
        again.adapted_model.fc.adapter_b.weight.zero_()
    again.loader(str(tmp_path / "from_flax.safetensors"))
    for key in ("adapted_model.fc.adapter_b.weight", "adapted_model.mix.mix"):
        assert torch.equal(again.state_dict()[key], source.state_dict()[key])

    converters.save_flax_layout(twin, tmp_path / "flax.safetensors")
    with TensorFile(tmp_path / "flax.safetensors") as f:
        assert f.shape("adapted_model.mix.m") == (4, 4) and "adapted_model.fc.adapter_a.kernel" in f.names
    converters.convert_file(tmp_path / "flax.safetensors", tmp_path / "torch.safetensors", layout="torch")
    converters.convert_file(tmp_path / "torch.safetensors", tmp_path / "flax2.safetensors", layout="flax")
    with TensorFile(tmp_path / "flax.safetensors") as a, TensorFile(tmp_path / "flax2.safetensors") as b:
        for name in a.names:
            assert np.array_equal(a.get(name), b.get(name)), name
    fresh = _flax_adapted(seed=5)
    assert converters.load_flax_layout(fresh, tmp_path / "flax.safetensors").ok
    np.testing.assert_array_equal(_outputs(source, fresh)[1], _outputs(source, twin)[1])


def test_new_adapter_merges_in_files_with_its_declared_rule(tmp_path):
    source = torch_impl.AdaptedModel(
        TorchNet(), TorchGainLoRA, target_layers="fc", adapter_kwargs={"gain": 0.5}
    )
    with torch.no_grad():
        source.adapted_model.fc.adapter_b.weight.normal_()
        source.adapted_model.fc.adapter_a.weight.normal_()
    base = TorchNet()
    base.load_state_dict(
        {
            k.replace("adapted_model.", "").replace("base_layer.", ""): v
            for k, v in source.state_dict().items()
            if "adapter_" not in k
        }
    )
    converters.save_torch_layout(base, tmp_path / "base.safetensors")
    source.saver(str(tmp_path / "adapter.safetensors"))
    report = converters.merge_adapter_file(
        tmp_path / "base.safetensors", tmp_path / "adapter.safetensors", tmp_path / "merged.safetensors"
    )
    assert any("fc.weight" in note for note in report.notes)
    merged = TorchNet()
    assert converters.flax_to_torch(str(tmp_path / "merged.safetensors"), merged).ok
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), source(x), atol=1e-5, rtol=1e-5)
