"""merge_lora / unmerge_lora on whole models (per-geometry properties live in test_properties)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.torch_impl.twins import randomize_trainable
from tests.zoo import torch_models
from torch_impl import (
    AdaptedModel,
    AdapterInsertionError,
    HoulsbyAdapterLinear,
    LoRA,
    MergeError,
    merge_lora,
    unmerge_lora,
)


def _adapted_conv_net() -> AdaptedModel:
    torch.manual_seed(0)
    model = AdaptedModel(
        torch_models.MixedConvNet(), LoRA, all_conv=True, all_linear=True, adapter_kwargs={"rank": 2}
    )
    randomize_trainable(model)
    return model.eval()


def test_merged_model_computes_the_same_outputs_without_running_the_adapters():
    model = _adapted_conv_net()
    x = torch_models.mixed_conv_net_input()
    with torch.no_grad():
        before = model(x)
    calls = []
    for module in model.modules():
        if isinstance(module, LoRA):
            module.adapter_down_proj.register_forward_hook(lambda *args: calls.append(1))
    assert merge_lora(model) == 5
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert calls == []
    assert unmerge_lora(model) == 5
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert len(calls) == 5


def test_merge_keeps_state_dict_keys_and_the_adapters_saved_by_saver(tmp_path):
    model = _adapted_conv_net()
    keys = list(model.state_dict())
    adapters = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    merge_lora(model)
    assert list(model.state_dict()) == keys
    model.saver(tmp_path / "merged.ckpt")
    saved = torch.load(tmp_path / "merged.ckpt", weights_only=True)
    assert list(saved) == list(adapters)
    for key, value in adapters.items():
        assert torch.equal(saved[key], value)


def test_merge_lora_refuses_a_model_with_houlsby_naming_the_layer_and_changes_nothing():
    model = nn.Sequential(
        LoRA(nn.Linear(4, 4), rank=2), nn.Sequential(HoulsbyAdapterLinear(nn.Linear(4, 4), 2))
    )
    randomize_trainable(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match=r"'1\.0'.*HoulsbyAdapterLinear") as info:
        merge_lora(model)
    assert isinstance(info.value, ValueError)
    assert not model[0].merged
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_merge_lora_refuses_a_houlsby_adapted_model():
    model = AdaptedModel(
        torch_models.SeedMLP(), HoulsbyAdapterLinear, all_linear=True, adapter_kwargs={"projection_size": 2}
    )
    with pytest.raises(MergeError, match="adapted_model.layer1"):
        merge_lora(model)


def test_merging_a_layer_twice_or_unmerging_an_unmerged_layer_raises():
    lora = LoRA(nn.Linear(3, 3), rank=1)
    with pytest.raises(AdapterInsertionError, match="not merged"):
        lora.unmerge()
    lora.merge()
    with pytest.raises(AdapterInsertionError, match="already merged"):
        lora.merge()


def test_merge_on_a_bfloat16_model_stays_bfloat16_and_close():
    model = AdaptedModel(
        torch_models.SeedMLP().to(torch.bfloat16), LoRA, all_linear=True, adapter_kwargs={"rank": 2}
    )
    randomize_trainable(model)
    x = torch_models.seed_mlp_input().to(torch.bfloat16)
    with torch.no_grad():
        before = model(x).float()
        merge_lora(model)
        after = model(x)
    assert after.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(after.float(), before, rtol=2e-2, atol=5e-2)


def test_delta_weight_is_scaling_times_up_at_down_in_the_weight_layout():
    conv = LoRA(nn.Conv2d(3, 5, (3, 2)), rank=2, alpha=3.0)
    randomize_trainable(conv)
    up = conv.adapter_up_proj.weight[:, :, 0, 0]  # (out, rank)
    down = conv.adapter_down_proj.weight  # (rank, in, kh, kw)
    expected = torch.einsum("or,rikl->oikl", up, down) * 1.5
    torch.testing.assert_close(conv.delta_weight(), expected)
    assert conv.delta_weight().shape == conv.pretrained_module.weight.shape
