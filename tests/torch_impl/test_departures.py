"""Each deliberate departure from SpeechBrain 1.1.x (SPEC: "Where we depart ... on purpose").

Every test shows what SpeechBrain actually does (its bug, asserted, so a SpeechBrain fix would
be noticed) and what we do instead, and says why in its docstring.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torch_impl
from tests.torch_impl.twins import randomize_trainable, speechbrain_adapters, trainable_names
from tests.zoo import torch_models
from torch_impl import AdaptedModel, AdapterInsertionError, HoulsbyAdapterLinear, LoRA
from twinformat.errors import NoMatchError


@pytest.fixture(scope="module")
def sb():
    return speechbrain_adapters()


def _adapted_names(model: nn.Module, adapter_cls: type) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, adapter_cls)]


def test_single_string_pattern_is_one_pattern_not_its_characters(sb):
    """SpeechBrain iterates a string's characters: ``"layer1"`` adapts a layer named ``"1"``
    (and nothing called layer1). A user writing one pattern means that pattern."""
    theirs = sb.AdaptedModel(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), sb.LoRA, target_layers="layer1")
    assert _adapted_names(theirs, sb.LoRA) == ["adapted_model.1"]
    theirs = sb.AdaptedModel(torch_models.SeedMLP(), sb.LoRA, target_layers="layer1")
    assert _adapted_names(theirs, sb.LoRA) == []

    ours = AdaptedModel(torch_models.SeedMLP(), LoRA, target_layers="layer1", unfrozen_layers="layer2")
    assert _adapted_names(ours, LoRA) == ["adapted_model.layer1"]
    assert ours.adapted_model.layer2.weight.requires_grad
    with pytest.raises(NoMatchError, match="'layer1'"):
        AdaptedModel(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), LoRA, target_layers="layer1")


@pytest.mark.parametrize("argument", ["target_layers", "unfrozen_layers"])
def test_pattern_matching_no_layer_raises_with_the_pattern_and_real_names(sb, argument):
    """SpeechBrain silently trains a model with no adapters (or nothing unfrozen) after a typo:
    PEFT users' most reported pain. We name the pattern and show real layer names."""
    theirs = sb.AdaptedModel(torch_models.SeedMLP(), sb.LoRA, **{argument: ["layr1"]})
    assert _adapted_names(theirs, sb.LoRA) == []

    with pytest.raises(NoMatchError) as info:
        AdaptedModel(torch_models.SeedMLP(), LoRA, **{argument: ["layer1", "layr1"]})
    message = str(info.value)
    assert argument in message and "'layr1'" in message
    assert "'layer1'" in message and "'layer2'" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "flag, factory, kind",
    [
        ("all_linear", lambda: nn.Sequential(nn.Conv1d(2, 2, 1)), "nn.Linear"),
        ("all_conv", torch_models.SeedMLP, "Conv"),
    ],
)
def test_all_linear_or_all_conv_without_such_layers_raises(sb, flag, factory, kind):
    """SpeechBrain adapts nothing and says nothing; ``all_linear=True`` on a conv-only model is a
    mistake the user wants to hear about."""
    theirs = sb.AdaptedModel(factory(), sb.LoRA, **{flag: True})
    assert _adapted_names(theirs, sb.LoRA) == []
    with pytest.raises(NoMatchError, match=f"{flag}=True.*{kind}"):
        AdaptedModel(factory(), LoRA, **{flag: True})


def test_houlsby_really_freezes_the_wrapped_linear(sb):
    """SpeechBrain sets a stray ``requires_grad`` attribute on the Linear module, leaving its
    parameters trainable: used outside AdaptedModel, the 'frozen' layer trains."""
    theirs = sb.HoulsbyAdapterLinear(nn.Linear(4, 4), projection_size=2)
    assert theirs.pretrained_linear.weight.requires_grad and theirs.pretrained_linear.bias.requires_grad

    ours = HoulsbyAdapterLinear(nn.Linear(4, 4), projection_size=2)
    assert not ours.pretrained_linear.weight.requires_grad
    assert not ours.pretrained_linear.bias.requires_grad
    ours(torch.randn(3, 4)).sum().backward()
    assert ours.pretrained_linear.weight.grad is None
    assert ours.adapter_up_proj.weight.grad is not None


def test_second_insert_adapters_raises_instead_of_wrapping_adapters_in_adapters(sb):
    """SpeechBrain's docstring says 'call exactly once', and a second call hands each LoRA to
    ``LoRA()`` again: it dies deep inside with an AttributeError (an adapter class that accepts
    any module would silently nest adapters). Ours refuses clearly and changes nothing."""
    theirs = sb.AdaptedModel(
        torch_models.SeedMLP(), sb.LoRA, target_layers=["layer1"], manual_adapter_insertion=True
    )
    theirs.insert_adapters()
    with pytest.raises(AttributeError, match="'LoRA' object has no attribute 'weight'"):
        theirs.insert_adapters()

    ours = AdaptedModel(torch_models.SeedMLP(), LoRA, target_layers=["layer1"], manual_adapter_insertion=True)
    ours.insert_adapters()
    before = repr(ours), trainable_names(ours)
    with pytest.raises(AdapterInsertionError, match="already") as info:
        ours.insert_adapters()
    assert "layer1" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert (repr(ours), trainable_names(ours)) == before
    with pytest.raises(AdapterInsertionError):
        AdaptedModel(torch_models.SeedMLP(), LoRA, target_layers=["layer1"]).insert_adapters()


def test_getattr_does_not_shadow_the_wrappers_own_submodules(sb):
    """SpeechBrain's ``__getattr__`` asks the wrapped model first, so an AdaptedModel around a
    model that has an ``adapted_model`` attribute (e.g. another AdaptedModel) finds the wrong
    module and cannot even be built. Ours resolves the wrapper's own attributes first."""
    inner_theirs = sb.AdaptedModel(torch_models.SeedMLP(), sb.LoRA, target_layers=["layer1"])
    with pytest.raises(AttributeError):
        sb.AdaptedModel(inner_theirs, sb.LoRA, target_layers=["adapted_model.layer2"])

    inner = AdaptedModel(torch_models.SeedMLP(), LoRA, target_layers=["layer1"])
    outer = AdaptedModel(inner, LoRA, target_layers=["adapted_model.layer2"])
    assert outer.adapted_model is inner
    assert isinstance(inner.adapted_model.layer2, LoRA)
    assert outer.replace_layers == ["adapted_model.layer2"]


def test_a_root_that_is_itself_a_linear_can_be_adapted(sb):
    """SpeechBrain's ``replace_module`` sets a child named ``""`` on the Linear, inside the LoRA
    that wraps that Linear: a cycle. The adapter never runs, and ``state_dict()`` (so its saver)
    and ``repr`` recurse forever. Ours makes the LoRA the adapted model."""
    theirs = sb.AdaptedModel(nn.Linear(4, 3), sb.LoRA, all_linear=True)
    assert trainable_names(theirs) == [
        "adapted_model..adapter_down_proj.weight",
        "adapted_model..adapter_up_proj.weight",
    ]
    with pytest.raises(RecursionError):
        theirs.state_dict()

    base = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    expected = base(x)
    ours = AdaptedModel(base, LoRA, all_linear=True, adapter_kwargs={"rank": 2})
    assert isinstance(ours.adapted_model, LoRA) and ours.adapted_model.pretrained_module is base
    assert ours.replace_layers == [""]
    torch.testing.assert_close(ours(x), expected)
    assert trainable_names(ours) == [
        "adapted_model.adapter_down_proj.weight",
        "adapted_model.adapter_up_proj.weight",
    ]
    assert isinstance(ours.pretrained_module, nn.Linear)  # __getattr__ reaches the LoRA's attributes


def test_adapters_follow_a_bfloat16_model(sb):
    """SpeechBrain creates float32 adapters on a bf16 model, so its forward fails with a dtype
    mismatch; ours creates them in the wrapped layer's dtype."""
    theirs = sb.AdaptedModel(
        torch_models.SeedMLP().to(torch.bfloat16), sb.LoRA, all_linear=True, adapter_kwargs={"rank": 2}
    )
    assert theirs.adapted_model.layer1.adapter_down_proj.weight.dtype == torch.float32
    x = torch_models.seed_mlp_input().to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):
        theirs(x)

    for adapter, kwargs in [(LoRA, {"rank": 2}), (HoulsbyAdapterLinear, {"projection_size": 2})]:
        ours = AdaptedModel(
            torch_models.SeedMLP().to(torch.bfloat16), adapter, all_linear=True, adapter_kwargs=kwargs
        )
        assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
        out = ours(x)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert all(p.grad.dtype == torch.bfloat16 for p in ours.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "adapter, kwargs", [("LoRA", {"rank": 2}), ("HoulsbyAdapterLinear", {"projection_size": 2})]
)
def test_adapted_transformer_encoder_layers_work_in_eval_mode(sb, adapter, kwargs):
    """PyTorch's TransformerEncoderLayer eval fast path reads ``linear1.weight`` directly:
    SpeechBrain's adapted layers crash there (AttributeError), or would silently skip the adapter.
    Ours switches the fast path off above adapted layers, so eval equals train mode (dropout 0)."""
    torch.manual_seed(0)
    theirs = sb.AdaptedModel(torch_models.transformer(), getattr(sb, adapter), target_layers=["layers.*.linear1"],
                             adapter_kwargs=kwargs)  # fmt: skip
    theirs.eval()
    with pytest.raises(AttributeError, match="weight"), torch.no_grad():
        theirs(torch_models.transformer_input())

    torch.manual_seed(0)
    ours = AdaptedModel(torch_models.transformer(), getattr(torch_impl, adapter), target_layers=["layers.*.linear1"],
                        adapter_kwargs=kwargs)  # fmt: skip
    randomize_trainable(ours)
    x = torch_models.transformer_input()
    train_out = ours.train()(x)
    ours.eval()
    with torch.no_grad():
        eval_out = ours(x)
    torch.testing.assert_close(eval_out, train_out.detach(), rtol=1e-5, atol=1e-5)
    # The adapter really acts in eval mode: the base model's output differs.
    base_out = _base_transformer()(x)
    assert not torch.allclose(eval_out, base_out, atol=1e-3)


def _base_transformer() -> nn.Module:
    torch.manual_seed(0)
    return torch_models.transformer().eval()


def test_adapted_transformer_eval_with_padding_mask_matches_train_mode_on_real_tokens():
    """With a key-padding mask the encoder's eval path would pack a nested tensor and read
    ``layers[0].linear1.weight``; with it off, real (unpadded) positions equal train mode."""
    torch.manual_seed(0)
    ours = AdaptedModel(torch_models.transformer(), LoRA, target_layers=["layers.1.linear2"])
    with torch.no_grad():
        ours.adapted_model.layers[1].linear2.adapter_up_proj.weight.normal_()
    x = torch_models.transformer_input()
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    train_out = ours.train()(x, src_key_padding_mask=mask)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eval_out = ours.eval()(x, src_key_padding_mask=mask)
    real = ~mask
    torch.testing.assert_close(eval_out[real], train_out.detach()[real], rtol=1e-5, atol=1e-5)
    assert ours.adapted_model.use_nested_tensor is False
    assert ours.adapted_model.layers[1].activation_relu_or_gelu == 0
    assert ours.adapted_model.layers[0].activation_relu_or_gelu == 1  # untouched: no adapter in it
