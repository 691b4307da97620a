"""``AdaptedModel.save_pretrained`` / ``from_pretrained`` (PEFT's directory format where it can
represent the adapter, ours otherwise), the recorded adapter checked by ``loader``, and the
attributes ``__getattr__`` no longer hands to the wrapped model. Real transformers BERT (small
config, random init) and the real ``peft`` package."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tests.zoo import bert
from torch_impl import AdaptedModel, CheckpointError, HoulsbyAdapterLinear, LoRA
from twinformat.errors import PeftConversionError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL_BERT = bert.SMALL_CONFIG
QV = bert.QUERY_VALUE


def _bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig(**SMALL_BERT)).eval()


def _ids() -> torch.Tensor:
    return torch.arange(2 * 7).reshape(2, 7) % SMALL_BERT["vocab_size"]


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).last_hidden_state


def _randomize(model: AdaptedModel, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _adapted_bert(**kwargs) -> tuple[AdaptedModel, nn.Module]:
    """An adapted BERT with trained-looking adapters, and an untouched copy of its base."""
    base = _bert()
    pristine = copy.deepcopy(base)
    kwargs.setdefault("adapter_kwargs", {"rank": 4, "alpha": 8.0})
    kwargs.setdefault("target_layers", QV)
    model = AdaptedModel(base, kwargs.pop("adapter_class", LoRA), **kwargs).eval()
    _randomize(model)
    return model, pristine


def test_lora_save_pretrained_writes_a_peft_directory_that_peft_loads_with_the_same_outputs(tmp_path):
    model, pristine = _adapted_bert()
    expected = _out(model)
    assert (expected - _out(pristine)).abs().max() > 1e-2  # the adapters change the output

    assert model.save_pretrained(tmp_path / "adapter") == "peft"

    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_out(peft_model), expected, rtol=1e-6, atol=1e-6)
    ours = AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "adapter").eval()
    assert ours.adapter_kwargs == {"rank": 4, "alpha": 8.0}
    assert sorted(ours.replace_layers) == sorted(model.replace_layers)
    torch.testing.assert_close(_out(ours), expected, rtol=0, atol=0)


def test_from_pretrained_loads_a_directory_saved_by_peft_itself(tmp_path):
    base = _bert()
    pristine = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(base, config).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    expected = _out(peft_model)
    peft_model.save_pretrained(str(tmp_path / "from_peft"))

    ours = AdaptedModel.from_pretrained(pristine, tmp_path / "from_peft").eval()

    assert ours.adapter_kwargs == {"rank": 4, "alpha": 16.0}
    torch.testing.assert_close(_out(ours), expected, rtol=1e-6, atol=1e-6)


def test_houlsby_with_unfrozen_layers_saves_our_format_and_round_trips(tmp_path):
    model, pristine = _adapted_bert(
        adapter_class=HoulsbyAdapterLinear,
        adapter_kwargs={"projection_size": 3},
        unfrozen_layers=["pooler.dense", "embeddings.LayerNorm"],
    )
    expected = _out(model)

    assert model.save_pretrained(tmp_path / "houlsby") == "peft-twins"

    assert sorted(p.name for p in (tmp_path / "houlsby").iterdir()) == [
        "adapters.safetensors",
        "peft_twins_adapter.json",
    ]
    again = AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "houlsby").eval()
    assert again.adapter_class is HoulsbyAdapterLinear
    assert again.unfrozen_module_names == model.unfrozen_module_names
    torch.testing.assert_close(_out(again), expected, rtol=0, atol=0)
    # the same file is what saver writes: loader reads it too
    third = AdaptedModel(
        copy.deepcopy(pristine),
        HoulsbyAdapterLinear,
        target_layers=QV,
        unfrozen_layers=["pooler.dense", "embeddings.LayerNorm"],
        adapter_kwargs={"projection_size": 3},
    ).eval()
    third.loader(tmp_path / "houlsby" / "adapters.safetensors")
    torch.testing.assert_close(_out(third), expected, rtol=0, atol=0)


class _Convs(nn.Module):
    def __init__(self, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, dilation=dilation)
        self.head = nn.Conv1d(6, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(-1))


def test_conv_lora_goes_through_peft_and_a_dilated_conv_falls_back_to_our_format(tmp_path):
    x = torch.randn(2, 3, 9, 9)
    for dilation, expected_format in ((1, "peft"), (2, "peft-twins")):
        torch.manual_seed(0)
        base = _Convs(dilation)
        pristine = copy.deepcopy(base)
        model = AdaptedModel(base, LoRA, all_conv=True, adapter_kwargs={"rank": 2, "alpha": 3.0})
        _randomize(model)
        folder = tmp_path / f"dilation{dilation}"
        assert model.save_pretrained(folder) == expected_format
        again = AdaptedModel.from_pretrained(copy.deepcopy(pristine), folder)
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
        if expected_format == "peft":
            peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(folder))
            torch.testing.assert_close(peft_model(x), model(x), rtol=1e-6, atol=1e-6)


def test_saving_again_in_the_other_format_replaces_the_directory_whole(tmp_path):
    lora, pristine = _adapted_bert()
    lora.save_pretrained(tmp_path / "adapter")
    houlsby = AdaptedModel(
        copy.deepcopy(pristine), HoulsbyAdapterLinear, target_layers=QV, adapter_kwargs={"projection_size": 2}
    )
    houlsby.save_pretrained(tmp_path / "adapter")

    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapters.safetensors",
        "peft_twins_adapter.json",
    ]
    assert (
        AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "adapter").adapter_class
        is HoulsbyAdapterLinear
    )


def test_a_refused_from_pretrained_leaves_the_base_model_as_it_was(tmp_path):
    model, pristine = _adapted_bert()
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])  # mis-shaped
    save_file(tensors, str(weights), {"format": "pt"})
    base = copy.deepcopy(pristine)
    keys, flags = list(base.state_dict()), [p.requires_grad for p in base.parameters()]

    with pytest.raises(CheckpointError, match="mis-shaped"):
        AdaptedModel.from_pretrained(base, tmp_path / "adapter")

    assert list(base.state_dict()) == keys
    assert [p.requires_grad for p in base.parameters()] == flags
    torch.testing.assert_close(_out(base), _out(pristine), rtol=0, atol=0)


def test_getattr_does_not_hand_save_or_load_attributes_to_the_wrapped_model(tmp_path):
    model, _ = _adapted_bert()

    for name in ("push_to_hub", "get_adapter_state_dict", "enable_adapters"):
        assert not hasattr(model, name), name
        with pytest.raises(AttributeError, match="adapted_model." + name):
            getattr(model, name)
    for name in ("load_adapter", "add_adapter", "set_adapter"):  # ours now (named adapters, PEFT's meaning)
        assert getattr(model, name).__func__ is getattr(AdaptedModel, name), name
    assert model.config is model.adapted_model.config  # everything else still falls through
    assert model.get_input_embeddings() is model.adapted_model.embeddings.word_embeddings
    # save_pretrained is ours: the directory holds the adapters, not 47 keys of the whole model
    model.save_pretrained(tmp_path / "adapter")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 2 * 2 * SMALL_BERT["num_hidden_layers"]


def test_loader_refuses_a_file_recorded_with_another_alpha_and_names_both(tmp_path):
    model, pristine = _adapted_bert(adapter_kwargs={"rank": 4, "alpha": 16})
    model.saver(tmp_path / "a.safetensors")
    default_alpha = AdaptedModel(copy.deepcopy(pristine), LoRA, target_layers=QV, adapter_kwargs={"rank": 4})

    with pytest.raises(
        CheckpointError,
        match=r"LoRA\(alpha=16, dropout=0.0, rank=4, .*\) but this model has LoRA\(alpha=1.0, dropout=0.0, rank=4, .*alpha differs \(file 16, model 1.0\)",
    ):
        default_alpha.loader(tmp_path / "a.safetensors")
    houlsby = AdaptedModel(
        copy.deepcopy(pristine), HoulsbyAdapterLinear, target_layers=QV, adapter_kwargs={"projection_size": 4}
    )
    with pytest.raises(CheckpointError, match="holds LoRA adapters but this model has HoulsbyAdapterLinear"):
        houlsby.loader(tmp_path / "a.safetensors")

    same = AdaptedModel(
        copy.deepcopy(pristine), LoRA, target_layers=QV, adapter_kwargs={"rank": 4, "alpha": 16.0}
    )
    same.eval().loader(tmp_path / "a.safetensors")  # 16 and 16.0 are the same alpha
    torch.testing.assert_close(_out(same), _out(model), rtol=0, atol=0)


def test_loader_still_loads_speechbrains_files_which_record_nothing(tmp_path):
    from tests.conftest import import_speechbrain_adapters

    try:
        sb = import_speechbrain_adapters()
    except ImportError as exc:  # a torch-only environment without SpeechBrain
        pytest.skip(f"SpeechBrain is not installed: {exc}")
    torch.manual_seed(0)
    sb_model = sb.AdaptedModel(_bert(), sb.LoRA, target_layers=QV, adapter_kwargs={"rank": 4, "alpha": 16})
    _randomize(sb_model)
    sb_model.saver(str(tmp_path / "sb.ckpt"))

    ours = AdaptedModel(_bert(), LoRA, target_layers=QV, adapter_kwargs={"rank": 4, "alpha": 16}).eval()
    ours.loader(tmp_path / "sb.ckpt")

    torch.testing.assert_close(_out(ours), _out(sb_model.eval()), rtol=0, atol=0)


def test_a_bare_linear_adapted_at_the_root_round_trips_in_our_format(tmp_path):
    torch.manual_seed(0)
    base = nn.Linear(4, 3)
    pristine = copy.deepcopy(base)
    model = AdaptedModel(base, LoRA, all_linear=True, adapter_kwargs={"rank": 2})
    _randomize(model)
    x = torch.randn(2, 4)

    assert model.save_pretrained(tmp_path / "root") == "peft-twins"  # PEFT cannot target the root
    again = AdaptedModel.from_pretrained(pristine, tmp_path / "root")

    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


# --- every LoRA option PEFT has: DoRA, dropout, rsLoRA, embeddings, uniform patterns ------------

PEFT_OPTIONS = bert.PEFT_LORA_OPTIONS  # name -> (PEFT options, our adapter_kwargs, extra targets)


def _peft_directory(folder, option: str, **changes) -> tuple[nn.Module, torch.Tensor]:
    """A PEFT adapter made by peft itself on the small BERT, trained-looking (random factors,
    magnitudes scaled off their initial norms); returns the untouched base and PEFT's outputs."""
    peft_options, _, extra = PEFT_OPTIONS[option]
    pristine = _bert()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["query", "value", *extra],
        init_lora_weights=False,
        **{**peft_options, **changes},
    )
    peft_model = peft.get_peft_model(copy.deepcopy(pristine), config)
    bert.randomize_peft(peft_model)
    peft_model.eval().save_pretrained(str(folder))
    return pristine, _out(peft_model)


@pytest.mark.parametrize("option", list(PEFT_OPTIONS))
def test_from_pretrained_reads_every_peft_lora_option_with_peft_outputs(tmp_path, option):
    pristine, expected = _peft_directory(tmp_path / "peft", option)
    _, ours_kwargs, extra = PEFT_OPTIONS[option]
    loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "peft"))

    ours = AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "peft")

    assert not any(m.training for m in ours.modules())  # eval mode, as PeftModel.from_pretrained
    assert ours.adapter_kwargs == {"rank": 4, "alpha": 6.0, **ours_kwargs}
    assert len(ours.replace_layers) == 2 * SMALL_BERT["num_hidden_layers"] + len(extra)
    torch.testing.assert_close(_out(ours), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_out(loaded_by_peft), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("option", ["dropout", "rslora", "dora", "embedding", "dora-rslora-dropout"])
def test_save_pretrained_writes_every_lora_option_in_peft_format_and_peft_loads_it(tmp_path, option):
    peft_options, ours_kwargs, extra = PEFT_OPTIONS[option]
    model, pristine = _adapted_bert(
        adapter_kwargs={"rank": 4, "alpha": 6.0, **ours_kwargs},
        **({"target_layers": [*QV, "embeddings.word_embeddings"]} if extra else {}),
    )
    expected = _out(model)

    assert model.save_pretrained(tmp_path / "adapter") == "peft"

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    defaults = {"lora_dropout": 0.0, "use_rslora": False, "use_dora": False}
    assert {k: config[k] for k in defaults} == {**defaults, **peft_options}
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "adapter"))
    torch.testing.assert_close(_out(peft_model), expected, rtol=1e-5, atol=1e-5)
    again = AdaptedModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "adapter")
    assert again.adapter_kwargs == model.adapter_kwargs
    torch.testing.assert_close(_out(again), expected, rtol=0, atol=0)


class _ScaledEmbeddingNet(nn.Module):
    """A Gemma-3 scaled word embedding (transformers' own class) before a Linear."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

        self.embed = Gemma3TextScaledWordEmbedding(10, 4, padding_idx=0, embed_scale=2.0)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class _TiedNet(nn.Module):
    """An embedding and an output head sharing one weight (a language model's tied embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.embed(ids)))


def _peft_on(base: nn.Module, folder, **config) -> None:
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, **config)).save_pretrained(str(folder))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("dora-embedding", "'embeddings.word_embeddings' is an embedding adapted with DoRA"),
        ("pissa", "init_lora_weights='pissa' rewrites the base weights"),
        ("tied-modules-to-save", "module 'head' .*shares 'weight' with 'embed.weight' \\(tied weights\\)"),
        ("dilated-conv", "layer 'conv' is a conv with dilation \\(2, 2\\).*PEFT's LoRA conv has dilation 1"),
        ("scaled-embedding", "layer 'embed' is a scaled embedding.*embed_scale"),
    ],
)
def test_peft_directories_our_lora_cannot_compute_are_refused_before_the_base_changes(
    tmp_path, case, message
):
    folder = tmp_path / case
    if case == "dilated-conv":
        base = _Convs(dilation=2)
        _peft_on(base, folder, target_modules=["conv", "head"])
    elif case == "scaled-embedding":
        base = _ScaledEmbeddingNet()
        _peft_on(base, folder, target_modules=["embed", "head"])
    elif case == "tied-modules-to-save":  # PEFT trains an untied copy of the head; ours would move both
        base = _TiedNet()
        _peft_on(base, folder, target_modules=["mid"], modules_to_save=["head"])
    else:
        base = _bert()
        kwargs = {
            "dora-embedding": {"target_modules": ["word_embeddings"], "use_dora": True},
            "pissa": {"target_modules": ["query"]},
        }[case]
        _peft_on(base, folder, **kwargs)
        if case == "pissa":  # what a PiSSA adapter's config says; peft would rewrite the base on load
            config = json.loads((folder / "adapter_config.json").read_text())
            (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    modules = [(n, type(m)) for n, m in base.named_modules()]

    with pytest.raises(PeftConversionError, match=message):
        AdaptedModel.from_pretrained(base, folder)

    assert [(n, type(m)) for n, m in base.named_modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    assert all(p.requires_grad for p in base.parameters())


def test_save_pretrained_keeps_a_scaled_embedding_out_of_peft_format(tmp_path):
    torch.manual_seed(0)
    base = _ScaledEmbeddingNet()
    pristine = copy.deepcopy(base)
    model = AdaptedModel(base, LoRA, target_layers=["embed"], adapter_kwargs={"rank": 2})
    _randomize(model)
    ids = torch.tensor([[1, 2, 3], [4, 0, 9]])

    assert model.save_pretrained(tmp_path / "scaled") == "peft-twins"  # PEFT would scale the adapter
    again = AdaptedModel.from_pretrained(pristine, tmp_path / "scaled")
    torch.testing.assert_close(again(ids), model.eval()(ids), rtol=0, atol=0)
