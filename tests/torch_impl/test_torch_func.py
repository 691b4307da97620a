"""``torch.func`` and forward-mode AD through ``LoRA`` (issue 14, item 8).

The fused path is a classic ``autograd.Function``, which ``torch.func`` transforms refuse
("must override the setup_context staticmethod"); ``lora_linear`` sees an active transform and
takes the plain formula by itself. Every result here is compared with SpeechBrain's formula
evaluated through the layer's own submodules, and the fused path is checked to be back once
the transform is over. ``fused.set_enabled`` / ``fused.disabled`` / ``TORCH_IMPL_FUSED=0`` select
the plain path everywhere.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacrev, jvp, vmap

from torch_impl import AdaptedModel, LoRA, fused

FUSED_NODE = "_LoRALinearFunctionBackward"


def make_lora(in_features: int = 6, out_features: int = 5, rank: int = 3) -> LoRA:
    torch.manual_seed(0)
    layer = LoRA(nn.Linear(in_features, out_features), rank, alpha=2.0)
    with torch.no_grad():
        layer.adapter_up_proj.weight.normal_()
    return layer


def plain(layer: LoRA, x: torch.Tensor) -> torch.Tensor:
    return layer.pretrained_module(x) + layer.adapter_up_proj(layer.adapter_down_proj(x)) * layer.scaling


def test_vmap_of_the_issue_repro_matches_plain_formula():
    layer = make_lora()
    x = torch.randn(3, 4, 6)
    y = vmap(layer)(x)
    torch.testing.assert_close(y, plain(layer, x), atol=1e-5, rtol=1e-5)
    assert layer(x.requires_grad_()).grad_fn.name() == FUSED_NODE  # fused again outside vmap


def test_grad_of_a_functional_call_over_the_adapter_factors():
    layer = make_lora()
    x = torch.randn(4, 6)
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}

    def loss(p):
        return functional_call(layer, p, (x,)).square().sum()

    grads = grad(loss)(params)
    plain(layer, x).square().sum().backward()
    assert set(grads) == {"adapter_down_proj.weight", "adapter_up_proj.weight"}
    for name, value in grads.items():
        torch.testing.assert_close(value, layer.get_parameter(name).grad, atol=1e-5, rtol=1e-5)


def test_functional_call_without_a_transform_keeps_the_fused_path_and_its_numbers():
    layer = make_lora()
    x = torch.randn(4, 6)
    down = torch.randn(3, 6, requires_grad=True)
    y = functional_call(layer, {"adapter_down_proj.weight": down}, (x,))
    assert y.grad_fn.name() == FUSED_NODE
    expected = layer.pretrained_module(x) + (x @ down.t()) @ layer.adapter_up_proj.weight.t() * layer.scaling
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_jvp_and_forward_mode_ad_match_plain_formula():
    layer = make_lora()
    x, tangent = torch.randn(4, 6), torch.randn(4, 6)
    y, y_dot = jvp(layer, (x,), (tangent,))
    y_ref, y_dot_ref = jvp(lambda t: plain(layer, t), (x,), (tangent,))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_dot, y_dot_ref, atol=1e-5, rtol=1e-5)
    with forward_ad.dual_level():
        out = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, tangent)))
    torch.testing.assert_close(out.tangent, y_dot_ref, atol=1e-5, rtol=1e-5)


def test_jacrev_and_per_sample_gradients_under_vmap():
    layer = make_lora()
    x = torch.randn(2, 6)
    jacobian = jacrev(layer)(x)
    jacobian_ref = jacrev(lambda t: plain(layer, t))(x)
    torch.testing.assert_close(jacobian, jacobian_ref, atol=1e-5, rtol=1e-5)

    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    per_sample = vmap(grad(lambda p, xi: functional_call(layer, p, (xi,)).sum()), in_dims=(None, 0))(
        params, x
    )
    for i in range(2):
        layer.zero_grad()
        plain(layer, x[i]).sum().backward()
        for name, value in per_sample.items():
            torch.testing.assert_close(value[i], layer.get_parameter(name).grad, atol=1e-5, rtol=1e-5)


def test_grad_through_an_adapted_model():
    torch.manual_seed(0)
    model = AdaptedModel(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)), LoRA, all_linear=True)
    x = torch.randn(5, 6)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    grads = grad(lambda p: functional_call(model, p, (x,)).square().mean())(params)
    with fused.disabled():
        model(x).square().mean().backward()
    for name, value in grads.items():
        torch.testing.assert_close(value, model.get_parameter(name).grad, atol=1e-6, rtol=1e-5)


def test_switch_selects_the_plain_path_and_restores_it():
    layer = make_lora()
    x = torch.randn(4, 6, requires_grad=True)
    with fused.disabled():
        assert not fused.is_enabled()
        assert layer(x).grad_fn.name() != FUSED_NODE
    assert fused.is_enabled() and layer(x).grad_fn.name() == FUSED_NODE
    previous = fused.set_enabled(False)
    try:
        assert previous is True and layer(x).grad_fn.name() != FUSED_NODE
    finally:
        fused.set_enabled(previous)


@pytest.mark.parametrize("value, enabled", [("0", False), ("off", False), ("1", True)])
def test_environment_variable_sets_the_initial_state(monkeypatch, value, enabled):
    monkeypatch.setenv("TORCH_IMPL_FUSED", value)
    try:
        assert importlib.reload(fused).is_enabled() is enabled
        assert (make_lora()(torch.randn(2, 6, requires_grad=True)).grad_fn.name() == FUSED_NODE) is enabled
    finally:
        monkeypatch.delenv("TORCH_IMPL_FUSED")
        importlib.reload(fused)
    assert fused.is_enabled()
