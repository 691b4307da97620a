"""File-level merges of LoRA's options (rsLoRA, DoRA, embeddings), from either twin's adapter
files, give what the in-memory merge gives; a weight_norm-parametrized base is refused by name
before anything is written (issue 14, item 1); the recorded options are checked on load."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import converters
import flax_impl
import torch_impl
from converters.files import TensorFile
from converters.merge import MergeError
from tests.zoo import flax_models, torch_models
from tests.zoo.arrays import randomize_torch
from tests.zoo.layers import token_batch
from twinformat.errors import CheckpointError


def _adapted(base, options):
    model = torch_impl.AdaptedModel(
        copy.deepcopy(base),
        torch_impl.LoRA,
        target_layers=["emb", "fc1", "fc2"] if not options.get("use_dora") else ["fc1", "fc2"],
        adapter_kwargs={"rank": 2, "alpha": 3.0, **options},
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(param + torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.mark.parametrize(
    "options",
    [{"use_rslora": True}, {"use_dora": True}, {"use_dora": True, "use_rslora": True, "dropout": 0.1}],
)
@pytest.mark.parametrize("origin", ["torch", "flax"])
def test_merged_file_computes_what_the_adapted_model_computes(tmp_path, options, origin):
    torch.manual_seed(0)
    base = randomize_torch(torch_models.TokenNet()).eval()
    converters.save_torch_layout(base, tmp_path / "base.safetensors")
    adapted = _adapted(base, options)
    if origin == "torch":
        adapted.saver(str(tmp_path / "adapter.safetensors"))
    else:  # the Flax twin's saver, on the same weights
        flax_base = flax_twin(base)
        flax_model = flax_impl.AdaptedModel(
            flax_base,
            flax_impl.LoRA,
            target_layers=adapted.target_layers,
            adapter_kwargs=adapted.adapter_kwargs,
            rngs=nnx.Rngs(1),
        )
        converters.torch_to_flax(adapted, flax_model)
        flax_model.saver(str(tmp_path / "adapter.safetensors"))
    report = converters.merge_adapter_file(
        tmp_path / "base.safetensors", tmp_path / "adapter.safetensors", tmp_path / "merged.safetensors"
    )
    assert any("DoRA magnitude folded in" in n for n in report.notes) == bool(options.get("use_dora"))
    merged = torch_models.TokenNet().eval()
    converters.flax_to_torch(tmp_path / "merged.safetensors", merged)
    x, _ = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), rtol=1e-5, atol=1e-5)
        in_memory = torch_impl.merge_and_unload(adapted)
        for key, value in in_memory.state_dict().items():
            torch.testing.assert_close(merged.state_dict()[key], value, rtol=1e-6, atol=1e-6)


def flax_twin(base):

    flax_base = flax_models.TokenNet(nnx.Rngs(0))
    converters.torch_to_flax(base, flax_base)
    return flax_base


def test_embedding_adapter_file_converts_to_flax_layout_and_back_bit_exact(tmp_path):
    torch.manual_seed(0)
    adapted = _adapted(randomize_torch(torch_models.TokenNet()).eval(), {})
    adapted.saver(str(tmp_path / "adapter.safetensors"))
    converters.convert_file(tmp_path / "adapter.safetensors", tmp_path / "flax.safetensors", layout="flax")
    converters.convert_file(tmp_path / "flax.safetensors", tmp_path / "back.safetensors", layout="torch")
    with TensorFile(tmp_path / "adapter.safetensors") as a, TensorFile(tmp_path / "back.safetensors") as b:
        assert sorted(a.names) == sorted(b.names)
        for name in a.names:
            assert np.array_equal(a.get(name), b.get(name)), name
    with TensorFile(tmp_path / "flax.safetensors") as f:  # the embedding's down factor is not transposed
        assert f.get("adapted_model.emb.adapter_down_proj.embedding").shape == (11, 2)
        assert f.get("adapted_model.fc1.adapter_down_proj.kernel").shape == (8, 2)


def test_weight_norm_base_file_is_refused_by_name_and_nothing_is_written(tmp_path):
    base = nn.Sequential(weight_norm(nn.Conv1d(3, 4, 3, padding=1)))
    torch_impl_model = torch_impl.AdaptedModel(copy.deepcopy(base), torch_impl.LoRA, all_conv=True)
    converters.save_torch_layout(base, tmp_path / "base.safetensors")
    torch_impl_model.saver(str(tmp_path / "adapter.safetensors"))
    with pytest.raises(
        MergeError, match=r"layer '0'.*parametrization.*parametrizations.weight.original0.*merge_lora"
    ):
        converters.merge_adapter_file(
            tmp_path / "base.safetensors", tmp_path / "adapter.safetensors", tmp_path / "m.safetensors"
        )
    assert not (tmp_path / "m.safetensors").exists()


def test_dora_file_without_magnitudes_is_refused(tmp_path):
    torch.manual_seed(0)
    base = randomize_torch(torch_models.TokenNet()).eval()
    converters.save_torch_layout(base, tmp_path / "base.safetensors")
    adapted = _adapted(base, {"use_dora": True})
    adapted.saver(str(tmp_path / "adapter.safetensors"))
    with TensorFile(tmp_path / "adapter.safetensors") as f:
        tensors = {n: f.get(n) for n in f.names if not n.endswith("adapter_magnitude")}
        metadata = dict(f.metadata)
    converters.files.write_safetensors(tmp_path / "cut.safetensors", tensors, metadata)
    with pytest.raises(MergeError, match="use_dora=True but has no adapter_magnitude"):
        converters.merge_adapter_file(
            tmp_path / "base.safetensors", tmp_path / "cut.safetensors", tmp_path / "m.safetensors"
        )


def test_recorded_options_that_differ_from_the_model_raise_naming_both(tmp_path):
    torch.manual_seed(0)
    base = randomize_torch(torch_models.TokenNet()).eval()
    adapted = _adapted(base, {"use_rslora": True})
    path = str(tmp_path / "adapter.safetensors")
    adapted.saver(path)
    _adapted(base, {"use_rslora": True}).loader(path)  # the same options load
    with pytest.raises(CheckpointError, match=r"use_rslora differs \(file True, model False\)"):
        _adapted(base, {}).loader(path)
    wider = torch_impl.AdaptedModel(
        copy.deepcopy(base),
        torch_impl.LoRA,
        target_layers=["emb", "fc1", "fc2"],
        adapter_kwargs={"rank": 2, "use_rslora": True},
    )
    with pytest.raises(CheckpointError, match=r"alpha differs \(file 3.0, model 1.0\)"):
        wider.loader(path)
    houlsby = torch_impl.AdaptedModel(
        copy.deepcopy(base),
        torch_impl.HoulsbyAdapterLinear,
        target_layers=["fc1"],
        adapter_kwargs={"projection_size": 2},
    )
    with pytest.raises(
        CheckpointError, match="it holds LoRA adapters but this model has HoulsbyAdapterLinear"
    ):
        houlsby.loader(path)
