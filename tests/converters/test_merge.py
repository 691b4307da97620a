"""Merging a LoRA adapter file into a base file, for files of either framework's origin."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flax import nnx

import converters
import flax_impl
import torch_impl
from converters.files import TensorFile
from converters.merge import MergeError
from tests.zoo import flax_models, torch_models
from tests.zoo.arrays import flax_output, randomize_flax, randomize_torch, torch_output
from tests.zoo.layers import conv_batch

KWARGS = {"rank": 2, "alpha": 5.0}


def _trained_torch(base: torch.nn.Module) -> torch_impl.AdaptedModel:
    model = torch_impl.AdaptedModel(
        copy.deepcopy(base),
        torch_impl.LoRA,
        target_layers=["conv*", "head"],
        unfrozen_layers="bn",
        adapter_kwargs=KWARGS,
    )
    for param in model.parameters():
        if param.requires_grad:
            with torch.no_grad():
                param.copy_(torch.randn_like(param))
    return model.eval()


def test_merged_file_of_a_torch_adapter_computes_what_the_adapted_model_computes(tmp_path):
    base = randomize_torch(torch_models.Conv1dNormNet()).eval()
    converters.save_torch_layout(base, tmp_path / "base.safetensors")
    adapted = _trained_torch(base)
    adapted.saver(str(tmp_path / "adapter.safetensors"))

    report = converters.merge_adapter_file(
        tmp_path / "base.safetensors", tmp_path / "adapter.safetensors", tmp_path / "merged.safetensors"
    )
    assert "merged the LoRA update into conv1.weight (scaling 2.5)" in report.notes
    assert "bn.running_mean: taken from the adapter file (unfrozen layer)" in report.notes

    merged = torch_models.Conv1dNormNet().eval()
    converters.flax_to_torch(tmp_path / "merged.safetensors", merged)
    x, _ = conv_batch()
    np.testing.assert_allclose(torch_output(merged, x), torch_output(adapted, x), rtol=1e-5, atol=1e-5)

    torch_impl.merge_lora(adapted)  # the in-memory merge agrees with the file merge
    np.testing.assert_allclose(
        merged.conv2.weight.detach().numpy(),
        adapted.adapted_model.conv2.pretrained_module.weight.detach().numpy(),
        rtol=1e-6,
        atol=1e-6,
    )
    with TensorFile(tmp_path / "merged.safetensors") as f:
        assert f.metadata["content"] == "base" and f.metadata["merged_adapter"] == "adapter.safetensors"


def test_merged_file_of_a_flax_adapter_in_flax_layout_computes_what_the_flax_model_computes(tmp_path):
    base = randomize_flax(flax_models.Conv1dNormNet(nnx.Rngs(0)))
    converters.save_flax_layout(base, tmp_path / "base_flax.safetensors")
    adapted = flax_impl.AdaptedModel(
        base, flax_impl.LoRA, target_layers=["conv*"], adapter_kwargs=KWARGS, rngs=nnx.Rngs(1)
    )
    for _, variable in nnx.to_flat_state(nnx.state(adapted, adapted.trainable)):
        variable.set_value(variable.get_value() + 0.3)
    adapted.saver(str(tmp_path / "adapter.safetensors"))

    converters.merge_adapter_file(
        tmp_path / "base_flax.safetensors", tmp_path / "adapter.safetensors", tmp_path / "merged.safetensors"
    )
    with TensorFile(tmp_path / "merged.safetensors") as f:
        assert f.layout == "flax" and "conv1.kernel" in f.names
    merged = flax_models.Conv1dNormNet(nnx.Rngs(5))
    converters.load_flax_layout(merged, tmp_path / "merged.safetensors")
    _, x = conv_batch()
    np.testing.assert_allclose(flax_output(merged, x), flax_output(adapted, x), rtol=1e-5, atol=1e-5)


def test_whole_adapted_model_file_as_base_comes_out_with_plain_names(tmp_path):
    base = randomize_torch(torch_models.Conv1dNormNet()).eval()
    adapted = _trained_torch(base)
    frozen = torch_impl.AdaptedModel(
        copy.deepcopy(base), torch_impl.LoRA, target_layers=["conv*", "head"], adapter_kwargs=KWARGS
    )
    state = {k: v for k, v in frozen.state_dict().items() if "adapter_" not in k}
    torch_impl.checkpoint.save_state_dict_file(state, tmp_path / "adapted_base.safetensors")
    adapted.saver(str(tmp_path / "adapter.safetensors"))
    report = converters.merge_adapter_file(
        tmp_path / "adapted_base.safetensors",
        tmp_path / "adapter.safetensors",
        tmp_path / "merged.safetensors",
    )
    assert sorted(report.loaded) == sorted(base.state_dict())


def test_half_precision_merge_matches_the_in_memory_merge(tmp_path):
    base = randomize_torch(torch_models.Conv1dNormNet()).eval().to(torch.bfloat16)
    converters.save_torch_layout(base, tmp_path / "base.safetensors")
    adapted = _trained_torch(base)
    adapted.saver(str(tmp_path / "adapter.safetensors"))
    converters.merge_adapter_file(
        tmp_path / "base.safetensors", tmp_path / "adapter.safetensors", tmp_path / "m.safetensors"
    )
    torch_impl.merge_lora(adapted)
    merged = TensorFile(tmp_path / "m.safetensors").get("head.weight").astype(np.float32)
    expected = adapted.adapted_model.head.pretrained_module.weight.float().detach().numpy()
    np.testing.assert_allclose(merged, expected, rtol=2**-7, atol=1e-6)  # at most one bf16 rounding apart


def test_houlsby_adapter_is_refused_and_nothing_is_written(tmp_path):
    base = torch_models.TokenNet()
    converters.save_torch_layout(base, tmp_path / "base.safetensors")
    model = torch_impl.AdaptedModel(
        base, torch_impl.HoulsbyAdapterLinear, target_layers="fc1", adapter_kwargs={"projection_size": 2}
    )
    model.saver(str(tmp_path / "houlsby.safetensors"))
    with pytest.raises(MergeError, match="Houlsby adapters, which cannot be merged"):
        converters.merge_adapter_file(
            tmp_path / "base.safetensors", tmp_path / "houlsby.safetensors", tmp_path / "m.safetensors"
        )
    assert not (tmp_path / "m.safetensors").exists()


def test_adapter_without_metadata_needs_rank_and_alpha(tmp_path):
    base = randomize_torch(torch_models.Conv1dNormNet()).eval()
    converters.save_torch_layout(base, tmp_path / "base.safetensors")
    adapted = _trained_torch(base)
    adapted.saver(str(tmp_path / "adapter.ckpt"))  # SpeechBrain's pickled format: no metadata
    with pytest.raises(MergeError, match="records no adapter class and kwargs"):
        converters.merge_adapter_file(
            tmp_path / "base.safetensors", tmp_path / "adapter.ckpt", tmp_path / "m.safetensors"
        )
    converters.merge_adapter_file(
        tmp_path / "base.safetensors",
        tmp_path / "adapter.ckpt",
        tmp_path / "m.safetensors",
        adapter_kwargs=KWARGS,
    )
    merged = torch_models.Conv1dNormNet().eval()
    converters.flax_to_torch(tmp_path / "m.safetensors", merged)
    x, _ = conv_batch()
    np.testing.assert_allclose(torch_output(merged, x), torch_output(adapted, x), rtol=1e-5, atol=1e-5)


def test_base_that_lacks_an_adapted_layer_or_has_other_shapes_is_refused(tmp_path):
    adapted = _trained_torch(randomize_torch(torch_models.Conv1dNormNet()))
    adapted.saver(str(tmp_path / "adapter.safetensors"))
    converters.save_torch_layout(torch_models.TokenNet(), tmp_path / "wrong.safetensors")
    with pytest.raises(MergeError, match="has no 'conv1.weight'"):
        converters.merge_adapter_file(
            tmp_path / "wrong.safetensors", tmp_path / "adapter.safetensors", tmp_path / "m.safetensors"
        )
    other = torch_models.Conv1dNormNet()
    other.head = torch.nn.Linear(8, 5)
    converters.save_torch_layout(other, tmp_path / "other.safetensors")
    with pytest.raises(MergeError, match=r"update has shape \(4, 8\) but 'head.weight'"):
        converters.merge_adapter_file(
            tmp_path / "other.safetensors", tmp_path / "adapter.safetensors", tmp_path / "m.safetensors"
        )
    assert not (tmp_path / "m.safetensors").exists()
