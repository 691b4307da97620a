"""LoRA's PEFT options in torch_impl (dropout, rsLoRA, DoRA, embedding targets), checked against
the real ``peft`` package with the same weights; exact merging, parametrized weights included;
merge_and_unload / unload."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from tests.conftest import import_speechbrain_adapters
from torch_impl import (
    AdaptedModel,
    HoulsbyAdapterLinear,
    LoRA,
    MergeError,
    merge_and_unload,
    merge_lora,
    unload,
    unmerge_lora,
)

peft = pytest.importorskip("peft")

FORWARD = {"rtol": 1e-5, "atol": 1e-5}
GRADIENT = {"rtol": 1e-4, "atol": 1e-4}


class Net(nn.Module):
    """One layer of each kind LoRA wraps, named as PEFT will target them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.lin = nn.Linear(6, 5)
        self.c1 = nn.Conv1d(5, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 3, (3, 2), stride=(1, 2))
        self.c3 = nn.Conv3d(3, 2, (1, 2, 1))  # PEFT mistakes a 1x1x1 kernel for a 1x1 conv2d

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.emb(tokens))  # (b, t, 5)
        h = self.c1(h.transpose(1, 2))  # (b, 4, t)
        h = self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 4))  # (b, 3, t-2, 2)
        return self.c3(h.unsqueeze(-1)).flatten(1)


def tokens() -> torch.Tensor:
    return torch.tensor([[1, 4, 0, 7, 10, 3], [2, 2, 9, 0, 5, 8]])


OPTIONS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "rslora+dora": {"use_rslora": True, "use_dora": True},
}
LAYERS = ["emb", "lin", "c1", "c2", "c3"]


def _peft_model(options: dict, dropout: float = 0.0, layers=LAYERS):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Net()
    config = LoraConfig(
        r=2,
        lora_alpha=3.0,
        target_modules=[layer for layer in layers if not (options.get("use_dora") and layer == "emb")],
        lora_dropout=dropout,
        use_rslora=options.get("use_rslora", False),
        use_dora=options.get("use_dora", False),
        init_lora_weights=False,  # random A and B: the adapters do something
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # and a magnitude that differs from the norm
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.linspace(0.5, 1.5, param.numel()).view(param.shape))
    return peft_model, config.target_modules


def _ours_like(peft_model, targets, options: dict, dropout: float = 0.0) -> AdaptedModel:
    """Our AdaptedModel on a copy of the same base weights, with PEFT's adapter weights."""
    torch.manual_seed(0)
    base = Net()
    ours = AdaptedModel(
        base,
        LoRA,
        target_layers=sorted(targets),
        adapter_kwargs={"rank": 2, "alpha": 3.0, "dropout": dropout, **options},
    )
    peft_base = peft_model.base_model.model
    with torch.no_grad():
        for name in targets:
            theirs, mine = peft_base.get_submodule(name), ours.adapted_model.get_submodule(name)
            mine.pretrained_module.load_state_dict(theirs.base_layer.state_dict())
            if isinstance(mine.pretrained_module, nn.Embedding):
                mine.adapter_down_proj.weight.copy_(theirs.lora_embedding_A["default"].T)
                mine.adapter_up_proj.weight.copy_(theirs.lora_embedding_B["default"])
            else:
                mine.adapter_down_proj.weight.copy_(theirs.lora_A["default"].weight)
                mine.adapter_up_proj.weight.copy_(theirs.lora_B["default"].weight)
            if options.get("use_dora"):
                magnitude = theirs.lora_magnitude_vector["default"].weight
                mine.adapter_magnitude.copy_(magnitude.flatten())
        for name, module in peft_base.named_children():  # untargeted layers
            if name not in targets:
                ours.adapted_model.get_submodule(name).load_state_dict(module.state_dict())
    return ours


def _trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def _peft_name(ours_name: str) -> str:
    name = ours_name.removeprefix("adapted_model.")
    return (
        name.replace("adapter_down_proj.weight", "lora_A.default.weight")
        .replace("adapter_up_proj.weight", "lora_B.default.weight")
        .replace("adapter_magnitude", "lora_magnitude_vector.default.weight")
    )


@pytest.mark.parametrize("option", list(OPTIONS))
def test_forward_and_gradients_match_peft_in_training_mode(option):
    options = OPTIONS[option]
    peft_model, targets = _peft_model(options)
    ours = _ours_like(peft_model, targets, options)
    peft_model.train(), ours.train()
    x = tokens()
    out_peft, out_ours = peft_model(x), ours(x)
    torch.testing.assert_close(out_ours, out_peft, **FORWARD)
    assert not torch.allclose(out_ours, _fresh_base()(x)), "the adapters must change the output"
    weights = torch.randn_like(out_ours)
    (out_peft * weights).sum().backward()
    (out_ours * weights).sum().backward()
    theirs = dict(peft_model.base_model.model.named_parameters())
    grads = _trainable_grads(ours)
    assert len(grads) == sum(p.requires_grad for p in peft_model.parameters())
    for name, grad in grads.items():
        peft_param = theirs[
            _peft_name(name)
            .replace("emb.lora_A.default.weight", "emb.lora_embedding_A.default")
            .replace("emb.lora_B.default.weight", "emb.lora_embedding_B.default")
        ]
        expected = peft_param.grad.T if name.endswith("emb.adapter_down_proj.weight") else peft_param.grad
        torch.testing.assert_close(grad, expected.reshape(grad.shape), **GRADIENT)


def _fresh_base() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.mark.parametrize("option", list(OPTIONS))
def test_eval_outputs_match_peft_with_dropout(option):
    options = OPTIONS[option]
    peft_model, targets = _peft_model(options, dropout=0.3)
    ours = _ours_like(peft_model, targets, options, dropout=0.3)
    peft_model.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()), peft_model(tokens()), **FORWARD)


def test_dropout_acts_on_the_low_rank_branch_in_training_only():
    torch.manual_seed(0)
    layer = LoRA(nn.Linear(8, 8), rank=4, dropout=0.5)
    nn.init.normal_(layer.adapter_up_proj.weight)
    x = torch.randn(64, 8)
    layer.train()
    torch.manual_seed(1)
    first = layer(x)
    torch.manual_seed(2)
    assert not torch.allclose(first, layer(x)), "dropout draws a new mask every step"
    base = layer.pretrained_module(x)
    torch.manual_seed(1)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    expected = base + layer.adapter_up_proj(layer.adapter_down_proj(x * mask)) * layer.scaling
    torch.testing.assert_close(first, expected, **FORWARD)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias, **FORWARD)


def test_dropout_and_rslora_take_the_fused_path_and_dora_does_not(monkeypatch):
    from torch_impl import fused

    calls = []  # the low-rank branch's own input (x_low) of each fused call, None where it is x
    real = fused.lora_linear
    monkeypatch.setattr(fused, "lora_linear", lambda *a, **k: calls.append(a[6:]) or real(*a, **k))
    x = torch.randn(3, 4)
    LoRA(nn.Linear(4, 4), 2)(x)
    LoRA(nn.Linear(4, 4), 2, dropout=0.2).eval()(x)
    LoRA(nn.Linear(4, 4), 2, use_rslora=True)(x)
    assert calls == [(None,)] * 3
    LoRA(nn.Linear(4, 4), 2, dropout=0.2).train()(x)  # active dropout: x_low = F.dropout(x)
    assert len(calls) == 4 and calls[3][0] is not None and calls[3][0].shape == x.shape
    LoRA(nn.Linear(4, 4), 2, use_dora=True)(x)
    assert len(calls) == 4


def test_rslora_scaling_is_alpha_over_sqrt_rank():
    assert LoRA(nn.Linear(4, 4), 4, 8.0, use_rslora=True).scaling == 8.0 / math.sqrt(4)
    assert LoRA(nn.Linear(4, 4), 4, 8.0).scaling == 2.0


def test_plain_lora_signature_defaults_names_and_init_are_speechbrains():
    pytest.importorskip("speechbrain")  # the torch-only CI environment has none; the full run has it
    signature = inspect.signature(LoRA)
    positional = [p.name for p in signature.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == ["target_module", "rank", "alpha"]
    assert signature.parameters["rank"].default == 16 and signature.parameters["alpha"].default == 1.0
    assert all(
        p.kind is p.KEYWORD_ONLY
        for n, p in signature.parameters.items()
        if n in ("dropout", "use_rslora", "use_dora")
    )
    torch.manual_seed(3)
    ours = LoRA(nn.Linear(5, 4), 2)
    speechbrain = import_speechbrain_adapters()
    torch.manual_seed(3)
    theirs = speechbrain.LoRA(nn.Linear(5, 4), 2)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)


def test_dora_magnitude_starts_at_the_row_norms_and_a_fresh_adapter_changes_nothing():
    for base in (nn.Linear(6, 5), nn.Conv2d(3, 4, 3), nn.Conv1d(2, 3, 2), nn.Conv3d(2, 2, 1)):
        layer = LoRA(base, rank=2, use_dora=True)
        torch.testing.assert_close(layer.adapter_magnitude, base.weight.flatten(1).norm(dim=1))
        x = (
            torch.randn(2, 6)
            if isinstance(base, nn.Linear)
            else torch.randn(2, base.in_channels, *(5,) * (base.weight.dim() - 2))
        )
        torch.testing.assert_close(layer(x), base(x), **FORWARD)


def test_dora_norm_is_detached_from_the_graph():
    torch.manual_seed(0)
    layer = LoRA(nn.Linear(4, 3), rank=2, use_dora=True)
    nn.init.normal_(layer.adapter_up_proj.weight)
    x = torch.randn(5, 4)
    layer(x).sum().backward()
    down, up, m = layer.adapter_down_proj.weight, layer.adapter_up_proj.weight, layer.adapter_magnitude
    w = layer.pretrained_module.weight
    norm = (w + layer.scaling * up.detach() @ down.detach()).norm(dim=1)  # a constant

    def f(down_, up_, m_):
        combined = x @ (w + layer.scaling * up_ @ down_).T
        return ((m_ / norm) * combined + layer.pretrained_module.bias).sum()

    d, u, mm = (t.detach().clone().requires_grad_() for t in (down, up, m))
    f(d, u, mm).backward()
    torch.testing.assert_close(down.grad, d.grad, **GRADIENT)
    torch.testing.assert_close(up.grad, u.grad, **GRADIENT)
    torch.testing.assert_close(m.grad, mm.grad, **GRADIENT)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_merge_and_unmerge_are_exact_for_every_option_and_layer_kind(option):
    options = OPTIONS[option]
    peft_model, targets = _peft_model(options)
    ours = _ours_like(peft_model, targets, options).eval()
    x = tokens()
    with torch.no_grad():
        before = ours(x)
        base_weights = {k: v.clone() for k, v in ours.state_dict().items()}
        assert merge_lora(ours) == len(targets)
        torch.testing.assert_close(ours(x), before, **FORWARD)
        peft_model.eval()
        merged_peft = peft_model.merge_and_unload()
        merged_ours = dict(ours.adapted_model.named_modules())
        for name in targets:
            torch.testing.assert_close(
                merged_ours[name].pretrained_module.weight, merged_peft.get_submodule(name).weight, **FORWARD
            )
        assert unmerge_lora(ours) == len(targets)
        torch.testing.assert_close(ours(x), before, **FORWARD)
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, base_weights[key], **FORWARD)


def test_effective_weight_is_differentiable_and_matches_the_forward():
    torch.manual_seed(0)
    for options in OPTIONS.values():
        for base, x in (
            (nn.Linear(4, 3), torch.randn(2, 4)),
            (nn.Conv1d(2, 3, 3, padding=1), torch.randn(2, 2, 7)),
        ):
            layer = LoRA(base, rank=2, **options)
            nn.init.normal_(layer.adapter_up_proj.weight)
            if isinstance(base, nn.Linear):
                by_weight = nn.functional.linear(x, layer.weight, layer.bias)
            else:
                by_weight = base._conv_forward(x, layer.weight, layer.bias)
            torch.testing.assert_close(by_weight, layer(x), **FORWARD)
            by_weight.sum().backward()
            assert (
                layer.adapter_down_proj.weight.grad is not None
                and layer.adapter_up_proj.weight.grad is not None
            )
    emb = LoRA(nn.Embedding(7, 3), rank=2)
    nn.init.normal_(emb.adapter_up_proj.weight)
    idx = torch.tensor([[1, 6, 2]])
    torch.testing.assert_close(nn.functional.embedding(idx, emb.weight), emb(idx), **FORWARD)


def test_wrapped_attributes_are_read_only_through_the_wrapper():
    conv = LoRA(nn.Conv2d(3, 4, 3, stride=2, padding=1), rank=2)
    assert (conv.in_channels, conv.out_channels, conv.stride, conv.padding) == (3, 4, (2, 2), (1, 1))
    assert conv.bias is conv.pretrained_module.bias
    lin = LoRA(nn.Linear(6, 5, bias=False), rank=2)
    assert (lin.in_features, lin.out_features, lin.bias) == (6, 5, None)
    assert lin.weight.dtype == torch.float32
    with pytest.raises(AttributeError, match="read-only"):
        lin.in_features = 3
    with pytest.raises(AttributeError):
        _ = lin.not_an_attribute


def test_embedding_lora_follows_peft_and_all_linear_leaves_embeddings_alone():
    model = AdaptedModel(nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2)), LoRA, all_linear=True)
    assert isinstance(model.adapted_model[0], nn.Embedding) and isinstance(model.adapted_model[1], LoRA)
    layer = LoRA(nn.Embedding(5, 4, padding_idx=1), rank=3)
    assert torch.equal(layer.adapter_down_proj.weight[1], torch.zeros(3))
    idx = torch.tensor([1, 2, 3])
    torch.testing.assert_close(layer(idx), layer.pretrained_module(idx))  # fresh: no change
    with pytest.raises(ValueError, match="use_dora=True is not supported on embeddings"):
        LoRA(nn.Embedding(5, 4), 2, use_dora=True)
    with pytest.raises(ValueError, match="max_norm"):
        LoRA(nn.Embedding(5, 4, max_norm=1.0), 2)


@pytest.mark.parametrize(
    "bad", [{"dropout": 1.0}, {"dropout": -0.1}, {"dropout": "0.1"}, {"use_dora": 1}, {"use_rslora": "yes"}]
)
def test_bad_options_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LoRA(nn.Linear(3, 3), 2, **bad)


# --- parametrized weights (issue 14, item 1) -------------------------------------------------


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: weight_norm(nn.Linear(4, 4)), torch.randn(3, 4)),
        (lambda: weight_norm(nn.Conv1d(3, 4, 5, padding=2), dim=2), torch.randn(2, 3, 9)),
    ],
)
@pytest.mark.parametrize("options", [{}, {"use_dora": True}])
def test_merge_on_a_weight_norm_layer_is_exact(make, x, options):
    torch.manual_seed(0)
    layer = LoRA(make(), rank=2, **options)
    nn.init.normal_(layer.adapter_up_proj.weight)
    with torch.no_grad():
        before = layer(x)
        merge_lora(layer)
        assert layer.merged
        torch.testing.assert_close(layer(x), before, **FORWARD)
        unmerge_lora(layer)
        torch.testing.assert_close(layer(x), before, **FORWARD)


class _Scale(nn.Module):  # a parametrization with no right_inverse
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_merge_refuses_a_parametrization_without_right_inverse_and_changes_nothing():
    good = LoRA(nn.Linear(4, 4), 2)
    bad_base = nn.Linear(4, 4)
    parametrize.register_parametrization(bad_base, "weight", _Scale())
    model = nn.Sequential(good, LoRA(bad_base, 2))
    for layer in model:
        nn.init.normal_(layer.adapter_up_proj.weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 4)
    before = model(x)
    with pytest.raises(MergeError, match=r"layer '1'.*_Scale.*right_inverse"):
        merge_lora(model)
    assert not good.merged and not model[1].merged
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    torch.testing.assert_close(model(x), before)


# --- merge_and_unload / unload (issue 14, item 6) --------------------------------------------


@pytest.mark.parametrize("option", list(OPTIONS))
def test_merge_and_unload_gives_the_plain_model_with_the_adapted_outputs(option):
    options = OPTIONS[option]
    peft_model, targets = _peft_model(options)
    ours = _ours_like(peft_model, targets, options).eval()
    x = tokens()
    with torch.no_grad():
        before = ours(x)
        plain = merge_and_unload(ours)
        assert list(plain.state_dict()) == list(Net().state_dict())
        assert not any(isinstance(m, LoRA) for m in plain.modules())
        torch.testing.assert_close(plain(x), before, **FORWARD)
        reloaded = Net()
        reloaded.load_state_dict(plain.state_dict())
        torch.testing.assert_close(reloaded(x), before, **FORWARD)


def test_unload_drops_the_adapters_without_merging_even_after_a_merge():
    torch.manual_seed(0)
    base = Net()
    x = tokens()
    with torch.no_grad():
        expected = base(x)
    model = AdaptedModel(base, LoRA, target_layers=LAYERS, adapter_kwargs={"rank": 2})
    for module in model.modules():
        if isinstance(module, LoRA):
            nn.init.normal_(module.adapter_up_proj.weight)
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(unload(model)(x), expected, **FORWARD)


def test_merge_and_unload_refuses_houlsby_and_changes_nothing():
    model = AdaptedModel(
        nn.Sequential(nn.Linear(3, 3)),
        HoulsbyAdapterLinear,
        all_linear=True,
        adapter_kwargs={"projection_size": 2},
    )
    with pytest.raises(MergeError, match="HoulsbyAdapterLinear"):
        merge_and_unload(model)
    assert isinstance(model.adapted_model[0], HoulsbyAdapterLinear)
    assert type(unload(model)[0]) is nn.Linear
