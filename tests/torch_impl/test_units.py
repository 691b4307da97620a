"""Unit tests per public class and function of torch_impl (SpeechBrain 1.1.x behaviour)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tests.zoo import torch_models
from torch_impl import (
    AdaptedModel,
    HoulsbyAdapterLinear,
    LoRA,
    Swish,
    is_layer_adaptable,
    replace_module,
)

CONVS = [
    (nn.Conv1d, (2, 3, 11)),
    (nn.Conv2d, (2, 3, 9, 8)),
    (nn.Conv3d, (2, 3, 6, 5, 7)),
]


# --- Swish -------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_swish_is_silu_of_beta_times_x(beta):
    x = torch.linspace(-4, 4, 17)
    torch.testing.assert_close(Swish(beta)(x), x * beta * torch.sigmoid(beta * x))


def test_swish_has_speechbrains_attributes_and_no_state():
    act = Swish(beta=3.0)
    assert act.beta == 3.0
    assert isinstance(act.silu, nn.SiLU)
    assert act.state_dict() == {}
    assert repr(Swish()) == "Swish(\n  (silu): SiLU()\n)"


# --- LoRA --------------------------------------------------------------------------------------


def test_lora_linear_attributes_in_speechbrains_order_and_state_dict_keys():
    lora = LoRA(nn.Linear(5, 7), rank=3)
    assert [name for name, _ in lora.named_children()] == [
        "pretrained_module",
        "adapter_down_proj",
        "adapter_up_proj",
    ]
    assert list(lora.state_dict()) == [
        "pretrained_module.weight",
        "pretrained_module.bias",
        "adapter_down_proj.weight",
        "adapter_up_proj.weight",
    ]
    assert lora.adapter_down_proj.weight.shape == (3, 5)
    assert lora.adapter_up_proj.weight.shape == (7, 3)
    assert lora.adapter_down_proj.bias is None and lora.adapter_up_proj.bias is None


def test_lora_linear_down_projection_has_pytorch_default_init_and_up_projection_is_zero():
    torch.manual_seed(11)
    base = nn.Linear(6, 4)
    state = torch.random.get_rng_state()
    lora = LoRA(base, rank=2)
    torch.random.set_rng_state(state)
    expected_down = nn.Linear(6, 2, bias=False).weight
    torch.testing.assert_close(lora.adapter_down_proj.weight, expected_down, rtol=0, atol=0)
    assert torch.count_nonzero(lora.adapter_up_proj.weight) == 0
    assert lora.adapter_down_proj.weight.abs().max() <= 1 / math.sqrt(6)


@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (4, 1.0), (4, 8.0), (16, 0.5)])
def test_lora_scaling_is_alpha_over_rank(rank, alpha):
    assert LoRA(nn.Linear(3, 3), rank=rank, alpha=alpha).scaling == alpha / rank


def test_lora_default_rank_and_alpha_are_speechbrains():
    lora = LoRA(nn.Linear(20, 20))
    assert lora.adapter_down_proj.out_features == 16
    assert lora.scaling == 1.0 / 16


def test_fresh_lora_changes_nothing_linear():
    base = nn.Linear(5, 4)
    x = torch.randn(3, 2, 5)
    expected = base(x)
    assert torch.equal(LoRA(base, rank=2, alpha=3.0)(x), expected)


def test_lora_output_is_pretrained_plus_scaled_low_rank_update_with_gradients():
    lora = LoRA(nn.Linear(5, 4), rank=3, alpha=6.0)
    nn.init.normal_(lora.adapter_up_proj.weight)
    x = torch.randn(2, 7, 5, requires_grad=True)
    out = lora(x)
    ref_down = lora.adapter_down_proj.weight.detach().clone().requires_grad_()
    ref_up = lora.adapter_up_proj.weight.detach().clone().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    ref = lora.pretrained_module(ref_x) + (ref_x @ ref_down.T @ ref_up.T) * 2.0
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(lora.adapter_down_proj.weight.grad, ref_down.grad)
    torch.testing.assert_close(lora.adapter_up_proj.weight.grad, ref_up.grad)
    assert lora.pretrained_module.weight.grad is None


def test_lora_freezes_the_wrapped_layer_and_trains_only_its_projections():
    lora = LoRA(nn.Linear(4, 4), rank=2)
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable == ["adapter_down_proj.weight", "adapter_up_proj.weight"]


@pytest.mark.parametrize("conv_cls, shape", CONVS)
def test_lora_conv_copies_geometry_into_down_and_uses_pointwise_up(conv_cls, shape):
    dims = len(shape) - 2
    base = conv_cls(3, 5, kernel_size=3, stride=2, padding=1, dilation=1, padding_mode="replicate")
    lora = LoRA(base, rank=2)
    down, up = lora.adapter_down_proj, lora.adapter_up_proj
    assert type(down) is conv_cls and type(up) is conv_cls
    assert (down.in_channels, down.out_channels) == (3, 2)
    assert (up.in_channels, up.out_channels) == (2, 5)
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(down, attr) == getattr(base, attr), attr
    assert up.kernel_size == (1,) * dims and up.stride == (1,) * dims and up.padding == (0,) * dims
    assert down.bias is None and up.bias is None
    assert torch.count_nonzero(up.weight) == 0
    x = torch.randn(shape)
    assert torch.equal(lora(x), base(x))
    nn.init.normal_(up.weight)
    torch.testing.assert_close(lora(x), base(x) + up(down(x)) * lora.scaling)


@pytest.mark.parametrize(
    "dtype, device",
    [(torch.bfloat16, "cpu"), (torch.float64, "cpu"), (torch.float16, "cpu"), (torch.float32, "meta")],
)
def test_lora_and_houlsby_adapters_follow_the_wrapped_layers_dtype_and_device(dtype, device):
    for base in (nn.Linear(4, 6, dtype=dtype, device=device), nn.Conv1d(4, 6, 3, dtype=dtype, device=device)):
        lora = LoRA(base, rank=2)
        for p in lora.parameters():
            assert (p.dtype, p.device.type) == (dtype, device)
    houlsby = HoulsbyAdapterLinear(nn.Linear(4, 6, dtype=dtype, device=device), 3)
    for p in houlsby.parameters():
        assert (p.dtype, p.device.type) == (dtype, device)


# --- HoulsbyAdapterLinear ----------------------------------------------------------------------


def test_houlsby_attributes_in_speechbrains_order_and_state_dict_keys():
    adapter = HoulsbyAdapterLinear(nn.Linear(5, 7), projection_size=3)
    assert [n for n, _ in adapter.named_children()] == [
        "pretrained_linear",
        "adapter_down_proj",
        "adapter_up_proj",
        "activation",
    ]
    assert list(adapter.state_dict()) == [
        "pretrained_linear.weight",
        "pretrained_linear.bias",
        "adapter_down_proj.weight",
        "adapter_down_proj.bias",
        "adapter_up_proj.weight",
        "adapter_up_proj.bias",
    ]
    # The bottleneck sits on the wrapped layer's *output*: (out -> projection -> out).
    assert adapter.adapter_down_proj.weight.shape == (3, 7)
    assert adapter.adapter_up_proj.weight.shape == (7, 3)
    assert isinstance(adapter.activation, Swish)


def test_houlsby_zero_biases_and_default_init_weights_so_a_fresh_one_is_not_the_identity():
    """SpeechBrain zeroes only the biases: unlike LoRA, a fresh Houlsby adapter moves the output."""
    torch.manual_seed(5)
    base = nn.Linear(4, 6)
    state = torch.random.get_rng_state()
    adapter = HoulsbyAdapterLinear(base, projection_size=2)
    torch.random.set_rng_state(state)
    expected_down = nn.Linear(6, 2)
    expected_up = nn.Linear(2, 6)
    torch.testing.assert_close(adapter.adapter_down_proj.weight, expected_down.weight, rtol=0, atol=0)
    torch.testing.assert_close(adapter.adapter_up_proj.weight, expected_up.weight, rtol=0, atol=0)
    assert torch.count_nonzero(adapter.adapter_down_proj.bias) == 0
    assert torch.count_nonzero(adapter.adapter_up_proj.bias) == 0
    x = torch.randn(3, 4)
    assert not torch.allclose(adapter(x), base(x))


def test_houlsby_output_is_bottleneck_of_the_pretrained_output_plus_residual():
    adapter = HoulsbyAdapterLinear(nn.Linear(4, 6), projection_size=3, activation=nn.Tanh)
    nn.init.normal_(adapter.adapter_down_proj.bias)
    x = torch.randn(2, 5, 4)
    h = adapter.pretrained_linear(x)
    expected = adapter.adapter_up_proj(torch.tanh(adapter.adapter_down_proj(h))) + h
    torch.testing.assert_close(adapter(x), expected)
    assert isinstance(adapter.activation, nn.Tanh)


def test_houlsby_without_bias_has_no_bias_parameters():
    adapter = HoulsbyAdapterLinear(nn.Linear(4, 4), projection_size=2, bias=False)
    assert adapter.adapter_down_proj.bias is None and adapter.adapter_up_proj.bias is None


def test_houlsby_freezes_the_wrapped_linear():
    adapter = HoulsbyAdapterLinear(nn.Linear(4, 4), projection_size=2)
    assert [n for n, p in adapter.named_parameters() if p.requires_grad] == [
        "adapter_down_proj.weight",
        "adapter_down_proj.bias",
        "adapter_up_proj.weight",
        "adapter_up_proj.bias",
    ]


# --- is_layer_adaptable ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, all_linear, all_conv, expected",
    [
        (nn.Linear(2, 2), True, False, True),
        (nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2), True, False, True),
        (nn.Linear(2, 2), False, True, False),
        (nn.Conv1d(2, 2, 1), False, True, True),
        (nn.Conv2d(2, 2, 1), False, True, True),
        (nn.Conv3d(2, 2, 1), False, True, True),
        (nn.Conv2d(2, 2, 1), True, False, False),
        (nn.ConvTranspose1d(2, 2, 1), False, True, False),
        (nn.Embedding(3, 2), True, True, False),
    ],
)
def test_is_layer_adaptable_by_type(module, all_linear, all_conv, expected):
    assert is_layer_adaptable("some.layer", module, all_linear, all_conv, []) is expected


@pytest.mark.parametrize(
    "name, patterns, expected",
    [
        ("layer1", ["layer1"], True),
        ("layer1", "layer1", True),  # a single string is one pattern
        ("layer1", ["layer[13]"], True),
        ("layer2", ["layer[13]"], False),
        ("encoder.layers.3.ffn", ["encoder.layers.*.ffn"], True),
        ("encoder.layers.3.ffn", ["encoder.layers.?.ffn"], True),
        ("encoder.layers.3.ffn", ["encoder.layers.[!3].ffn"], False),
        ("Layer1", ["layer1"], False),  # case-sensitive everywhere
        ("1", "layer1", False),  # SpeechBrain would match "1" (a character of the string)
        ("", ["*"], False),  # the root is never a target by name
    ],
)
def test_is_layer_adaptable_by_glob_pattern(name, patterns, expected):
    assert is_layer_adaptable(name, nn.ReLU(), False, False, patterns) is expected


# --- replace_module ----------------------------------------------------------------------------


def test_replace_module_top_level_nested_list_and_dict():
    model = torch_models.NestedModel()
    marker = [nn.Identity() for _ in range(4)]
    replace_module(model, "head", marker[0])
    replace_module(model, "encoder.out", marker[1])
    replace_module(model, "encoder.blocks.1", marker[2])
    replace_module(model, "encoder.blocks.0.ffn.up", marker[3])
    assert model.head is marker[0]
    assert model.encoder.out is marker[1]
    assert model.encoder.blocks[1] is marker[2]
    assert model.encoder.blocks[0].ffn["up"] is marker[3]


def test_replace_module_refuses_the_empty_name_of_the_root():
    with pytest.raises(ValueError, match="root"):
        replace_module(nn.Sequential(nn.Linear(2, 2)), "", nn.Identity())


# --- AdaptedModel ------------------------------------------------------------------------------


def test_seed_example_prints_byte_for_byte_as_in_the_seed():
    model = AdaptedModel(
        model_to_adapt=torch_models.seed_model(),
        adapter_class=LoRA,
        target_layers=["layer[13]"],
        unfrozen_layers=["layer2"],
        adapter_kwargs={"rank": 2},
    )
    assert repr(model) == torch_models.SEED_REPR
    assert str(model) == torch_models.SEED_REPR


def test_adapted_model_wraps_targets_unfreezes_others_and_freezes_the_rest():
    model = AdaptedModel(
        torch_models.seed_model(), LoRA, target_layers=["layer[13]"], unfrozen_layers=["layer2"]
    )
    assert model.replace_layers == ["layer1", "layer3"]
    assert isinstance(model.adapted_model.layer1, LoRA) and isinstance(model.adapted_model.layer3, LoRA)
    assert type(model.adapted_model.layer2) is nn.Linear
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "adapted_model.layer1.adapter_down_proj.weight",
        "adapted_model.layer1.adapter_up_proj.weight",
        "adapted_model.layer2.weight",
        "adapted_model.layer2.bias",
        "adapted_model.layer3.adapter_down_proj.weight",
        "adapted_model.layer3.adapter_up_proj.weight",
    ]


def test_adapted_model_keeps_the_pretrained_weights_and_output():
    base = torch_models.SeedMLP()
    x = torch_models.seed_mlp_input()
    expected = base(x)
    weights = copy.deepcopy(base.state_dict())
    model = AdaptedModel(base, LoRA, all_linear=True, adapter_kwargs={"rank": 2})
    torch.testing.assert_close(model(x), expected)
    for key, value in weights.items():
        layer, param = key.rsplit(".", 1)
        assert torch.equal(model.state_dict()[f"adapted_model.{layer}.pretrained_module.{param}"], value)


def test_adapted_model_passes_args_and_kwargs_through():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, *, shift=0.0):
            return self.fc(x) + shift

    model = AdaptedModel(TwoInputs(), LoRA, target_layers=["fc"])
    x = torch.randn(2, 3)
    torch.testing.assert_close(model(x, shift=5.0), model.adapted_model(x) + 5.0)


def test_adapted_model_gives_adapter_kwargs_to_every_adapter():
    model = AdaptedModel(
        torch_models.SeedMLP(),
        HoulsbyAdapterLinear,
        all_linear=True,
        adapter_kwargs={"projection_size": 3, "bias": False},
    )
    for name in ("layer1", "layer2", "layer3"):
        adapter = getattr(model.adapted_model, name)
        assert adapter.adapter_down_proj.out_features == 3 and adapter.adapter_down_proj.bias is None


def test_adapted_model_prefers_adapting_over_unfreezing_a_layer_both_select():
    model = AdaptedModel(torch_models.SeedMLP(), LoRA, target_layers=["layer1"], unfrozen_layers=["layer*"])
    assert isinstance(model.adapted_model.layer1, LoRA)
    assert not model.adapted_model.layer1.pretrained_module.weight.requires_grad
    assert model.adapted_model.layer2.weight.requires_grad
    assert model.unfrozen_module_names == ["layer2", "layer3"]


def test_adapted_model_getattr_falls_back_to_the_wrapped_model():
    base = torch_models.NestedModel()
    base.custom_attribute = "kept"
    model = AdaptedModel(base, LoRA, target_layers=["head"])
    assert model.custom_attribute == "kept"
    assert model.encoder is base.encoder
    assert model.scale is base.scale
    assert isinstance(model.head, LoRA)
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = model.no_such_thing


def test_adapted_model_deepcopies_and_the_copy_is_independent():
    model = AdaptedModel(torch_models.SeedMLP(), LoRA, target_layers=["layer1"], adapter_kwargs={"rank": 2})
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.adapted_model.layer1.adapter_up_proj.weight.fill_(1.0)
    assert torch.count_nonzero(model.adapted_model.layer1.adapter_up_proj.weight) == 0
    assert clone.replace_layers == model.replace_layers


def test_adapted_model_state_dict_keys_are_prefixed_with_adapted_model():
    model = AdaptedModel(torch_models.SeedMLP(), LoRA, target_layers=["layer3"])
    assert all(key.startswith("adapted_model.") for key in model.state_dict())
    assert "adapted_model.layer3.pretrained_module.weight" in model.state_dict()


def test_manual_insertion_waits_for_insert_adapters():
    model = AdaptedModel(
        torch_models.SeedMLP(), LoRA, target_layers=["layer1"], manual_adapter_insertion=True
    )
    assert type(model.adapted_model.layer1) is nn.Linear
    assert not any(p.requires_grad for p in model.parameters())
    model.insert_adapters()
    assert isinstance(model.adapted_model.layer1, LoRA)
