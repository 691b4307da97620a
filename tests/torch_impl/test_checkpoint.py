"""Adapter-only checkpoints: what ``saver`` writes and what ``loader`` accepts, in both formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import torch
from torch import nn

from tests.torch_impl.twins import randomize_trainable, trainable_names
from tests.zoo import torch_models
from torch_impl import AdaptedModel, HoulsbyAdapterLinear, LoRA
from twinformat.format import parse_metadata

FORMATS = ["adapters.ckpt", "adapters.safetensors"]
BN_BUFFERS = [
    "adapted_model.bn.running_mean",
    "adapted_model.bn.running_var",
    "adapted_model.bn.num_batches_tracked",
]


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    return torch.load(path, weights_only=True)


def _conv_model(seed: int = 0) -> AdaptedModel:
    """The same base weights whatever ``seed``; the seed only moves the adapters' init."""
    torch.manual_seed(0)
    base = torch_models.MixedConvNet()
    torch.manual_seed(seed)
    return AdaptedModel(base, LoRA, all_conv=True, unfrozen_layers=["bn"], adapter_kwargs={"rank": 2})


@pytest.mark.parametrize("name", FORMATS)
def test_saver_writes_only_trainable_parameters_keyed_as_in_state_dict(tmp_path, name):
    model = AdaptedModel(
        torch_models.SeedMLP(), LoRA, target_layers=["layer[13]"], unfrozen_layers=["layer2"]
    )
    model.saver(tmp_path / name)
    saved = _read(tmp_path / name)
    if name.endswith(".ckpt"):  # safetensors stores names sorted
        assert list(saved) == trainable_names(model)
    assert sorted(saved) == sorted(trainable_names(model))
    for key, value in saved.items():
        assert torch.equal(value, model.state_dict()[key])


@pytest.mark.parametrize("name", FORMATS)
def test_unfrozen_batchnorm_running_stats_are_saved_and_restored(tmp_path, name):
    model = _conv_model()
    randomize_trainable(model)
    model.train()(torch_models.mixed_conv_net_input())  # training moves the running stats
    assert int(model.adapted_model.bn.num_batches_tracked) == 1
    model.saver(tmp_path / name)
    saved = _read(tmp_path / name)
    assert sorted(saved) == sorted(trainable_names(model) + BN_BUFFERS)

    fresh = _conv_model(seed=1)
    fresh.loader(tmp_path / name)
    for key in BN_BUFFERS:
        assert torch.equal(fresh.state_dict()[key], model.state_dict()[key]), key
    x = torch_models.mixed_conv_net_input()
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_a_speechbrain_style_file_without_buffers_loads(tmp_path):
    """SpeechBrain's saver writes parameters only: the buffers of unfrozen layers may be absent."""
    model = _conv_model()
    randomize_trainable(model)
    params_only = {k: v for k, v in model.trainable_state_dict().items() if k not in BN_BUFFERS}
    torch.save(params_only, tmp_path / "sb.ckpt")
    fresh = _conv_model(seed=1)
    fresh.loader(tmp_path / "sb.ckpt")
    for key in params_only:
        assert torch.equal(fresh.state_dict()[key], model.state_dict()[key])


def test_a_full_state_dict_including_frozen_weights_loads(tmp_path):
    source = AdaptedModel(torch_models.SeedMLP(), LoRA, target_layers=["layer1"])
    randomize_trainable(source)
    with torch.no_grad():
        source.adapted_model.layer2.weight.fill_(0.5)  # frozen, but in the file
    torch.save(source.state_dict(), tmp_path / "full.ckpt")
    target = AdaptedModel(torch_models.SeedMLP(), LoRA, target_layers=["layer1"])
    target.loader(tmp_path / "full.ckpt")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.parametrize("name", FORMATS)
def test_parameter_transfer_loads_like_loader(tmp_path, name):
    source = AdaptedModel(
        torch_models.SeedMLP(), HoulsbyAdapterLinear, all_linear=True, adapter_kwargs={"projection_size": 2}
    )
    randomize_trainable(source)
    source.saver(tmp_path / name)
    target = AdaptedModel(
        torch_models.SeedMLP(), HoulsbyAdapterLinear, all_linear=True, adapter_kwargs={"projection_size": 2}
    )
    target.parameter_transfer(tmp_path / name)
    for key in trainable_names(source):
        assert torch.equal(target.state_dict()[key], source.state_dict()[key])


def test_safetensors_header_records_what_the_file_holds(tmp_path):
    model = AdaptedModel(
        torch_models.SeedMLP(),
        LoRA,
        target_layers=["layer[13]"],
        unfrozen_layers=["layer2"],
        adapter_kwargs={"rank": 2},
    )
    model.saver(tmp_path / "a.safetensors")
    with safetensors.safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        metadata = parse_metadata(f.metadata())
    assert metadata["framework"] == "torch"
    assert metadata["adapter_class"] == "LoRA"
    assert metadata["adapter_kwargs"] == {"rank": 2}
    assert metadata["target_layers"] == ["layer[13]"]
    assert metadata["unfrozen_layers"] == ["layer2"]
    assert metadata["layout"] == "torch"


def test_safetensors_header_stores_a_houlsby_activation_class_by_name(tmp_path):
    model = AdaptedModel(
        torch_models.SeedMLP(),
        HoulsbyAdapterLinear,
        all_linear=True,
        adapter_kwargs={"projection_size": 2, "activation": nn.GELU},
    )
    model.saver(tmp_path / "h.safetensors")
    with safetensors.safe_open(str(tmp_path / "h.safetensors"), "pt") as f:
        kwargs = json.loads(f.metadata()["adapter_kwargs"])
    assert kwargs == {"activation": "torch.nn.modules.activation.GELU", "projection_size": 2}
    assert parse_metadata({"target_layers": "[]"})["target_layers"] == []


@pytest.mark.parametrize("name", FORMATS)
def test_tied_weights_in_unfrozen_layers_save_and_load(tmp_path, name):
    """safetensors refuses tensors sharing memory; a tied embedding/head must still save."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.body(self.emb(ids)))

    torch.manual_seed(0)
    model = AdaptedModel(Tied(), LoRA, target_layers=["body"], unfrozen_layers=["emb", "head"])
    randomize_trainable(model)
    model.saver(tmp_path / name)
    torch.manual_seed(0)
    fresh = AdaptedModel(Tied(), LoRA, target_layers=["body"], unfrozen_layers=["emb", "head"])
    fresh.loader(tmp_path / name)
    ids = torch.tensor([[1, 2, 6]])
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)
    assert fresh.adapted_model.head.weight is fresh.adapted_model.emb.weight


@pytest.mark.parametrize("name", FORMATS)
def test_loader_keeps_the_models_dtype_when_the_file_holds_the_same(tmp_path, name):
    model = AdaptedModel(
        torch_models.SeedMLP().to(torch.bfloat16), LoRA, all_linear=True, adapter_kwargs={"rank": 2}
    )
    randomize_trainable(model)
    model.saver(tmp_path / name)
    assert {v.dtype for v in _read(tmp_path / name).values()} == {torch.bfloat16}
    fresh = AdaptedModel(
        torch_models.SeedMLP().to(torch.bfloat16), LoRA, all_linear=True, adapter_kwargs={"rank": 2}
    )
    fresh.loader(tmp_path / name)
    for key in trainable_names(model):
        assert torch.equal(fresh.state_dict()[key], model.state_dict()[key])


def test_saver_accepts_str_and_pathlike(tmp_path):
    model = AdaptedModel(torch_models.SeedMLP(), LoRA, target_layers=["layer1"])
    model.saver(str(tmp_path / "a.ckpt"))
    model.saver(tmp_path / "b.safetensors")
    model.loader(str(tmp_path / "b.safetensors"))
    model.loader(tmp_path / "a.ckpt", True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "b.safetensors"]
