"""Differential tests: ours against real SpeechBrain 1.1.x on the same models and seeds.

Each case builds both ``AdaptedModel``s from one factory (see ``twins.py``) and checks the same
printed structure, keys, initial numbers, trainable set, warnings, outputs, gradients, and that
``saver`` files cross both ways.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torch_impl
from tests.torch_impl.twins import (
    assert_state_dicts_equal,
    assert_twins_agree,
    build_twins,
    randomize_trainable,
    speechbrain_adapters,
    trainable_names,
)
from tests.zoo import torch_models

CASES = {
    "seed-example": (torch_models.SeedMLP, torch_models.seed_mlp_input, "LoRA", {
        "target_layers": ["layer[13]"], "unfrozen_layers": ["layer2"], "adapter_kwargs": {"rank": 2}}),
    "mlp-houlsby-all-linear": (torch_models.SeedMLP, torch_models.seed_mlp_input, "HoulsbyAdapterLinear", {
        "all_linear": True, "adapter_kwargs": {"projection_size": 3}}),
    "convs-batchnorm-unfrozen": (torch_models.MixedConvNet, torch_models.mixed_conv_net_input, "LoRA", {
        "all_conv": True, "unfrozen_layers": ["bn", "head"], "adapter_kwargs": {"rank": 3, "alpha": 2.0}}),
    "convs-and-linears": (torch_models.MixedConvNet, torch_models.mixed_conv_net_input, "LoRA", {
        "all_conv": True, "all_linear": True, "adapter_kwargs": {"rank": 2}}),
    "mha-all-linear": (torch_models.AttentionModel, torch_models.attention_input, "LoRA", {
        "all_linear": True, "unfrozen_layers": ["norm"], "adapter_kwargs": {"rank": 4}}),
    "mha-houlsby-targets-out-proj": (torch_models.AttentionModel, torch_models.attention_input, "HoulsbyAdapterLinear", {
        "target_layers": ["proj_in", "attn.out_proj", "ffn"], "adapter_kwargs": {"projection_size": 2}}),
    "nested-globs": (torch_models.NestedModel, torch_models.nested_input, "LoRA", {
        "target_layers": ["encoder.blocks.*.ffn.*"], "unfrozen_layers": ["encoder.out"],
        "adapter_kwargs": {"rank": 2, "alpha": 4.0}}),
    "nested-unfreeze-star-includes-root": (torch_models.NestedModel, torch_models.nested_input, "LoRA", {
        "all_linear": True, "unfrozen_layers": ["*"], "adapter_kwargs": {"rank": 1}}),
    "nested-houlsby-gelu-no-bias": (torch_models.NestedModel, torch_models.nested_input, "HoulsbyAdapterLinear", {
        "target_layers": ["head", "encoder.blocks.1.ffn.down"],
        "adapter_kwargs": {"projection_size": 2, "activation": nn.GELU, "bias": False}}),
}  # fmt: skip


REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sb():
    return speechbrain_adapters()


@pytest.mark.parametrize("case", list(CASES))
def test_same_structure_numbers_outputs_gradients_and_checkpoints_as_speechbrain(sb, case, tmp_path):
    factory, make_input, adapter, kwargs = CASES[case]
    twins = build_twins(sb, factory, adapter, **kwargs)
    assert_twins_agree(twins, make_input, tmp_path)


@st.composite
def random_models(draw):
    """A random channels-last stack (Linear, Conv1d blocks, norms, nested Sequentials), an
    adapter, and a random but valid selection of targets and unfrozen layers."""
    adaptable_kinds = ("linear", "conv", "nested")
    kinds = st.sampled_from(["linear", "conv", "layernorm", "gelu", "nested"])
    layer_kinds = draw(
        st.lists(kinds, min_size=1, max_size=5).filter(lambda ks: set(ks) & set(adaptable_kinds))
    )
    specs, width = [], 4
    for kind in layer_kinds:
        out = draw(st.integers(2, 6))
        if kind == "conv":
            specs.append(
                (
                    "conv",
                    width,
                    out,
                    draw(st.integers(1, 3)),
                    draw(st.integers(1, 2)),
                    draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
                )
            )
            width = out
        elif kind in ("linear", "nested"):
            specs.append((kind, width, out))
            width = out
        else:
            specs.append((kind, width))

    def factory() -> nn.Module:
        layers = []
        for spec in specs:
            if spec[0] == "conv":
                layers.append(torch_models.ChannelsLastConvBlock(*spec[1:]))
            elif spec[0] == "linear":
                layers.append(nn.Linear(spec[1], spec[2]))
            elif spec[0] == "nested":
                layers.append(nn.Sequential(nn.Linear(spec[1], 3), nn.Tanh(), nn.Linear(3, spec[2])))
            elif spec[0] == "layernorm":
                layers.append(nn.LayerNorm(spec[1]))
            else:
                layers.append(nn.GELU())
        return nn.Sequential(*layers)

    names = dict(factory().named_modules())
    linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
    convs = [n for n, m in names.items() if isinstance(m, nn.Conv1d)]
    norms = [n for n, m in names.items() if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d))]
    houlsby = bool(linears) and (not convs or draw(st.booleans()))
    adaptable = linears if houlsby else linears + convs
    kwargs = {"adapter_kwargs": {"projection_size": 2} if houlsby else {"rank": draw(st.integers(1, 3))}}
    if draw(st.booleans()):
        kwargs["target_layers"] = draw(
            st.lists(st.sampled_from(adaptable), min_size=1, max_size=3, unique=True)
        )
    elif linears:
        kwargs["all_linear"] = True
    if not houlsby and convs and (not kwargs.get("target_layers") or draw(st.booleans())):
        kwargs["all_conv"] = True
    if norms and draw(st.booleans()):
        kwargs["unfrozen_layers"] = draw(
            st.lists(st.sampled_from(norms), min_size=1, max_size=2, unique=True)
        )
    return factory, ("HoulsbyAdapterLinear" if houlsby else "LoRA"), kwargs


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(random_models())
def test_random_models_and_selections_agree_with_speechbrain(sb, tmp_path, drawn):
    """The package is compared with SpeechBrain on models it has not seen: so do we."""
    factory, adapter, kwargs = drawn
    twins = build_twins(sb, factory, adapter, **kwargs)
    assert_twins_agree(twins, lambda: torch.randn(2, 5, 4), tmp_path)


@pytest.mark.parametrize("adapter", ["LoRA", "HoulsbyAdapterLinear"])
def test_transformer_encoder_matches_speechbrain_in_train_mode(sb, adapter, tmp_path):
    """SpeechBrain crashes in eval mode here (see test_departures); train mode must agree."""
    kwargs = {"rank": 2} if adapter == "LoRA" else {"projection_size": 2}
    twins = build_twins(
        sb,
        torch_models.transformer,
        adapter,
        target_layers=["layers.*.linear?"],
        unfrozen_layers=["layers.1.norm*"],
        adapter_kwargs=kwargs,
    )
    assert_twins_agree(twins, torch_models.transformer_input, tmp_path, eval_mode=False)


def test_transformer_all_linear_skips_attention_out_proj_with_the_same_warning_as_speechbrain(sb, tmp_path):
    twins = build_twins(sb, torch_models.transformer, "LoRA", all_linear=True, adapter_kwargs={"rank": 2})
    assert len(twins.ours_warnings) == 2  # one per layer's self_attn.out_proj
    assert twins.ours.replace_layers == twins.theirs.replace_layers
    assert not any("out_proj" in name for name in twins.ours.replace_layers)
    assert_twins_agree(twins, torch_models.transformer_input, tmp_path, eval_mode=False)


def test_mha_out_proj_is_skipped_with_speechbrains_warning_text(sb):
    with pytest.warns(UserWarning) as ours_record:
        ours = torch_impl.AdaptedModel(torch_models.AttentionModel(), torch_impl.LoRA, all_linear=True)
    with pytest.warns(UserWarning) as theirs_record:
        sb.AdaptedModel(torch_models.AttentionModel(), sb.LoRA, all_linear=True, adapter_kwargs={})
    ours_text = [str(w.message) for w in ours_record]
    assert ours_text == [str(w.message) for w in theirs_record]
    assert ours_text == [torch_impl.adapters.MHA_WARNING]
    assert isinstance(ours.adapted_model.attn.out_proj, nn.Linear)
    assert ours.replace_layers == ["proj_in", "ffn"]


def test_same_seed_gives_same_adapter_numbers_as_speechbrain_for_each_layer_kind(sb):
    layers = [
        nn.Linear(5, 7),
        nn.Conv1d(3, 4, 3, stride=2),
        nn.Conv2d(2, 3, (3, 1), padding="same", padding_mode="replicate"),
        nn.Conv3d(2, 2, 2, dilation=2),
    ]
    for layer in layers:
        for ours_cls, theirs_cls, kwargs in [
            (torch_impl.LoRA, sb.LoRA, {"rank": 3, "alpha": 5.0}),
            (torch_impl.HoulsbyAdapterLinear, sb.HoulsbyAdapterLinear, {"projection_size": 3}),
        ]:
            if ours_cls is torch_impl.HoulsbyAdapterLinear and not isinstance(layer, nn.Linear):
                continue
            torch.manual_seed(7)
            ours = ours_cls(layer, **kwargs)
            torch.manual_seed(7)
            theirs = theirs_cls(layer, **kwargs)
            assert repr(ours) == repr(theirs)
            assert list(ours.state_dict()) == list(theirs.state_dict())
            for key, value in theirs.state_dict().items():
                assert torch.equal(ours.state_dict()[key], value), (type(layer).__name__, key)
            assert getattr(ours, "scaling", None) == getattr(theirs, "scaling", None)


def test_manual_insertion_matches_speechbrain(sb, tmp_path):
    twins = build_twins(
        sb,
        torch_models.NestedModel,
        target_layers=["encoder.blocks.0.ffn.up", "head"],
        adapter_kwargs={"rank": 2},
        manual_adapter_insertion=True,
    )
    assert twins.ours.replace_layers == ["encoder.blocks.0.ffn.up", "head"]
    assert_twins_agree(twins, torch_models.nested_input, tmp_path)


def test_seed_example_repr_is_byte_for_byte_speechbrains(sb):
    kwargs = {"target_layers": ["layer[13]"], "unfrozen_layers": ["layer2"], "adapter_kwargs": {"rank": 2}}

    ours = repr(torch_impl.AdaptedModel(torch_models.seed_model(), torch_impl.LoRA, **kwargs))
    theirs = repr(sb.AdaptedModel(torch_models.seed_model(), sb.LoRA, **kwargs))
    assert ours == theirs
    assert ours == torch_models.SEED_REPR


def _checkpointer_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("CKPT*/model.ckpt"))


def test_speechbrain_checkpointer_saves_only_trainable_params_and_recovers_our_model(sb, tmp_path):
    from speechbrain.utils.checkpoints import Checkpointer  # imported before our model is built

    torch.manual_seed(0)
    model = torch_impl.AdaptedModel(
        torch_models.MixedConvNet(),
        torch_impl.LoRA,
        all_conv=True,
        unfrozen_layers=["bn"],
        adapter_kwargs={"rank": 2},
    )
    randomize_trainable(model)
    model.train()(torch_models.mixed_conv_net_input())  # moves the unfrozen BatchNorm's running stats
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    checkpointer = Checkpointer(tmp_path, recoverables={"model": model})
    checkpointer.save_checkpoint()
    [file] = _checkpointer_files(tmp_path)
    on_disk = torch.load(file, weights_only=True)
    bn_buffers = [
        "adapted_model.bn.running_mean",
        "adapted_model.bn.running_var",
        "adapted_model.bn.num_batches_tracked",
    ]
    assert sorted(on_disk) == sorted(trainable_names(model) + bn_buffers)
    assert all(not key.endswith("pretrained_module.weight") for key in on_disk)

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for b in model.buffers():
            b.zero_()
    assert checkpointer.recover_if_possible() is not None
    for key in on_disk:
        assert torch.equal(model.state_dict()[key], saved[key]), key


def test_speechbrain_checkpointer_uses_our_hooks_for_a_subclass_of_adapted_model(sb, tmp_path):
    """SpeechBrain registers hooks per class ``__dict__``: a subclass must still save adapters only."""
    from speechbrain.utils.checkpoints import Checkpointer

    class MyAdaptedModel(torch_impl.AdaptedModel):
        pass

    model = MyAdaptedModel(
        torch_models.SeedMLP(), torch_impl.LoRA, target_layers=["layer1"], adapter_kwargs={"rank": 2}
    )
    Checkpointer(tmp_path, recoverables={"model": model}).save_checkpoint()
    [file] = _checkpointer_files(tmp_path)
    assert list(torch.load(file, weights_only=True)) == trainable_names(model)


def test_speechbrain_adapted_model_checkpoint_loads_into_ours_through_checkpointer(sb, tmp_path):
    from speechbrain.utils.checkpoints import Checkpointer

    kwargs = {"target_layers": ["layer1", "layer3"], "adapter_kwargs": {"rank": 2}}
    torch.manual_seed(0)
    theirs = sb.AdaptedModel(torch_models.SeedMLP(), sb.LoRA, **kwargs)
    randomize_trainable(theirs)
    Checkpointer(tmp_path, recoverables={"model": theirs}).save_checkpoint()
    torch.manual_seed(0)
    ours = torch_impl.AdaptedModel(torch_models.SeedMLP(), torch_impl.LoRA, **kwargs)
    Checkpointer(tmp_path, recoverables={"model": ours}).recover_if_possible()
    assert_state_dicts_equal(theirs.state_dict(), ours.state_dict())
    x = torch_models.seed_mlp_input()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_torch_impl_imports_neither_speechbrain_nor_jax_and_works_without_them(tmp_path):
    """A plain PyTorch user may have no SpeechBrain (nor torchaudio) and no JAX installed."""
    code = f"""
import sys, torch, torch_impl
from torch_impl import _speechbrain
m = torch_impl.AdaptedModel(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch_impl.LoRA, target_layers="0")
for name in ("a.ckpt", "a.safetensors"):
    m.saver({str(tmp_path)!r} + "/" + name)
    m.loader({str(tmp_path)!r} + "/" + name)
torch_impl.merge_lora(m)
bad = sorted(k for k in sys.modules if k.split(".")[0] in ("speechbrain", "jax", "flax", "torchaudio"))
assert not bad, bad
assert not _speechbrain._registered
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
