"""Several named adapters on one ``AdaptedModel`` (issue #23), against the real ``peft``: a
transformers BERT (small config, random init) with three LoRA adapters of different layers, ranks
and options (rsLoRA, DoRA), every factor perturbed; outputs after ``set_adapter``, with a list of
active adapters, under ``disable_adapter``, in a mixed batch and after ``delete_adapter`` equal
``PeftModel``'s; files cross both ways in PEFT's multi-adapter layout; only the active adapter
trains; a one-adapter model is what it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
from torch import nn

from tests.zoo import bert
from torch_impl import AdaptedModel, HoulsbyAdapterLinear, LoRA, MergeError, hotswap_adapter, merge_lora
from torch_impl.checkpoint import save_state_dict_file
from twinformat import peft_format
from twinformat.errors import AdapterError, AdapterInsertionError, CheckpointError, PeftConversionError

peft = pytest.importorskip("peft")

#: name -> (PEFT LoraConfig, our target_layers, our adapter_kwargs)
ADAPTERS = {
    "default": (
        dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
        bert.QUERY_VALUE,
        {"rank": 4, "alpha": 8},
    ),
    "b": (
        dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["query", "key"]),
        ["*.query", "*.key"],
        {"rank": 2, "alpha": 3, "use_rslora": True},
    ),
    "c": (
        dict(r=3, lora_alpha=5, use_dora=True, target_modules=["output.dense"]),
        ["*output.dense"],
        {"rank": 3, "alpha": 5, "use_dora": True},
    ),
}


def _ids(batch: int = 4) -> torch.Tensor:
    return torch.arange(batch * 5).reshape(batch, 5) % bert.SMALL_CONFIG["vocab_size"]


def _out(model: nn.Module, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids(), **kwargs).last_hidden_state


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory):
    """PEFT's own three-adapter model, every factor and magnitude perturbed, saved in its layout."""
    torch.manual_seed(0)
    base = bert.small_torch_bert()
    pristine = copy.deepcopy(base)
    config, _, _ = ADAPTERS["default"]
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **config))
    for name in ("b", "c"):
        model.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **ADAPTERS[name][0]))
    bert.randomize_peft(model)
    folder = tmp_path_factory.mktemp("peft") / "three"
    model.eval().save_pretrained(str(folder))
    return folder, pristine, model


def _ours(peft_folder) -> AdaptedModel:
    folder, pristine, _ = peft_folder
    model = AdaptedModel.from_pretrained(copy.deepcopy(pristine), folder)
    for name in ("b", "c"):
        model.load_adapter(folder / name, name)
    return model


def test_outputs_after_set_adapter_a_list_disable_and_a_mixed_batch_equal_peft(peft_folder):
    _, pristine, theirs = peft_folder
    ours = _ours(peft_folder)
    assert ours.adapters == ["default", "b", "c"]
    assert ours.active_adapters == ["default"]
    base = _out(pristine)

    for active in ("default", "b", "c", ["default", "b"], ["b", "c", "default"]):
        theirs.base_model.set_adapter(active)
        ours.set_adapter(active)
        assert (_out(ours) - base).abs().max() > 1e-3  # the adapter shows
        torch.testing.assert_close(_out(ours), _out(theirs), rtol=1e-5, atol=1e-5)
        with ours.disable_adapter(), theirs.disable_adapter():
            torch.testing.assert_close(_out(ours), base, rtol=0, atol=0)  # exactly the base model
            torch.testing.assert_close(_out(theirs), base, rtol=0, atol=0)
        torch.testing.assert_close(_out(ours), _out(theirs), rtol=1e-5, atol=1e-5)

    names = ["b", "default", "__base__", "b"]  # PEFT refuses DoRA ('c') in a mixed batch
    torch.testing.assert_close(
        _out(ours, adapter_names=names), _out(theirs, adapter_names=names), rtol=1e-5, atol=1e-5
    )
    alone = {}
    for name in ("default", "b"):
        ours.set_adapter(name)
        alone[name] = _out(ours)
    mixed = _out(ours, adapter_names=names)
    for i, name in enumerate(names):  # each sample as if its adapter alone were active
        torch.testing.assert_close(
            mixed[i], base[i] if name == "__base__" else alone[name][i], rtol=1e-6, atol=1e-6
        )


def test_unknown_and_deleted_adapters_are_refused_by_name_and_delete_matches_peft(peft_folder):
    folder, pristine, _ = peft_folder
    ours = _ours(peft_folder)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(folder)).eval()
    for name in ("b", "c"):
        theirs.load_adapter(str(folder / name), adapter_name=name)
    ours.set_adapter(["default", "b"])

    ours.delete_adapter("b")
    theirs.delete_adapter("b")

    assert ours.adapters == ["default", "c"] and ours.active_adapters == ["default"]
    assert not any(".named_adapters.b." in key for key in ours.state_dict())
    for name in ("default", "c"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(_out(ours), _out(theirs), rtol=1e-5, atol=1e-5)
    for call in (
        lambda: ours.set_adapter("b"),
        lambda: ours.set_adapter(["c", "zzz"]),
        lambda: ours.delete_adapter("b"),
        lambda: _out(ours, adapter_names=["c", "b", "c", "c"]),
    ):
        with pytest.raises(
            AdapterError, match=r"no adapter named '(b|zzz)'; this model holds \['default', 'c'\]"
        ):
            call()
    with pytest.raises(AdapterError, match="cannot be deleted"):
        ours.delete_adapter("default")


def test_save_pretrained_writes_peft_multi_adapter_layout_that_peft_reads(tmp_path, peft_folder):
    _, pristine, theirs = peft_folder
    ours = _ours(peft_folder)

    assert ours.save_pretrained(tmp_path / "ours") == {"default": "peft", "b": "peft", "c": "peft"}

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "ours")).eval()
    for name in ("b", "c"):
        loaded.load_adapter(str(tmp_path / "ours" / name), adapter_name=name)
    for name in ("default", "b", "c"):
        loaded.set_adapter(name)
        theirs.base_model.set_adapter(name)
        torch.testing.assert_close(_out(loaded), _out(theirs), rtol=1e-5, atol=1e-5)
    assert ours.save_pretrained(tmp_path / "one", selected_adapters=["c"]) == {"c": "peft"}
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["c"]


def test_only_the_active_adapter_trains_and_the_others_stay_bit_identical(peft_folder):
    ours = _ours(peft_folder).train()
    ours.set_adapter("b")
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".named_adapters.b." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        ours(input_ids=_ids()).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)
    ours.set_adapter(["default", "c"])
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n
        for n in before
        if ".named_adapters.c." in n
        or n.endswith(("adapter_down_proj.weight", "adapter_up_proj.weight"))
        and ".named_adapters." not in n
    }


def test_a_one_adapter_model_keeps_its_keys_repr_and_outputs_after_adding_and_deleting():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = AdaptedModel(net, LoRA, target_layers="0", adapter_kwargs={"rank": 2})
    with torch.no_grad():
        model.adapted_model[0].adapter_up_proj.weight.normal_()
    keys, text, x = list(model.state_dict()), repr(model), torch.randn(4, 6)
    expected = model(x)

    model.add_adapter("other", LoRA, ["0", "2"], adapter_kwargs={"rank": 1})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".named_adapters." in name:
                param.normal_()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # added, inactive
    model.set_adapter("other")
    assert not torch.allclose(model(x), expected)
    model.delete_adapter("other")

    assert list(model.state_dict()) == keys and repr(model) == text
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_add_and_load_adapter_refuse_before_changing_anything(tmp_path, peft_folder):
    ours = _ours(peft_folder)
    keys = list(ours.state_dict())
    with pytest.raises(AdapterError, match="already holds an adapter named 'b'"):
        ours.add_adapter("b", LoRA, "*.query")
    with pytest.raises(AdapterError, match="add_adapter adds LoRA adapters"):
        ours.add_adapter("h", nn.Linear, "*.query")
    with pytest.raises(ValueError, match="'nothing.here' matches no layer"):
        ours.add_adapter("d", LoRA, "nothing.here")
    alien = AdaptedModel(
        nn.Sequential(nn.Linear(16, 16)), LoRA, target_layers="0", adapter_kwargs={"rank": 2}
    )
    alien.save_pretrained(tmp_path / "alien")
    with pytest.raises(PeftConversionError, match=r"adapts layer\(s\) \['0'\] which the model does not have"):
        ours.load_adapter(tmp_path / "alien", "d")
    # Our format, recording rank 2 beside rank-5 tensors: refused when loading, after the branches
    # were built, and rolled back.
    rank5 = AdaptedModel(bert.small_torch_bert(), LoRA, target_layers="*.query", adapter_kwargs={"rank": 5})
    tensors = rank5.trainable_state_dict()
    config = peft_format.ours_config(
        framework="torch",
        adapter_class="LoRA",
        adapter_kwargs={"rank": 2},
        adapted_layers=rank5.replace_layers,
        unfrozen_layers=[],
    )
    peft_format.write_adapter_directory(
        tmp_path / "lying",
        peft=False,
        config=config,
        write_weights=lambda path: save_state_dict_file(tensors, path, {}),
    )
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        ours.load_adapter(tmp_path / "lying", "d")
    assert list(ours.state_dict()) == keys and ours.adapters == ["default", "b", "c"]


def test_add_weighted_adapter_linear_and_cat_and_merge_and_unload_equal_peft(tmp_path, peft_folder):
    _, pristine, peft_model = peft_folder
    theirs = copy.deepcopy(peft_model)
    theirs.add_adapter(
        "d", peft.LoraConfig(r=4, lora_alpha=2, target_modules=["value", "key"], init_lora_weights=False)
    )
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if ".d." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    theirs.save_pretrained(str(tmp_path / "d"), selected_adapters=["d"])
    ours = _ours(peft_folder)
    ours.load_adapter(tmp_path / "d" / "d", "d")

    for new, adapters, weights, kind in (
        ("lin", ["default", "d"], [0.7, -0.4], "linear"),
        ("cat", ["default", "b", "d"], [1.0, 0.5, 2.0], "cat"),
    ):
        theirs.add_weighted_adapter(adapters, weights, new, combination_type=kind)
        ours.add_weighted_adapter(adapters, weights, new, combination_type=kind)
        theirs.set_adapter(new)
        ours.set_adapter(new)
        assert (_out(ours) - _out(pristine)).abs().max() > 1e-3
        torch.testing.assert_close(_out(ours), _out(theirs), rtol=1e-5, atol=1e-5)
    assert ours.named_adapter_specs["cat"]["adapter_kwargs"]["rank"] == 4 + 2 + 4

    with pytest.raises(AdapterError, match="'linear' needs adapters of one rank"):
        ours.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="linear")
    with pytest.raises(AdapterError, match="combination_type 'svd' is not computed"):
        ours.add_weighted_adapter(["default", "d"], [1.0, 1.0], "x")
    with pytest.raises(AdapterError, match="adapter 'c' uses DoRA"):
        ours.add_weighted_adapter(["default", "c"], [1.0, 1.0], "x", combination_type="cat")

    with pytest.raises(MergeError, match="holds the adapters .*merge_and_unload\\(adapter_names"):
        merge_lora(ours)  # would merge the default alone, silently dropping the others
    assert not any(getattr(m, "merged", False) for m in ours.modules())
    merged_theirs = theirs.merge_and_unload(adapter_names=["default", "b", "c"])
    plain = ours.merge_and_unload(adapter_names=["default", "b", "c"])
    assert not any(".lora" in n or "adapter_" in n for n in plain.state_dict())
    assert list(plain.state_dict()) == list(pristine.state_dict())
    torch.testing.assert_close(_out(plain), _out(merged_theirs), rtol=1e-5, atol=1e-5)


def test_hotswap_adapter_replaces_weights_in_place_pads_ranks_and_does_not_recompile(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    expected = {}
    for name, rank, alpha in (("r4", 4, 8), ("r2", 2, 5)):
        peft_model = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0", "2"], init_lora_weights=False),
        )
        peft_model.eval().save_pretrained(str(tmp_path / name))
        expected[name] = peft_model
    x = torch.randn(5, 6)
    ours = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path / "r4")
    params = {n: p for n, p in ours.named_parameters()}
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(ours, backend=counter)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected["r4"](x), rtol=1e-5, atol=1e-5)
        frames = counter.frame_count
        assert frames > 0

        hotswap_adapter(ours, tmp_path / "r2", "default")

        torch.testing.assert_close(compiled(x), expected["r2"](x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == frames  # same parameters, shapes and scaling: no recompilation
    assert all(p is params[n] for n, p in ours.named_parameters())
    with pytest.raises(CheckpointError, match="rank 4, more than adapter 'default'"):
        small = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path / "r2")
        hotswap_adapter(small, tmp_path / "r4", "default")


def test_a_houlsby_default_beside_a_named_lora_switches_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model = AdaptedModel(net, HoulsbyAdapterLinear, target_layers="0", adapter_kwargs={"projection_size": 2})
    model.add_adapter("lora", LoRA, "2", adapter_kwargs={"rank": 2})
    with pytest.raises(AdapterInsertionError, match="layer '0' holds a HoulsbyAdapterLinear"):
        model.add_adapter("more", LoRA, "0")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_" in name:
                param.normal_()
    x = torch.randn(4, 6)
    houlsby, lora = model.adapted_model[0], model.adapted_model[2]
    model.set_adapter("lora")
    torch.testing.assert_close(model(x), lora(torch.relu(houlsby.pretrained_linear(x))), rtol=0, atol=0)
    model.set_adapter("default")
    torch.testing.assert_close(model(x), lora.pretrained_module(torch.relu(houlsby(x))), rtol=0, atol=0)
    model.set_adapter(["default", "lora"])
    expected = model(x)

    assert model.save_pretrained(tmp_path / "both") == {"default": "peft-twins", "lora": "peft"}

    torch.manual_seed(0)
    again = AdaptedModel.from_pretrained(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), tmp_path / "both"
    )
    again.load_adapter(tmp_path / "both" / "lora", "lora")
    again.set_adapter(["default", "lora"])
    torch.testing.assert_close(again(x), expected, rtol=0, atol=0)


def test_a_mixed_batch_as_a_mask_tensor_equals_the_names_and_takes_one_gemm_pair_per_layer(
    peft_folder, monkeypatch
):
    """``adapter_mask`` (what a CUDA graph captures) gives the outputs ``adapter_names`` gives;
    layers of plain LoRA adapters compute every sample's term in one concatenated GEMM pair,
    layers holding DoRA ('c') gather samples per adapter as PEFT does."""
    _, _, theirs = peft_folder
    ours = _ours(peft_folder).eval()
    names = ["b", "__base__", "default", "b"]
    calls = []
    original = LoRA._mixed_delta

    def counted(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoRA, "_mixed_delta", counted)
    mask = ours.adapter_mask(names)
    assert mask.tolist() == [[0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]]
    by_names = _out(ours, adapter_names=names)
    layers_of_default_and_b = len(calls)
    assert layers_of_default_and_b == 2 * 3  # query, key, value of both layers of the small BERT
    by_mask = _out(ours, adapter_mask=mask)
    torch.testing.assert_close(by_mask, by_names, rtol=0, atol=0)
    torch.testing.assert_close(by_names, _out(theirs, adapter_names=names), rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterError, match=r"shape \(batch, 3\)"):
        _out(ours, adapter_mask=mask[:, :2])
    with pytest.raises(TypeError, match="not both"):
        _out(ours, adapter_names=names, adapter_mask=mask)
    ours.train()
    with pytest.raises(AdapterError, match="model.eval"):
        _out(ours, adapter_mask=mask)
