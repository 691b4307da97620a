"""PEFT adapters made with each LoRA option (lora_dropout, use_rslora, use_dora, embedding targets)
by the real ``peft`` on a real transformers BERT (small config, random weights): imported into both
frameworks they compute what ``PeftModel`` computes, and ours exported load into ``PeftModel``
with the same outputs. Configs PEFT refuses are refused (issue 14, item 11)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flax import nnx

import converters
import flax_impl
import torch_impl
from converters.files import TensorFile
from converters.peft import PeftConversionError, peft_to_adapter_file, read_peft_adapter
from flax_impl.models import BertConfig, BertModel
from tests.equivalence import harness
from tests.zoo import bert
from tests.zoo.pairs import _bert_batch, run_flax_bert, run_torch_bert

from .test_peft import _edit_config, _peft

ATTENTION = ["query", "value"]
OPTIONS = {
    "dropout": {"lora_dropout": 0.2},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "embedding": {"extra": ["word_embeddings"]},
    "rslora-dropout-embedding": {"use_rslora": True, "lora_dropout": 0.1, "extra": ["word_embeddings"]},
    "dora-rslora": {"use_dora": True, "use_rslora": True},
}


@pytest.fixture(scope="module")
def peft():
    return _peft()


def _torch_bert():
    torch.manual_seed(0)
    return bert.small_torch_bert()


def _flax_bert(torch_model):
    flax_model = harness.placeholder(lambda: BertModel(BertConfig(**bert.SMALL_CONFIG), rngs=nnx.Rngs(0)))
    converters.torch_to_flax(torch_model, flax_model)
    return flax_model


def _make_peft(peft, folder, option):
    options = dict(OPTIONS[option])
    targets = ATTENTION + options.pop("extra", [])
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False, **options)
    model = peft.get_peft_model(_torch_bert(), config)
    bert.randomize_peft(model)
    model.eval().save_pretrained(folder)
    batch = _bert_batch(np.random.default_rng(0))
    with torch.no_grad():
        expected = [t.numpy() for t in run_torch_bert(model, batch)]
    return model, batch, expected


@pytest.mark.parametrize("option", list(OPTIONS))
def test_real_peft_adapters_import_into_both_frameworks_with_peft_outputs(peft, tmp_path, option):
    _, batch, expected = _make_peft(peft, tmp_path / "peft", option)
    adapter = read_peft_adapter(tmp_path / "peft")
    kwargs = adapter.adapter_kwargs
    assert kwargs.get("use_dora", False) == OPTIONS[option].get("use_dora", False)
    assert kwargs.get("use_rslora", False) == OPTIONS[option].get("use_rslora", False)
    assert kwargs.get("dropout", 0.0) == OPTIONS[option].get("lora_dropout", 0.0)
    assert kwargs["alpha"] == 6.0  # rsLoRA is carried as itself, not folded into alpha

    torch_adapted, report = converters.import_peft_adapter(tmp_path / "peft", _torch_bert())
    assert not report.missing and not report.unexpected
    with torch.no_grad():
        got = [t.numpy() for t in run_torch_bert(torch_adapted.eval(), batch)]
    harness.assert_close(expected, got, atol=1e-5, rtol=1e-5, what=f"torch {option}")

    flax_adapted, _ = converters.import_peft_adapter(
        tmp_path / "peft", _flax_bert(_torch_bert()), rngs=nnx.Rngs(1)
    )
    flax_adapted.eval()
    got = [np.asarray(t) for t in run_flax_bert(flax_adapted, batch)]
    harness.assert_close(expected, got, atol=1e-5, rtol=1e-5, what=f"flax {option}")


@pytest.mark.parametrize("option", ["rslora-dropout-embedding", "dora-rslora"])
def test_our_adapters_export_to_peft_from_both_frameworks_and_files(peft, tmp_path, option):
    _, batch, expected = _make_peft(peft, tmp_path / "peft", option)
    torch_adapted, _ = converters.import_peft_adapter(tmp_path / "peft", _torch_bert())
    flax_adapted, _ = converters.import_peft_adapter(
        tmp_path / "peft", _flax_bert(_torch_bert()), rngs=nnx.Rngs(1)
    )
    for source, name in ((torch_adapted, "from_torch"), (flax_adapted, "from_flax")):
        config = converters.export_peft_adapter(source, tmp_path / name)
        assert config["use_dora"] == OPTIONS[option].get("use_dora", False)
        assert config["use_rslora"] and config["lora_alpha"] == 6.0
        loaded = peft.PeftModel.from_pretrained(_torch_bert(), tmp_path / name).eval()
        with torch.no_grad():
            got = [t.numpy() for t in run_torch_bert(loaded, batch)]
        harness.assert_close(expected, got, atol=1e-5, rtol=1e-5, what=f"{option} {name}")

    peft_to_adapter_file(tmp_path / "peft", tmp_path / "ours.safetensors")
    with TensorFile(tmp_path / "ours.safetensors") as f:
        recorded = json.loads(f.metadata["adapter_kwargs"])
    assert recorded.get("use_dora", False) == OPTIONS[option].get("use_dora", False)
    converters.export_peft_adapter(tmp_path / "ours.safetensors", tmp_path / "from_file")
    loaded = peft.PeftModel.from_pretrained(_torch_bert(), tmp_path / "from_file").eval()
    with torch.no_grad():
        got = [t.numpy() for t in run_torch_bert(loaded, batch)]
    harness.assert_close(expected, got, atol=1e-5, rtol=1e-5, what=f"{option} from file")

    # The same file loads into both twins built with the recorded options.
    flax_model = flax_impl.AdaptedModel(
        _flax_bert(_torch_bert()),
        flax_impl.LoRA,
        target_layers=json.loads(TensorFile(tmp_path / "ours.safetensors").metadata["target_layers"]),
        adapter_kwargs=recorded,
        rngs=nnx.Rngs(2),
    )
    flax_model.loader(str(tmp_path / "ours.safetensors"))
    flax_model.eval()
    harness.assert_close(
        expected,
        [np.asarray(t) for t in run_flax_bert(flax_model, batch)],
        atol=1e-5,
        rtol=1e-5,
        what="loader",
    )


def test_an_adapted_model_with_other_options_is_refused_naming_both(peft, tmp_path):
    _make_peft(peft, tmp_path / "peft", "dora")
    model = torch_impl.AdaptedModel(
        _torch_bert(),
        torch_impl.LoRA,
        target_layers=["*query", "*value"],
        adapter_kwargs={"rank": 4, "alpha": 6},
    )
    with pytest.raises(PeftConversionError, match="use_dora=False.*use_dora=True"):
        converters.import_peft_adapter(tmp_path / "peft", model)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": "4"}, "r must be a positive integer, got '4'"),
        ({"r": 0}, "r must be a positive integer"),
        ({"lora_alpha": "6"}, "lora_alpha must be a number, got '6'"),
        ({"target_modules": None}, "no target_modules"),
        ({"lora_dropout": 1.5}, "lora_dropout must be a probability"),
        ({"use_dora": "yes"}, "use_dora must be true or false"),
    ],
)
def test_configs_peft_refuses_are_refused_as_bad_values(peft, tmp_path, changes, message):
    _make_peft(peft, tmp_path / "peft", "rslora")
    _edit_config(tmp_path / "peft", **changes)
    with pytest.raises(PeftConversionError, match=message):
        converters.import_peft_adapter(tmp_path / "peft", _torch_bert())
    with pytest.raises(PeftConversionError, match=message):
        peft_to_adapter_file(tmp_path / "peft", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_config_without_target_modules_is_refused_by_peft_too(peft, tmp_path):
    _make_peft(peft, tmp_path / "peft", "rslora")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    del config["target_modules"]
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PeftConversionError, match="no target_modules"):
        converters.import_peft_adapter(tmp_path / "peft", _torch_bert())


def test_dora_on_an_embedding_is_refused_by_name(peft, tmp_path):
    config = peft.LoraConfig(r=2, target_modules=["word_embeddings"], use_dora=True)
    peft.get_peft_model(_torch_bert(), config).save_pretrained(tmp_path / "peft")
    with pytest.raises(
        PeftConversionError, match="'embeddings.word_embeddings' is an embedding adapted with DoRA"
    ):
        converters.import_peft_adapter(tmp_path / "peft", _torch_bert())
