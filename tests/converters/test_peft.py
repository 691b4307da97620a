"""PEFT interop against the real ``peft`` package, on small models built here (no hub)."""

from __future__ import annotations

import copy
import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest
import torch
from flax import nnx

import converters
import flax_impl
import torch_impl
from converters.files import TensorFile
from converters.peft import PeftConversionError, peft_to_adapter_file, read_peft_adapter
from tests.zoo import flax_models, torch_models
from tests.zoo.arrays import flax_output, randomize_torch, torch_output
from tests.zoo.layers import conv_batch


def _peft():
    """Import peft; transformers imports torchaudio, whose PyPI wheel does not load beside the CPU
    torch wheel, so a stub stands in (with a module spec, which transformers' probe needs)."""
    stub = sys.modules.get("torchaudio")
    if stub is None:
        stub = types.ModuleType("torchaudio")
        stub.__path__ = []
        stub.__version__ = "0.0.0"
        sys.modules["torchaudio"] = stub
    if getattr(stub, "__spec__", None) is None:
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None, is_package=True)
    import peft

    return peft


@pytest.fixture(scope="module")
def peft():
    return _peft()


@pytest.fixture
def base():
    torch.manual_seed(0)
    return randomize_torch(torch_models.Conv1dNormNet()).eval()


@pytest.fixture
def peft_dir(tmp_path, peft, base):
    """A PEFT LoRA adapter on conv1 and head with random (trained-looking) factors."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv1", "head"], lora_dropout=0.1)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    x, _ = conv_batch()
    with torch.no_grad():
        expected = model(x).numpy()
    return tmp_path / "peft" / "default" if (
        tmp_path / "peft" / "default"
    ).is_dir() else tmp_path / "peft", expected


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_peft_adapter_imported_into_torch_computes_what_peft_computes(peft_dir, base):
    folder, expected = peft_dir
    adapted, report = converters.import_peft_adapter(folder, copy.deepcopy(base))
    assert isinstance(adapted, torch_impl.AdaptedModel) and sorted(adapted.replace_layers) == [
        "conv1",
        "head",
    ]
    assert adapted.adapter_kwargs == {"rank": 4, "alpha": 8.0, "dropout": 0.1} and report.ok
    assert not adapted.training  # eval mode, as PeftModel.from_pretrained returns it
    assert any("lora_dropout" in note for note in report.notes)
    x, _ = conv_batch()
    np.testing.assert_allclose(torch_output(adapted.eval(), x), expected, rtol=1e-5, atol=1e-5)


def test_peft_adapter_imported_into_flax_computes_what_peft_computes(peft_dir, base):
    folder, expected = peft_dir
    flax_base = flax_models.Conv1dNormNet(nnx.Rngs(0))
    converters.torch_to_flax(base, flax_base)
    adapted, _ = converters.import_peft_adapter(folder, flax_base, rngs=nnx.Rngs(3))
    assert isinstance(adapted, flax_impl.AdaptedModel)
    _, x = conv_batch()
    np.testing.assert_allclose(flax_output(adapted, x), expected, rtol=1e-5, atol=1e-5)


def test_rslora_scaling_is_carried_over(tmp_path, peft, base):
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["conv2"], use_rslora=True)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        model.base_model.model.conv2.lora_B["default"].weight.normal_()
    model.eval().save_pretrained(tmp_path / "rs")
    adapted, report = converters.import_peft_adapter(tmp_path / "rs", copy.deepcopy(base))
    assert adapted.adapter_kwargs == {"rank": 3, "alpha": 5.0, "use_rslora": True}  # carried as itself
    x, _ = conv_batch()
    with torch.no_grad():
        np.testing.assert_allclose(torch_output(adapted.eval(), x), model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_our_torch_adapter_exported_to_peft_loads_and_computes_the_same(tmp_path, peft, base):
    adapted = torch_impl.AdaptedModel(
        copy.deepcopy(base),
        torch_impl.LoRA,
        target_layers=["conv*", "head"],
        adapter_kwargs={"rank": 3, "alpha": 6.0},
    )
    randomize_torch(adapted, seed=4)
    with torch.no_grad():  # put the base back: only the adapters are exported
        for name, layer in (("conv1", base.conv1), ("conv2", base.conv2), ("head", base.head)):
            getattr(adapted.adapted_model, name).pretrained_module.load_state_dict(layer.state_dict())
        adapted.adapted_model.gn.load_state_dict(base.gn.state_dict())
        adapted.adapted_model.bn.load_state_dict(base.bn.state_dict())
    config = converters.export_peft_adapter(adapted, tmp_path / "out", base_model_name_or_path="convnet")
    assert config["r"] == 3 and config["lora_alpha"] == 6.0
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    x, _ = conv_batch()
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), torch_output(adapted.eval(), x), rtol=1e-5, atol=1e-5)


def test_our_flax_adapter_exported_to_peft_computes_what_the_flax_model_computes(tmp_path, peft, base):
    flax_base = flax_models.Conv1dNormNet(nnx.Rngs(0))
    converters.torch_to_flax(base, flax_base)
    adapted = flax_impl.AdaptedModel(
        flax_base, flax_impl.LoRA, target_layers="head", adapter_kwargs={"rank": 2}, rngs=nnx.Rngs(1)
    )
    adapted.adapted_model.head.adapter_up_proj.kernel.set_value(np.full((2, 4), 0.7, np.float32))
    converters.export_peft_adapter(adapted, tmp_path / "out")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    x_torch, x_flax = conv_batch()
    with torch.no_grad():
        np.testing.assert_allclose(
            loaded(x_torch).numpy(), flax_output(adapted, x_flax), rtol=1e-5, atol=1e-5
        )


def test_file_level_import_and_export_round_trip_through_our_adapter_format(tmp_path, peft_dir, peft, base):
    folder, expected = peft_dir
    peft_to_adapter_file(folder, tmp_path / "ours.safetensors")
    with TensorFile(tmp_path / "ours.safetensors") as f:
        assert f.metadata["adapter_class"] == "LoRA" and json.loads(f.metadata["adapter_kwargs"]) == {
            "rank": 4,
            "alpha": 8.0,
            "dropout": 0.1,  # lora_dropout is carried
        }
    ours = torch_impl.AdaptedModel(
        copy.deepcopy(base),
        torch_impl.LoRA,
        target_layers=["conv1", "head"],
        adapter_kwargs={"rank": 4, "alpha": 8.0, "dropout": 0.1},
    )
    ours.loader(str(tmp_path / "ours.safetensors"))
    x, _ = conv_batch()
    np.testing.assert_allclose(torch_output(ours.eval(), x), expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(PeftConversionError, match="conv_geometry_checked"):
        converters.export_peft_adapter(tmp_path / "ours.safetensors", tmp_path / "again")
    assert not (tmp_path / "again").exists()
    converters.export_peft_adapter(
        tmp_path / "ours.safetensors", tmp_path / "again", conv_geometry_checked=True
    )
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_differing_alphas_are_held_per_layer_and_refused_only_by_the_one_alpha_file_writer(
    peft_dir, base, tmp_path
):
    folder, _ = peft_dir
    _edit_config(folder, rank_pattern={"conv1": 4}, alpha_pattern={"head": 8})
    assert read_peft_adapter(folder).rank == 4 and read_peft_adapter(folder).layer_kwargs == {}
    _edit_config(folder, alpha_pattern={"head": 16})
    adapted, _ = converters.import_peft_adapter(folder, copy.deepcopy(base))
    assert adapted.layer_adapter_kwargs == {"head": {"alpha": 16.0}}  # as the twins' from_pretrained holds it
    with pytest.raises(PeftConversionError, match="different ranks or alphas.*'head': r=4, alpha=16"):
        peft_to_adapter_file(folder, tmp_path / "x.safetensors")  # the file merge reads one alpha
    assert not (tmp_path / "x.safetensors").exists()
    peft_to_adapter_file(folder, tmp_path / "x.safetensors", full=True)
    with TensorFile(tmp_path / "x.safetensors") as f:
        assert json.loads(f.metadata["layer_adapter_kwargs"]) == {"head": {"alpha": 16.0}}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "lacks lora_magnitude_vector"),  # DoRA converts: with its magnitudes
        ({"bias": "all"}, "bias='all'"),
        ({"peft_type": "IA3"}, "is not LORA"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ],
)
def test_unsupported_peft_configs_are_refused_clearly(peft_dir, base, tmp_path, changes, message):
    folder, _ = peft_dir
    _edit_config(folder, **changes)
    with pytest.raises(PeftConversionError, match=message):
        converters.import_peft_adapter(folder, copy.deepcopy(base))
    with pytest.raises(PeftConversionError, match=message):
        peft_to_adapter_file(folder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_peft_adapter_for_another_model_is_refused(peft_dir):
    folder, _ = peft_dir

    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv1d(3, 8, 3, padding=1)
            self.head = torch.nn.Linear(8, 4)
            self.extra = torch.nn.Sequential(torch.nn.Linear(4, 4))
            self.extra.head = torch.nn.Linear(4, 4)  # also selected by target_modules=['head']

    with pytest.raises(PeftConversionError, match="was not made for this model"):
        converters.import_peft_adapter(folder, Other())


def test_export_refuses_what_peft_cannot_represent(tmp_path, base):
    houlsby = torch_impl.AdaptedModel(
        copy.deepcopy(base),
        torch_impl.HoulsbyAdapterLinear,
        target_layers="head",
        adapter_kwargs={"projection_size": 2},
    )
    with pytest.raises(
        PeftConversionError, match="HoulsbyAdapterLinear adapters have no PEFT LoRA equivalent"
    ):
        converters.export_peft_adapter(houlsby, tmp_path / "h")
    # An unfrozen layer is PEFT's modules_to_save, unless it holds an adapted layer.
    block = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    unfrozen = torch_impl.AdaptedModel(block, torch_impl.LoRA, target_layers="0.0", unfrozen_layers="0")
    with pytest.raises(
        PeftConversionError, match="unfrozen layer '0' holds the adapted layer '0.0'.*modules_to_save"
    ):
        converters.export_peft_adapter(unfrozen, tmp_path / "u")
    dilated = copy.deepcopy(base)
    dilated.conv1 = torch.nn.Conv1d(3, 8, 3, padding=2, dilation=2)
    with pytest.raises(PeftConversionError, match="dilation"):
        converters.export_peft_adapter(
            torch_impl.AdaptedModel(dilated, torch_impl.LoRA, target_layers="conv1"), tmp_path / "d"
        )
    merged = torch_impl.AdaptedModel(copy.deepcopy(base), torch_impl.LoRA, target_layers="head")
    torch_impl.merge_lora(merged)
    with pytest.raises(PeftConversionError, match="unmerge"):
        converters.export_peft_adapter(merged, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_existing_adapted_model_with_another_rank_is_refused(peft_dir, base):
    folder, _ = peft_dir
    model = torch_impl.AdaptedModel(
        copy.deepcopy(base), torch_impl.LoRA, target_layers=["conv1", "head"], adapter_kwargs={"rank": 2}
    )
    with pytest.raises(PeftConversionError, match="rank=2, alpha=1.0.*the PEFT adapter rank=4"):
        converters.import_peft_adapter(folder, model)


def test_a_scaled_embedding_is_refused_both_ways_as_the_twins_refuse_it(tmp_path, peft):
    """PEFT multiplies an embedding adapter's output by the layer's ``embed_scale`` (Gemma's
    scaled word embeddings); our LoRA does not, so neither direction converts it."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    def base():
        torch.manual_seed(0)
        return torch.nn.Sequential(Gemma3TextScaledWordEmbedding(10, 4, padding_idx=0, embed_scale=2.0))

    adapted = torch_impl.AdaptedModel(base(), torch_impl.LoRA, target_layers="0", adapter_kwargs={"rank": 2})
    with pytest.raises(PeftConversionError, match="layer '0' is a scaled embedding"):
        converters.export_peft_adapter(adapted, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    peft.get_peft_model(base(), peft.LoraConfig(r=2, target_modules=["0"])).save_pretrained(tmp_path / "peft")
    model = base()
    with pytest.raises(PeftConversionError, match="layer '0' is a scaled embedding"):
        converters.import_peft_adapter(tmp_path / "peft", model)
    assert type(model[0]) is Gemma3TextScaledWordEmbedding
