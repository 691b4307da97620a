"""Bad input gets an error of the documented type that names the culprit, and loses nothing."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from tests.zoo import torch_models
from torch_impl import AdaptedModel, HoulsbyAdapterLinear, LoRA
from twinformat.errors import CheckpointError, NoMatchError

FORMATS = ["adapters.ckpt", "adapters.safetensors"]


def _snapshot(model: nn.Module) -> tuple[str, dict[str, torch.Tensor], list[bool]]:
    return (
        repr(model),
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
    )


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    text, state, flags = snapshot
    assert repr(model) == text
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [p.requires_grad for p in model.parameters()] == flags


# --- Construction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        ({"target_layers": ["encoder.blocks.*.ffn.upp"]}, "'encoder.blocks.*.ffn.upp'"),
        ({"target_layers": ["head", "heda"]}, "'heda'"),
        ({"unfrozen_layers": ["encoder.norm"]}, "'encoder.norm'"),
        ({"all_conv": True}, "all_conv"),
    ],
)
def test_no_match_raises_naming_the_pattern_and_leaves_the_model_as_it_was(kwargs, culprit):
    model = torch_models.NestedModel()
    before = _snapshot(model)
    with pytest.raises(NoMatchError) as info:
        AdaptedModel(model, LoRA, **kwargs)
    assert culprit in str(info.value)
    assert isinstance(info.value, ValueError)
    _assert_unchanged(model, before)


def test_a_pattern_that_is_not_a_string_raises_type_error_naming_it():
    with pytest.raises(TypeError, match="3"):
        AdaptedModel(torch_models.SeedMLP(), LoRA, target_layers=["layer1", 3])


@pytest.mark.parametrize("twin", ["torch", "flax"])
def test_a_layer_list_given_as_all_linear_is_refused_before_anything_changes(twin):
    """SpeechBrain's third positional argument is all_linear: a pattern list there would read as
    True and adapt every linear layer (our own bench_mixed did this, 2026-12-07)."""
    if twin == "torch":
        model, adapted = torch_models.SeedMLP(), AdaptedModel
        before = [type(m).__name__ for m in model.modules()]
        extra: dict = {}
    else:
        nnx = pytest.importorskip("flax.nnx")  # the torch-only CI environment has no JAX
        import flax_impl

        model, adapted = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0))), flax_impl.AdaptedModel
        before = [type(m).__name__ for _, m in nnx.iter_graph(model)]
        extra = {"rngs": nnx.Rngs(1)}
    lora = LoRA if twin == "torch" else flax_impl.LoRA
    with pytest.raises(TypeError, match=r"all_linear must be True or False.*target_layers="):
        adapted(model, lora, ["layer1"], **extra)
    with pytest.raises(TypeError, match=r"all_conv must be True or False"):
        adapted(model, lora, False, "layer1", **extra)
    after = (
        [type(m).__name__ for m in model.modules()]
        if twin == "torch"
        else [type(m).__name__ for _, m in nnx.iter_graph(model)]
    )
    assert after == before


def test_model_to_adapt_must_be_a_module():
    with pytest.raises(TypeError, match="Linear"):
        AdaptedModel(nn.Linear, LoRA, all_linear=True)


@pytest.mark.parametrize(
    "adapter, layer, culprit",
    [
        (LoRA, nn.EmbeddingBag(10, 4), "EmbeddingBag"),  # nn.Embedding is supported (PEFT habit)
        (LoRA, nn.ConvTranspose2d(3, 3, 2), "ConvTranspose2d"),
        (LoRA, nn.LSTM(3, 3), "LSTM"),
        (HoulsbyAdapterLinear, nn.Conv1d(3, 3, 1), "Conv1d"),
        (HoulsbyAdapterLinear, nn.Embedding(10, 4), "Embedding"),
    ],
)
def test_unsupported_layer_types_raise_value_error_naming_the_type(adapter, layer, culprit):
    kwargs = {"rank": 2} if adapter is LoRA else {"projection_size": 2}
    with pytest.raises(ValueError, match=culprit):
        adapter(layer, **kwargs)


def test_adapted_model_names_the_layer_it_cannot_wrap_and_changes_nothing():
    model = nn.Sequential()
    model.add_module("emb", nn.EmbeddingBag(10, 4))  # nn.Embedding is supported (PEFT habit)
    model.add_module("fc", nn.Linear(4, 4))
    model.fc.weight.requires_grad_(False)  # the user's own flags survive a refused call
    before = _snapshot(model)
    with pytest.raises(ValueError, match="'emb'.*EmbeddingBag"):
        AdaptedModel(model, LoRA, target_layers=["fc", "emb"])
    _assert_unchanged(model, before)


def test_manual_insertion_into_an_unsupported_layer_changes_nothing():
    adapted = AdaptedModel(
        torch_models.SeedMLP(), LoRA, target_layers=["layer1", "act"], manual_adapter_insertion=True
    )
    before = _snapshot(adapted)
    with pytest.raises(ValueError, match="'act'.*ReLU"):
        adapted.insert_adapters()
    _assert_unchanged(adapted, before)
    assert not adapted.adapters_inserted


def test_a_wrong_adapter_keyword_raises_type_error_naming_the_layer_and_keyword():
    with pytest.raises(TypeError, match="'layer1'.*rnk"):
        AdaptedModel(torch_models.SeedMLP(), LoRA, target_layers=["layer1"], adapter_kwargs={"rnk": 2})


@pytest.mark.parametrize("value", [0, -1, 2.5, 2.0, "4", True, None])
def test_rank_below_one_or_not_an_int_raises_naming_rank(value):
    with pytest.raises(ValueError, match=f"rank.*{value!r}"):
        LoRA(nn.Linear(4, 4), rank=value)
    with pytest.raises(ValueError, match="rank"):
        LoRA(nn.Conv2d(4, 4, 3), rank=value)


@pytest.mark.parametrize("value", [0, -3, 1.5, "8", False])
def test_projection_size_below_one_or_not_an_int_raises_naming_it(value):
    with pytest.raises(ValueError, match=f"projection_size.*{value!r}"):
        HoulsbyAdapterLinear(nn.Linear(4, 4), projection_size=value)


@pytest.mark.parametrize(
    "conv", [nn.Conv1d(4, 4, 3, groups=2), nn.Conv2d(4, 8, 3, groups=4), nn.Conv3d(2, 2, 1, groups=2)]
)
def test_grouped_convolutions_are_refused_naming_groups(conv):
    with pytest.raises(ValueError, match=f"groups={conv.groups}"):
        LoRA(conv, rank=2)


# --- Checkpoints -------------------------------------------------------------------------------


def _adapted() -> AdaptedModel:
    torch.manual_seed(0)
    return AdaptedModel(
        torch_models.SeedMLP(), LoRA, target_layers=["layer1", "layer3"], unfrozen_layers=["layer2"]
    )


def _write(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)


def _trained_file(tmp_path: Path, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    source = _adapted()
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(1.0)
    path = tmp_path / name
    source.saver(path)
    return path, source.trainable_state_dict()


@pytest.mark.parametrize("name", FORMATS)
def test_loading_an_unexpected_key_raises_naming_it_and_loads_nothing(tmp_path, name):
    _, state = _trained_file(tmp_path, name)
    state = dict(state, **{"adapted_model.layer9.weight": torch.zeros(2)})
    _write(tmp_path / name, state)
    model = _adapted()
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match="adapted_model.layer9.weight") as info:
        model.loader(tmp_path / name)
    assert name in str(info.value)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("name", FORMATS)
def test_loading_a_mis_shaped_key_raises_naming_key_and_both_shapes_and_loads_nothing(tmp_path, name):
    _, state = _trained_file(tmp_path, name)
    key = "adapted_model.layer1.adapter_down_proj.weight"
    state[key] = torch.zeros(3, 10)
    _write(tmp_path / name, state)
    model = _adapted()
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=rf"{key}: file \(3, 10\) vs model \(16, 10\)"):
        model.loader(tmp_path / name)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("name", FORMATS)
def test_loading_without_a_trainable_key_raises_naming_it_and_loads_nothing(tmp_path, name):
    _, state = _trained_file(tmp_path, name)
    del state["adapted_model.layer2.bias"]
    _write(tmp_path / name, state)
    model = _adapted()
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match="missing trainable keys.*adapted_model.layer2.bias"):
        model.loader(tmp_path / name)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("name", FORMATS)
def test_loading_a_missing_file_raises_file_not_found_naming_it(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=name):
        _adapted().loader(tmp_path / name)


def test_loading_a_truncated_safetensors_file_raises_naming_the_file(tmp_path):
    path, _ = _trained_file(tmp_path, "adapters.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    model = _adapted()
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match="adapters.safetensors.*truncated"):
        model.loader(path)
    _assert_unchanged(model, before)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", os.urandom(64)],
    ids=["empty", "short", "bad-header", "random"],
)
def test_a_file_named_safetensors_that_is_not_safetensors_raises_naming_it(tmp_path, content):
    path = tmp_path / "adapters.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="adapters.safetensors"):
        _adapted().loader(path)


def test_a_torch_checkpoint_named_safetensors_raises_naming_it(tmp_path):
    path = tmp_path / "adapters.safetensors"
    torch.save(_adapted().trainable_state_dict(), path)
    with pytest.raises(CheckpointError, match="adapters.safetensors"):
        _adapted().loader(path)


@pytest.mark.parametrize(
    "content",
    [b"garbage", os.urandom(256), pickle.dumps([1, 2, 3], protocol=2)],
    ids=["text", "random", "pickled-list"],
)
def test_a_garbage_ckpt_raises_checkpoint_error_naming_the_file(tmp_path, content):
    path = tmp_path / "adapters.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="adapters.ckpt"):
        _adapted().loader(path)


def test_a_ckpt_that_is_not_a_state_dict_raises_naming_the_file(tmp_path):
    path = tmp_path / "adapters.ckpt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="adapters.ckpt.*state dict"):
        _adapted().loader(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch should_not_exist",))


def test_a_ckpt_with_arbitrary_pickled_code_is_refused_without_running_it(tmp_path, monkeypatch):
    """``weights_only=True``: loading a checkpoint never executes code hidden in it."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "adapters.ckpt"
    torch.save({"adapted_model.layer1.adapter_up_proj.weight": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="adapters.ckpt"):
        _adapted().loader(path)
    assert not (tmp_path / "should_not_exist").exists()


# --- Atomic writes -----------------------------------------------------------------------------


def _failing_writer(real_path_arg: int):
    def write(*args, **kwargs):
        target = args[real_path_arg]
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    return write


@pytest.mark.parametrize("name", FORMATS)
def test_a_failing_save_leaves_no_file_behind(tmp_path, monkeypatch, name):
    monkeypatch.setattr(torch, "save", _failing_writer(1))
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer(1))
    with pytest.raises(OSError, match="disk full"):
        _adapted().saver(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", FORMATS)
def test_a_failing_save_leaves_an_existing_checkpoint_untouched(tmp_path, monkeypatch, name):
    path, _ = _trained_file(tmp_path, name)
    original = path.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_writer(1))
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer(1))
    with pytest.raises(OSError, match="disk full"):
        _adapted().saver(path)
    assert path.read_bytes() == original
    assert list(tmp_path.iterdir()) == [path]


def test_saving_into_a_missing_folder_raises_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        _adapted().saver(tmp_path / "no_such_folder" / "adapters.ckpt")


def test_layer_adapter_kwargs_set_one_layers_rank_and_a_name_it_does_not_adapt_is_refused_untouched():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    adapted = AdaptedModel(
        model,
        LoRA,
        target_layers=["0", "2"],
        adapter_kwargs={"rank": 2},
        layer_adapter_kwargs={"2": {"rank": 5}},
    )
    assert adapted.adapted_model[0].adapter_down_proj.out_features == 2
    assert adapted.adapted_model[2].adapter_down_proj.out_features == 5
    plain = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(NoMatchError, match=r"layer_adapter_kwargs names '1', .* it adapts: '0', '2'"):
        AdaptedModel(plain, LoRA, target_layers=["0", "2"], layer_adapter_kwargs={"1": {"rank": 5}})
    assert all(p.requires_grad for p in plain.parameters()) and isinstance(plain[0], nn.Linear)


def test_a_file_whose_layers_sit_under_another_prefix_is_refused_naming_the_rename(tmp_path):
    from collections import OrderedDict

    def net(name: str) -> nn.Module:
        return nn.Sequential(OrderedDict({name: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))}))

    saved = AdaptedModel(net("enc"), LoRA, target_layers=["enc.0", "enc.1"], adapter_kwargs={"rank": 2})
    saved.saver(str(tmp_path / "a.safetensors"))
    other = AdaptedModel(
        net("encoder"), LoRA, target_layers=["encoder.0", "encoder.1"], adapter_kwargs={"rank": 2}
    )
    with pytest.raises(
        CheckpointError,
        match=r"the file's 'enc\.<rest>' is this model's 'encoder\.<rest>'.*--rename 'enc\.\*' 'encoder\.\*'",
    ):
        other.loader(str(tmp_path / "a.safetensors"))
