"""flax_impl.checkpoint and AdaptedModel's saver/loader: PyTorch names and layouts, strict loads."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec

from flax_impl import AdaptedModel, HoulsbyAdapterLinear, LoRA
from flax_impl.checkpoint import (
    layer_kind,
    load_state_dict_file,
    load_torch_style_state_dict,
    save_state_dict_file,
    torch_style_state_dict,
)
from flax_impl.models import Wav2Vec2Model, WavLMConfig
from flax_impl.models._speech import Layers, WeightNorm
from flax_impl.models.wavlm import WavLMAttention
from tests.zoo.flax_models import BareGainNet, Conv2dBatchNormNet, SeedMLP, StackedLinears
from twinformat.errors import CheckpointError
from twinformat.format import read_safetensors_header
from twinformat.kinds import KINDS


def _snapshot(module) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(module))}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# layer_kind


def test_layer_kind_covers_every_layout_kind_by_module_type():
    rngs = nnx.Rngs(0)
    modules = {
        "linear": nnx.Linear(2, 2, rngs=rngs),
        "conv": nnx.Conv(2, 2, kernel_size=(3, 3), rngs=rngs),
        "layer_norm": nnx.LayerNorm(2, rngs=rngs),
        "group_norm": nnx.GroupNorm(4, num_groups=2, rngs=rngs),
        "rms_norm": nnx.RMSNorm(2, rngs=rngs),
        "embedding": nnx.Embed(5, 2, rngs=rngs),
        "batch_norm": nnx.BatchNorm(2, rngs=rngs),
        "lora": LoRA(nnx.Linear(2, 2, rngs=rngs), rank=1, rngs=rngs),  # its own tensor: DoRA's magnitude
        # The speech twins' own tensors (flax_impl.models): weight norm, and parameters a model owns.
        "conv_weight_norm": WeightNorm((3, 2, 4), dim=2, param_dtype=jnp.float32, rngs=rngs),
        "masked_spec_embed": Wav2Vec2Model(
            {
                "hidden_size": 4,
                "num_hidden_layers": 1,
                "num_attention_heads": 1,
                "intermediate_size": 4,
                "conv_dim": [2],
                "conv_kernel": [2],
                "conv_stride": [2],
                "num_conv_pos_embeddings": 2,
                "num_conv_pos_embedding_groups": 1,
            },
            rngs=rngs,
        ),
        "gated_relative_position": WavLMAttention(
            Layers(
                WavLMConfig(hidden_size=4, num_attention_heads=2, num_conv_pos_embedding_groups=1),
                None,
                jnp.float32,
                None,
                rngs,
            ),
            has_relative_position_bias=True,
        ),
    }
    assert {kind: layer_kind(module) for kind, module in modules.items()} == {k: k for k in modules}
    assert set(modules) == set(KINDS)
    assert layer_kind(nnx.LoRALinear(2, 2, lora_rank=1, rngs=rngs)) == "linear"  # a subclass
    for other in (
        nnx.ConvTranspose(2, 2, (3,), rngs=rngs),
        nnx.Dropout(0.1),
        nnx.LinearGeneral(2, 2, rngs=rngs),
    ):
        assert layer_kind(other) is None


# ---------------------------------------------------------------------------------------------
# torch_style_state_dict


def test_torch_style_state_dict_uses_torch_names_order_and_layouts():
    model = Conv2dBatchNormNet(nnx.Rngs(0))
    state = torch_style_state_dict(model)
    # Modules come in flax_impl.graph.named_modules order; within one, in state_dict order.
    assert set(state) == {
        f"{layer}.{name}" for layer in ("conv1", "conv2", "head") for name in ("weight", "bias")
    } | {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    assert [k for k in state if k.startswith("bn.")] == [
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
    ]
    np.testing.assert_array_equal(state["conv1.weight"], np.transpose(model.conv1.kernel[...], (3, 2, 0, 1)))
    np.testing.assert_array_equal(state["head.weight"], np.asarray(model.head.kernel[...]).T)
    assert all(array.flags["C_CONTIGUOUS"] and isinstance(array, np.ndarray) for array in state.values())
    assert list(torch_style_state_dict(StackedLinears(nnx.Rngs(0)))) == [
        "blocks.0.weight",
        "blocks.0.bias",
        "blocks.1.weight",
        "blocks.1.bias",
        "blocks.2.weight",
        "blocks.2.bias",
        "norm.weight",
        "norm.bias",
    ]


def test_torch_style_state_dict_keeps_bfloat16_bit_exact():
    model = SeedMLP(nnx.Rngs(0), param_dtype=jnp.bfloat16)
    state = torch_style_state_dict(model)
    assert state["layer1.weight"].dtype == ml_dtypes.bfloat16
    expected = np.asarray(model.layer1.kernel[...]).T.view(np.uint16)
    np.testing.assert_array_equal(state["layer1.weight"].view(np.uint16), expected)


def test_torch_style_state_dict_names_variables_of_unsupported_modules():
    with pytest.raises(CheckpointError, match=r"'gain \(Param\)'.*strict=False"):
        torch_style_state_dict(BareGainNet(nnx.Rngs(0)))
    assert list(torch_style_state_dict(BareGainNet(nnx.Rngs(0)), strict=False)) == [
        "proj.weight",
        "proj.bias",
    ]


def test_torch_style_state_dict_skips_rng_state_of_dropout():
    model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Dropout(0.1, rngs=nnx.Rngs(1)))
    assert list(torch_style_state_dict(model)) == ["layers.0.weight", "layers.0.bias"]


# ---------------------------------------------------------------------------------------------
# load_torch_style_state_dict


def test_load_round_trips_every_kind():
    source, target = Conv2dBatchNormNet(nnx.Rngs(0)), Conv2dBatchNormNet(nnx.Rngs(1))
    source.bn.mean[...] = jnp.arange(8.0)
    report = load_torch_style_state_dict(target, torch_style_state_dict(source))
    assert report.ok and len(report.loaded) == 10
    _assert_same(_snapshot(target), _snapshot(source))


def test_strict_load_reports_missing_unexpected_and_misshaped_keys_and_changes_nothing():
    model = SeedMLP(nnx.Rngs(0))
    before = _snapshot(model)
    arrays = torch_style_state_dict(SeedMLP(nnx.Rngs(1)))
    del arrays["layer3.bias"]
    arrays["layer9.weight"] = np.zeros((2, 2), np.float32)
    arrays["layer2.weight"] = arrays["layer2.weight"].T[:, :5]
    with pytest.raises(CheckpointError) as info:
        load_torch_style_state_dict(model, arrays)
    message = str(info.value)
    assert "missing keys ['layer3.bias']" in message
    assert "unexpected keys ['layer9.weight']" in message
    assert "layer2.weight: file (20, 5) vs model (20, 20)" in message
    _assert_same(_snapshot(model), before)


def test_non_strict_load_allows_missing_but_refuses_unexpected_and_misshaped():
    model, source = SeedMLP(nnx.Rngs(0)), SeedMLP(nnx.Rngs(1))
    arrays = {"layer1.weight": torch_style_state_dict(source)["layer1.weight"]}
    report = load_torch_style_state_dict(model, arrays, strict=False)
    assert report.loaded == ["layer1.weight"] and "layer3.bias" in report.missing
    np.testing.assert_array_equal(model.layer1.kernel[...], source.layer1.kernel[...])
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_torch_style_state_dict(model, {"nope": np.zeros(1)}, strict=False)
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        load_torch_style_state_dict(model, {"layer1.bias": np.zeros(3)}, strict=False)


def test_square_linear_weight_is_transposed_on_load():
    model = nnx.Linear(3, 3, use_bias=False, rngs=nnx.Rngs(0))
    weight = np.arange(9, dtype=np.float32).reshape(3, 3)  # torch (out, in)
    load_torch_style_state_dict(model, {"weight": weight})
    np.testing.assert_array_equal(model.kernel[...], weight.T)


def test_load_casts_to_the_variable_dtype_and_notes_torch_only_buffers():
    model = Conv2dBatchNormNet(nnx.Rngs(0))
    model.bn.mean[...] = model.bn.mean[...].astype(jnp.float32)
    bf16 = SeedMLP(nnx.Rngs(0), param_dtype=jnp.bfloat16)
    arrays = {k: v.astype(np.float32) for k, v in torch_style_state_dict(SeedMLP(nnx.Rngs(1))).items()}
    load_torch_style_state_dict(bf16, arrays)
    assert bf16.layer1.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(bf16.layer1.kernel[...]), arrays["layer1.weight"].T.astype(ml_dtypes.bfloat16)
    )
    arrays = torch_style_state_dict(model) | {"bn.num_batches_tracked": np.array(3)}
    report = load_torch_style_state_dict(model, arrays)
    assert report.ok and report.notes == [
        "bn.num_batches_tracked: buffer (I64) the target does not hold, not converted"
    ]


def test_load_keeps_the_variables_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("model",))
    model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    sharding = NamedSharding(mesh, PartitionSpec(None, "model"))
    model.kernel.set_value(jax.device_put(model.kernel[...], sharding))
    load_torch_style_state_dict(model, torch_style_state_dict(nnx.Linear(4, 8, rngs=nnx.Rngs(1))))
    assert model.kernel[...].sharding == sharding


# ---------------------------------------------------------------------------------------------
# Files


def _adapted(seed: int = 1, **kwargs) -> AdaptedModel:
    options = {"target_layers": ["layer[13]"], "unfrozen_layers": ["layer2"], "adapter_kwargs": {"rank": 2}}
    options.update(kwargs)
    model = AdaptedModel(SeedMLP(nnx.Rngs(0)), LoRA, rngs=nnx.Rngs(seed), **options)
    for index, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(model, model.trainable))):
        variable[...] = jax.random.normal(jax.random.key(index), variable.shape)
    return model


def test_saver_writes_trainable_params_under_torch_keys_with_metadata(tmp_path):
    model = _adapted()
    path = tmp_path / "adapters.safetensors"
    model.saver(str(path))
    header, metadata = read_safetensors_header(path)
    assert set(header) == {
        "adapted_model.layer1.adapter_down_proj.weight",
        "adapted_model.layer1.adapter_up_proj.weight",
        "adapted_model.layer2.weight",
        "adapted_model.layer2.bias",
        "adapted_model.layer3.adapter_down_proj.weight",
        "adapted_model.layer3.adapter_up_proj.weight",
    }
    assert header["adapted_model.layer1.adapter_down_proj.weight"]["shape"] == [2, 10]  # torch (out, in)
    assert metadata["framework"] == "flax" and metadata["adapter_class"] == "LoRA"
    assert json.loads(metadata["adapter_kwargs"]) == {"rank": 2}
    assert json.loads(metadata["target_layers"]) == ["layer[13]"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapters.safetensors"]  # no temporary left


def test_saver_includes_running_stats_of_unfrozen_batchnorm(tmp_path):
    model = AdaptedModel(
        Conv2dBatchNormNet(nnx.Rngs(0)), LoRA, all_conv=True, unfrozen_layers="bn", rngs=nnx.Rngs(1)
    )
    assert {k for k in model.trainable_state_dict() if ".bn." in k} == {
        "adapted_model.bn.weight",
        "adapted_model.bn.bias",
        "adapted_model.bn.running_mean",
        "adapted_model.bn.running_var",
    }


def test_loader_restores_trained_params_into_a_fresh_model(tmp_path):
    trained, fresh = _adapted(1), _adapted(2)
    path = str(tmp_path / "a.safetensors")
    trained.saver(path)
    frozen_before = np.array(fresh.adapted_model.layer1.pretrained_module.kernel[...])
    fresh.loader(path)
    _assert_same(_snapshot(fresh.adapted_model), _snapshot(trained.adapted_model))
    np.testing.assert_array_equal(fresh.adapted_model.layer1.pretrained_module.kernel[...], frozen_before)
    fresh.parameter_transfer(path)


def test_loader_refuses_unexpected_misshaped_or_missing_trainable_keys_before_loading(tmp_path):
    model = _adapted()
    before = _snapshot(model)
    arrays = model.trainable_state_dict()
    cases = {
        "unexpected keys ['adapted_model.layer9.weight']": arrays
        | {"adapted_model.layer9.weight": np.zeros(2)},
        "mis-shaped keys ['adapted_model.layer2.bias: file (3,) vs model (20,)']": arrays
        | {"adapted_model.layer2.bias": np.zeros(3, np.float32)},
        "missing trainable keys ['adapted_model.layer2.weight']": {
            k: v for k, v in arrays.items() if k != "adapted_model.layer2.weight"
        },
    }
    for expected, content in cases.items():
        path = tmp_path / "bad.safetensors"
        save_state_dict_file(content, path)
        with pytest.raises(
            CheckpointError,
            match=expected.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)"),
        ):
            model.loader(str(path))
        _assert_same(_snapshot(model), before)


def test_loader_accepts_a_file_that_also_holds_frozen_weights(tmp_path):
    model = _adapted()
    path = tmp_path / "full.safetensors"
    save_state_dict_file(torch_style_state_dict(_adapted(seed=5)), path)
    model.loader(str(path))


def test_bad_files_raise_naming_the_file(tmp_path):
    model = _adapted()
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        model.loader(str(tmp_path / "nowhere.safetensors"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="garbage.safetensors.*not a safetensors file"):
        model.loader(str(garbage))
    good = tmp_path / "good.safetensors"
    model.saver(str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-16])
    with pytest.raises(CheckpointError, match="truncated.safetensors.*truncated"):
        model.loader(str(truncated))
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"PK")
    with pytest.raises(CheckpointError, match=r"model.ckpt.*python -m converters"):
        load_state_dict_file(pickled)
    with pytest.raises(CheckpointError, match=r"writes .safetensors checkpoints only, got '.*x.ckpt'"):
        model.saver(str(tmp_path / "x.ckpt"))
    assert not (tmp_path / "x.ckpt").exists()


def test_failed_write_leaves_the_previous_file_untouched(tmp_path):
    path = tmp_path / "a.safetensors"
    save_state_dict_file({"w": np.ones(2, np.float32)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception, match="dtype"):  # safetensors refuses it mid-write
        save_state_dict_file({"w": np.array(["not", "numeric"])}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["a.safetensors"]


# Few distinct shapes, so that eagerly compiled ops are reused across examples.
@settings(max_examples=8, deadline=None)
@given(
    spatial=st.sampled_from([0, 1, 2, 3]),
    in_features=st.sampled_from([2, 3]),
    out_features=st.sampled_from([3, 4]),
    rank=st.sampled_from([1, 2]),
    houlsby=st.booleans(),
)
def test_save_load_round_trip_over_layer_geometries(
    tmp_path_factory, spatial, in_features, out_features, rank, houlsby
):
    def build(seed):
        if spatial:
            base = nnx.Conv(in_features, out_features, kernel_size=(2,) * spatial, rngs=nnx.Rngs(0))
        else:
            base = nnx.Linear(in_features, out_features, rngs=nnx.Rngs(0))
        model = nnx.Sequential(base)
        if houlsby and not spatial:
            return AdaptedModel(
                model,
                HoulsbyAdapterLinear,
                target_layers="layers.0",
                adapter_kwargs={"projection_size": rank},
                rngs=nnx.Rngs(seed),
            )
        return AdaptedModel(
            model, LoRA, target_layers="layers.0", adapter_kwargs={"rank": rank}, rngs=nnx.Rngs(seed)
        )

    trained, fresh = build(1), build(2)
    for _, variable in nnx.to_flat_state(nnx.state(trained, trained.trainable)):
        variable[...] = variable[...] + 1.0
    path = str(tmp_path_factory.mktemp("ckpt") / "a.safetensors")
    trained.saver(path)
    fresh.loader(path)
    _assert_same(_snapshot(fresh), _snapshot(trained))


def test_saver_refuses_a_trainable_variable_without_a_torch_name(tmp_path):
    model = nnx.Sequential(BareGainNet(nnx.Rngs(0)), nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    frozen_gain = AdaptedModel(model, LoRA, target_layers="layers.1", rngs=nnx.Rngs(1))
    frozen_gain.saver(str(tmp_path / "ok.safetensors"))  # the frozen bare `gain` is not saved: fine
    model = nnx.Sequential(BareGainNet(nnx.Rngs(0)), nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    trained_gain = AdaptedModel(
        model, LoRA, target_layers="layers.1", unfrozen_layers="layers.0", rngs=nnx.Rngs(1)
    )
    with pytest.raises(CheckpointError, match=r"no PyTorch name.*'adapted_model.layers.0.gain'"):
        trained_gain.saver(str(tmp_path / "bad.safetensors"))
    assert not (tmp_path / "bad.safetensors").exists()
