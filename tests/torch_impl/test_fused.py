"""The fused LoRA Linear path (``torch_impl.fused``) computes SpeechBrain's plain formula.

``LoRA.forward`` takes the fused path by default for a frozen ``nn.Linear``; every test here
compares it with ``pretrained(x) + up(down(x)) * scaling`` evaluated through the same modules,
for outputs and for the gradients of the input and both factors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_impl import AdaptedModel, LoRA, fused, merge_lora, unmerge_lora
from torch_impl.fused import can_fuse_linear, lora_linear

SETTINGS = settings(max_examples=20, deadline=None)
FUSED_NODE = "_LoRALinearFunctionBackward"


def plain_forward(layer: LoRA, x: torch.Tensor) -> torch.Tensor:
    """SpeechBrain 1.1's LoRA.forward, through the layer's own submodules."""
    return layer.pretrained_module(x) + layer.adapter_up_proj(layer.adapter_down_proj(x)) * layer.scaling


def make_lora(in_features: int, out_features: int, rank: int, alpha: float, bias: bool) -> LoRA:
    layer = LoRA(nn.Linear(in_features, out_features, bias=bias), rank=rank, alpha=alpha)
    with torch.no_grad():  # a trained-looking up projection, so the update is not zero
        layer.adapter_up_proj.weight.normal_()
    return layer


def output_and_grads(fn, layer: LoRA, x: torch.Tensor, grad_y: torch.Tensor):
    x = x.detach().requires_grad_(True)
    y = fn(x)
    params = [layer.adapter_down_proj.weight, layer.adapter_up_proj.weight]
    grads = torch.autograd.grad(y, [x, *params], grad_y)
    return y, grads


@st.composite
def linear_cases(draw):
    in_features = draw(st.integers(1, 24))
    out_features = draw(st.integers(1, 24))
    rank = draw(st.integers(1, 8))
    alpha = draw(st.sampled_from([1.0, 0.5, 8.0, 16.0]))
    bias = draw(st.booleans())
    leading = draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))  # 1D, 2D or 3D inputs
    return in_features, out_features, rank, alpha, bias, tuple(leading)


@SETTINGS
@given(linear_cases(), st.integers(0, 2**16))
def test_fused_linear_matches_plain_formula_in_float32(case, seed):
    in_features, out_features, rank, alpha, bias, leading = case
    torch.manual_seed(seed)
    layer = make_lora(in_features, out_features, rank, alpha, bias)
    x = torch.randn(*leading, in_features)
    grad_y = torch.randn(*leading, out_features)

    y, grads = output_and_grads(layer, layer, x, grad_y)
    y_ref, grads_ref = output_and_grads(lambda t: plain_forward(layer, t), layer, x, grad_y)

    assert y.grad_fn.name() == FUSED_NODE
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, atol=1e-4, rtol=1e-4)


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 48), (3, 10, 48)])
def test_fused_linear_under_bf16_autocast_is_as_accurate_as_the_plain_formula(bias, shape):
    torch.manual_seed(0)
    layer = make_lora(48, 40, 8, 16.0, bias)
    x = torch.randn(*shape)
    grad_y = torch.randn(*shape[:-1], 40)
    reference = copy.deepcopy(layer).double()
    y_ref, grads_ref = output_and_grads(reference, reference, x.double(), grad_y.double())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grads = output_and_grads(layer, layer, x, grad_y)
        y_plain, grads_plain = output_and_grads(lambda t: plain_forward(layer, t), layer, x, grad_y)

    assert y.grad_fn.name() == FUSED_NODE
    assert y.dtype == y_plain.dtype == torch.bfloat16
    assert _relative_error(y, y_ref) < 1e-2
    assert _relative_error(y, y_ref) <= 1.5 * _relative_error(y_plain, y_ref) + 1e-3
    for grad, grad_plain, grad_ref in zip(grads, grads_plain, grads_ref, strict=True):
        assert grad.dtype == grad_plain.dtype  # float32 parameters get float32 gradients
        assert _relative_error(grad, grad_ref) < 2e-2
        assert _relative_error(grad, grad_ref) <= 1.5 * _relative_error(grad_plain, grad_ref) + 1e-3


def test_fused_backward_is_exact_in_float64_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    down = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: lora_linear(t[0], weight, bias, t[1], t[2], 0.25), (x, down, up)
    )


def test_fused_path_saves_only_input_low_rank_activation_and_weights():
    torch.manual_seed(0)
    layer = make_lora(32, 24, 4, 1.0, True)
    x = torch.randn(5, 7, 32, requires_grad=True)
    y = layer(x)
    saved = y.grad_fn.saved_tensors
    # x, the frozen weight, both factors and h = x @ down.T; never the (N, out) output.
    assert sorted(t.numel() for t in saved) == sorted([x.numel(), 24 * 32, 4 * 32, 24 * 4, 35 * 4])


def test_frozen_pretrained_weight_gets_no_gradient_and_adapters_do():
    torch.manual_seed(0)
    layer = make_lora(16, 12, 4, 1.0, True)
    layer(torch.randn(3, 16)).square().sum().backward()
    assert layer.pretrained_module.weight.grad is None and layer.pretrained_module.bias.grad is None
    assert layer.adapter_down_proj.weight.grad is not None and layer.adapter_up_proj.weight.grad is not None


def test_input_without_grad_still_trains_both_factors():
    torch.manual_seed(0)
    layer = make_lora(16, 12, 4, 2.0, False)
    x, grad_y = torch.randn(3, 16), torch.randn(3, 12)
    layer(x).backward(grad_y)
    fused = [layer.adapter_down_proj.weight.grad.clone(), layer.adapter_up_proj.weight.grad.clone()]
    layer.zero_grad()
    plain_forward(layer, x).backward(grad_y)
    for grad, grad_ref in zip(
        fused, [layer.adapter_down_proj.weight.grad, layer.adapter_up_proj.weight.grad], strict=True
    ):
        torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)


def test_non_contiguous_input_and_no_grad_mode_match_plain_formula():
    torch.manual_seed(0)
    layer = make_lora(16, 12, 4, 1.0, True)
    x = torch.randn(16, 6, 3).transpose(0, 2)  # (3, 6, 16), not contiguous
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain_forward(layer, x), atol=1e-5, rtol=1e-5)
    grad_y = torch.randn(3, 6, 12)
    (grad_x,) = torch.autograd.grad(layer(x.requires_grad_()), x, grad_y)
    (grad_x_ref,) = torch.autograd.grad(plain_forward(layer, x), x, grad_y)
    torch.testing.assert_close(grad_x, grad_x_ref, atol=1e-5, rtol=1e-5)


def test_unfrozen_pretrained_layer_falls_back_to_plain_formula_and_trains_it():
    torch.manual_seed(0)
    layer = make_lora(16, 12, 4, 1.0, True)
    layer.pretrained_module.requires_grad_(True)
    y = layer(torch.randn(3, 16))
    assert y.grad_fn.name() != FUSED_NODE
    y.sum().backward()
    assert layer.pretrained_module.weight.grad is not None


def test_forward_hook_on_a_wrapped_module_is_honoured():
    torch.manual_seed(0)
    layer = make_lora(16, 12, 4, 1.0, True)
    calls = []
    layer.adapter_down_proj.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    assert not can_fuse_linear(layer.pretrained_module, layer.adapter_down_proj, layer.adapter_up_proj)
    layer(torch.randn(3, 16))
    assert calls == [torch.Size([3, 4])]


def test_conv_lora_keeps_the_plain_path():
    layer = LoRA(nn.Conv1d(3, 5, kernel_size=3), rank=2)
    y = layer(torch.randn(2, 3, 9, requires_grad=True))
    assert y.grad_fn.name() != FUSED_NODE


def test_merged_layer_computes_base_only_and_unmerge_restores_fused_output():
    torch.manual_seed(0)
    model = AdaptedModel(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8)), LoRA, target_layers="*")
    for name, param in model.named_parameters():
        if name.endswith("adapter_up_proj.weight"):
            nn.init.normal_(param)
    x = torch.randn(4, 16)
    before = model(x)
    merge_lora(model)
    lora = model.adapted_model[0]
    assert lora.merged
    torch.testing.assert_close(lora(x), lora.pretrained_module(x), atol=0, rtol=0)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def _tiny_adapted_model() -> AdaptedModel:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    model = AdaptedModel(base, LoRA, target_layers=["0", "2", "4"], adapter_kwargs={"rank": 4})
    for name, param in model.named_parameters():
        if name.endswith("adapter_up_proj.weight"):
            nn.init.normal_(param, std=0.1)
    return model


@pytest.mark.parametrize("autocast", [False, True])
def test_adapted_model_compiles_with_fullgraph_and_matches_eager(autocast):
    model = _tiny_adapted_model()
    x = torch.randn(3, 5, 16)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(x)
        grads = torch.autograd.grad(y.float().square().mean(), trainable)
        return y, grads

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # raises on a graph break
    y, grads = loss_and_grads(compiled)
    y_ref, grads_ref = loss_and_grads(model)
    tolerance = {"atol": 1e-2, "rtol": 1e-2} if autocast else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(y, y_ref, **tolerance)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, **tolerance)


def test_lora_linear_casts_like_autocast_and_leaves_float64_alone():
    x = torch.randn(3, 4, dtype=torch.float64)
    weight, down, up = torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):  # autocast leaves float64 alone: F.linear refuses too
            nn.functional.linear(x, weight)
        with pytest.raises(RuntimeError):
            lora_linear(x, weight, None, down, up, 1.0)
        y = lora_linear(x.float(), weight, None, down, up, 1.0)
    assert y.dtype == torch.bfloat16


# --- opt-in grouping of layers that share an input (fused.group_shared_input) ---------------

GROUP_NODE = "_LoRAGroupFunctionBackward"
QKVO = [
    "*.attention.self.query",
    "*.attention.self.key",
    "*.attention.self.value",
    "*.attention.output.dense",
]


def _adapted_bert(seed: int = 0) -> AdaptedModel:
    from tests.zoo import bert

    torch.manual_seed(seed)
    model = AdaptedModel(
        bert.small_torch_bert().train(), LoRA, target_layers=QKVO, adapter_kwargs={"rank": 4}
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("adapter_up_proj.weight"):
                param.normal_(0.0, 0.1)
    return model


def _train(model: AdaptedModel, ids: torch.Tensor, steps: int, autocast: bool = False) -> list[torch.Tensor]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(*ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both runs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = model(input_ids=ids).last_hidden_state
        loss = (hidden.float() - target).square().mean()  # (a LayerNorm output's mean square is flat)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def test_grouped_qkv_trains_a_bert_like_the_separate_fused_layers():
    from torch_impl.fused import group_shared_input, ungroup_shared_input

    ids = torch.randint(0, 64, (2, 7))
    model, reference = _adapted_bert(), _adapted_bert()
    keys = list(model.state_dict())
    assert group_shared_input(model) == 2  # one group a layer: query, key, value
    attention = model.adapted_model.encoder.layer[0].attention.self
    assert attention.query(torch.randn(2, 3, 16, requires_grad=True)).grad_fn.name() == GROUP_NODE
    losses, losses_ref = _train(model, ids, 4), _train(reference, ids, 4)
    torch.testing.assert_close(torch.stack(losses), torch.stack(losses_ref), atol=1e-5, rtol=1e-5)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, p_ref, atol=1e-5, rtol=1e-5, msg=name)
    assert list(model.state_dict()) == keys
    assert all(not group.pending for m in model.modules() if (group := m.__dict__.get("_shared_input_group")))
    assert ungroup_shared_input(model) == 6
    assert attention.query(torch.randn(2, 3, 16, requires_grad=True)).grad_fn.name() == FUSED_NODE


def test_grouped_qkv_under_bf16_autocast_matches_the_separate_layers():
    from torch_impl.fused import group_shared_input

    ids = torch.randint(0, 64, (2, 7))
    model, reference = _adapted_bert(), _adapted_bert()
    group_shared_input(model)
    losses, losses_ref = _train(model, ids, 2, autocast=True), _train(reference, ids, 2, autocast=True)
    torch.testing.assert_close(torch.stack(losses), torch.stack(losses_ref), atol=1e-2, rtol=1e-2)
    for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.dtype == p_ref.dtype
        torch.testing.assert_close(p, p_ref, atol=2e-2, rtol=2e-2)


def test_a_group_member_on_another_input_or_after_a_weight_change_computes_alone():
    from torch_impl.fused import group_shared_input

    torch.manual_seed(0)
    parent = nn.Module()
    parent.query, parent.key = make_lora(8, 6, 2, 1.0, True), make_lora(8, 6, 2, 1.0, False)
    assert group_shared_input(parent) == 1
    x, other = torch.randn(3, 8), torch.randn(3, 8)
    parent.query(x)
    torch.testing.assert_close(parent.key(other), plain_forward(parent.key, other), atol=1e-6, rtol=1e-6)
    parent.query(x)
    with torch.no_grad():
        parent.key.adapter_up_proj.weight.add_(1.0)  # bumps its version: the pending output is stale
    torch.testing.assert_close(parent.key(x), plain_forward(parent.key, x), atol=1e-6, rtol=1e-6)
    parent.query(x)
    x.add_(1.0)  # an in-place change of the input itself
    torch.testing.assert_close(parent.key(x), plain_forward(parent.key, x), atol=1e-6, rtol=1e-6)
    parent.key.adapter_down_proj.register_forward_hook(lambda *_: None)  # a hook: never grouped
    assert parent.query(x.requires_grad_()).grad_fn.name() == FUSED_NODE


def test_grouped_model_under_torch_compile_and_torch_func_takes_the_separate_layers():
    from torch.func import functional_call, grad

    from torch_impl.fused import group_shared_input

    torch.manual_seed(0)
    parent = nn.Module()
    parent.query, parent.key, parent.value = (make_lora(8, 6, 2, 1.0, True) for _ in range(3))
    group_shared_input(parent)

    def forward(x):
        return parent.query(x) * parent.key(x) + parent.value(x)

    x = torch.randn(3, 8)
    expected = plain_forward(parent.query, x) * plain_forward(parent.key, x) + plain_forward(parent.value, x)
    torch._dynamo.reset()
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)

    params = {k: v.detach() for k, v in parent.named_parameters() if v.requires_grad}
    # Under a torch.func transform the member finds no pending output and takes its own path.
    parent.query(x)
    g = grad(lambda w: (functional_call(parent.key, {"adapter_down_proj.weight": w}, (x,))).sum())(
        params["key.adapter_down_proj.weight"]
    )
    parent.key.adapter_down_proj.weight.grad = None
    plain_forward(parent.key, x).sum().backward()
    torch.testing.assert_close(g, parent.key.adapter_down_proj.weight.grad, atol=1e-5, rtol=1e-5)


def test_grouping_ignores_houlsby_and_peft_layers():
    from torch_impl import HoulsbyAdapterLinear
    from torch_impl.fused import group_shared_input

    parent = nn.Module()
    parent.query = HoulsbyAdapterLinear(nn.Linear(8, 8), 2)
    parent.key = HoulsbyAdapterLinear(nn.Linear(8, 8), 2)
    parent.value = make_lora(8, 8, 2, 1.0, True)
    assert group_shared_input(parent) == 0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_active_dropout_takes_the_fused_path_with_the_plain_formulas_mask(bias, autocast):
    """Training with LoRA dropout (PEFT's ``lora_dropout``): the low-rank branch reads
    ``F.dropout(x)`` drawn from the same generator state as the plain formula's, so the output is
    the same, and the fused function takes it as a second input whose gradient autograd sends
    back through the mask."""
    torch.manual_seed(0)
    layer = LoRA(nn.Linear(16, 12, bias=bias).requires_grad_(False), 4, 2.0, dropout=0.5)
    with torch.no_grad():
        layer.adapter_up_proj.weight.normal_()
    layer.train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    grad_y = torch.randn(3, 5, 12)
    results = {}
    for fused_path in (True, False):
        torch.manual_seed(1)  # the same dropout mask on both paths
        x.grad = None
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused_path:
                y = layer(x)
            else:
                with fused.disabled():
                    y = layer(x)
        assert (y.grad_fn.name() == FUSED_NODE) is fused_path
        y.float().backward(grad_y)
        grads = [t.grad.clone() for t in (x, layer.adapter_down_proj.weight, layer.adapter_up_proj.weight)]
        results[fused_path] = (y.detach().float(), grads)
    (y, grads), (y_ref, grads_ref) = results[True], results[False]
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if not autocast else {"atol": 5e-2, "rtol": 2e-2}
    torch.testing.assert_close(y, y_ref, **tolerance)
    assert not torch.allclose(
        y,
        layer.pretrained_module(x).float() + 0.5 * layer.adapter_up_proj(layer.adapter_down_proj(x)).float(),
        atol=1e-3,
    )
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, **tolerance)
