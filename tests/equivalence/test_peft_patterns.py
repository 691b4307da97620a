"""PEFT directories beyond one rank: ``rank_pattern``/``alpha_pattern`` (layers of different ranks
and alphas) and ``modules_to_save`` (our unfrozen layers), read and written by both twins'
``AdaptedModel.from_pretrained``/``save_pretrained`` with PEFT's outputs; and what a directory we
write keeps for PEFT (issue #20): the user's ``target_modules``, the base model's name, the
``task_type``, and PEFT's ``auto_mapping`` so that ``peft.AutoPeftModel`` loads it. Real
``peft`` and transformers BERT (small config, random init, every factor and saved module
perturbed)."""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx

import converters
import flax_impl
import torch_impl
from flax_impl.models import BertModel as FlaxBert
from tests.zoo import bert
from twinformat import peft_format
from twinformat.errors import CheckpointError, MergeError

peft = pytest.importorskip("peft")

QV = bert.QUERY_VALUE
#: Layer 0's query at rank 2, every value at alpha 3, the rest at r=4, alpha=6; the embeddings'
#: LayerNorm trained whole (it shows in the last hidden state on both twins).
PATTERNS = dict(
    r=4,
    lora_alpha=6,
    target_modules=["query", "value"],
    rank_pattern={"layer.0.attention.self.query": 2},
    alpha_pattern={"value": 3},
    modules_to_save=["embeddings.LayerNorm"],
)
LAYER_KWARGS = {
    "encoder.layer.0.attention.self.query": {"rank": 2},
    "encoder.layer.0.attention.self.value": {"alpha": 3.0},
    "encoder.layer.1.attention.self.value": {"alpha": 3.0},
}


def _pair() -> tuple[torch.nn.Module, FlaxBert]:
    torch.manual_seed(0)
    torch_bert = bert.small_torch_bert()
    flax_bert = FlaxBert(torch_bert.config, rngs=nnx.Rngs(0))
    converters.torch_to_flax(torch_bert, flax_bert)
    flax_bert.eval()
    return torch_bert, flax_bert


def _ids() -> np.ndarray:
    return (np.arange(2 * 7).reshape(2, 7) % bert.SMALL_CONFIG["vocab_size"]).astype(np.int64)


def _torch_out(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(_ids())).last_hidden_state.numpy()


def _flax_out(model: nnx.Module) -> np.ndarray:
    return np.asarray(model(jnp.asarray(_ids())))


def _peft_directory(folder, torch_bert, **config) -> np.ndarray:
    """Save a PEFT adapter made by peft itself, every factor and saved module perturbed; returns
    PEFT's outputs."""
    peft_model = peft.get_peft_model(
        copy.deepcopy(torch_bert), peft.LoraConfig(init_lora_weights=False, **config)
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.eval().save_pretrained(str(folder))
    return _torch_out(peft_model)


def _config(folder) -> dict:
    return json.loads((folder / peft_format.PEFT_CONFIG_NAME).read_text())


def test_torch_reads_rank_alpha_patterns_and_modules_to_save_and_writes_them_back_for_peft(tmp_path):
    torch_bert, _ = _pair()
    expected = _peft_directory(tmp_path / "peft", torch_bert, task_type="FEATURE_EXTRACTION", **PATTERNS)

    ours = torch_impl.AdaptedModel.from_pretrained(copy.deepcopy(torch_bert), tmp_path / "peft")

    assert ours.adapter_kwargs == {"rank": 4, "alpha": 6.0}
    assert ours.layer_adapter_kwargs == LAYER_KWARGS
    assert ours.unfrozen_module_names == ["embeddings.LayerNorm"]
    assert ours.adapted_model.encoder.layer[0].attention.self.query.adapter_down_proj.weight.shape == (2, 16)
    np.testing.assert_allclose(_torch_out(ours), expected, rtol=1e-5, atol=1e-5)

    assert ours.save_pretrained(tmp_path / "again") == "peft"

    written, read = _config(tmp_path / "again"), _config(tmp_path / "peft")
    for key in ("target_modules", "rank_pattern", "alpha_pattern", "modules_to_save", "task_type", "r"):
        assert written[key] == read[key], key
    assert set(peft_format.read_peft_directory(tmp_path / "again").config) >= {"peft_type", "lora_alpha"}
    again = peft.PeftModel.from_pretrained(copy.deepcopy(torch_bert), str(tmp_path / "again")).eval()
    np.testing.assert_allclose(_torch_out(again), expected, rtol=1e-5, atol=1e-5)


def test_flax_reads_rank_alpha_patterns_and_modules_to_save_and_writes_them_back_for_peft(tmp_path):
    torch_bert, flax_bert = _pair()
    expected = _peft_directory(tmp_path / "peft", torch_bert, **PATTERNS)

    ours = flax_impl.AdaptedModel.from_pretrained(flax_bert, tmp_path / "peft", rngs=nnx.Rngs(3))

    assert ours.layer_adapter_kwargs == LAYER_KWARGS
    assert ours.unfrozen_module_names == ["embeddings.LayerNorm"]
    np.testing.assert_allclose(_flax_out(ours), expected, rtol=1e-5, atol=1e-5)

    assert ours.save_pretrained(tmp_path / "again") == "peft"

    written, read = _config(tmp_path / "again"), _config(tmp_path / "peft")
    assert (written["target_modules"], written["rank_pattern"]) == (
        read["target_modules"],
        read["rank_pattern"],
    )
    assert sorted(written["target_modules"]) == ["query", "value"]  # as given, not a regex of every layer
    again = peft.PeftModel.from_pretrained(copy.deepcopy(torch_bert), str(tmp_path / "again")).eval()
    np.testing.assert_allclose(_torch_out(again), expected, rtol=1e-5, atol=1e-5)


def test_per_layer_ranks_built_by_hand_cross_to_peft_with_exact_names_and_back_to_flax(tmp_path):
    torch_bert, flax_bert = _pair()
    model = torch_impl.AdaptedModel(
        copy.deepcopy(torch_bert),
        torch_impl.LoRA,
        target_layers=QV,
        unfrozen_layers="pooler.dense",
        adapter_kwargs={"rank": 4, "alpha": 8.0},
        manual_adapter_insertion=True,
    )
    model.layer_adapter_kwargs = {"encoder.layer.1.attention.self.value": {"rank": 3, "alpha": 2.0}}
    model.insert_adapters()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    model.eval()

    assert model.save_pretrained(tmp_path / "peft") == "peft"

    config = _config(tmp_path / "peft")
    assert config["rank_pattern"] == {r"encoder\.layer\.1\.attention\.self\.value": 3}
    assert config["alpha_pattern"] == {r"encoder\.layer\.1\.attention\.self\.value": 2.0}
    assert config["target_modules"] == peft_format.glob_regex(QV)  # the user's patterns, as PEFT reads them
    assert config["modules_to_save"] == ["pooler.dense"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_bert), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        ids = torch.from_numpy(_ids())
        ours, theirs = model(input_ids=ids), loaded(input_ids=ids)
    torch.testing.assert_close(theirs.pooler_output, ours.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.last_hidden_state, ours.last_hidden_state, rtol=1e-5, atol=1e-5)
    flax_model = flax_impl.AdaptedModel.from_pretrained(flax_bert, tmp_path / "peft", rngs=nnx.Rngs(2))
    np.testing.assert_allclose(_flax_out(flax_model), _torch_out(model), rtol=1e-5, atol=1e-5)


def test_per_layer_kwargs_cross_in_our_format_where_peft_cannot_hold_the_model(tmp_path):
    torch_bert, flax_bert = _pair()
    model = torch_impl.AdaptedModel(
        copy.deepcopy(torch_bert),
        torch_impl.LoRA,
        target_layers=QV,
        unfrozen_layers="encoder.layer.0.attention.self",  # holds adapted layers: not modules_to_save
        adapter_kwargs={"rank": 4},
        manual_adapter_insertion=True,
    )
    model.layer_adapter_kwargs = {"encoder.layer.0.attention.self.query": {"rank": 2, "alpha": 5.0}}
    model.insert_adapters()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1)
    model.eval()

    assert model.save_pretrained(tmp_path / "ours") == "peft-twins"

    again = torch_impl.AdaptedModel.from_pretrained(copy.deepcopy(torch_bert), tmp_path / "ours")
    assert again.layer_adapter_kwargs == model.layer_adapter_kwargs
    np.testing.assert_array_equal(_torch_out(again), _torch_out(model))
    flax_model = flax_impl.AdaptedModel.from_pretrained(flax_bert, tmp_path / "ours", rngs=nnx.Rngs(2))
    np.testing.assert_allclose(_flax_out(flax_model), _torch_out(model), rtol=1e-5, atol=1e-5)


def test_a_directory_saved_from_a_local_bert_loads_with_auto_peft_model_from_either_twin(tmp_path):
    torch_bert, flax_base = _pair()
    torch_bert.save_pretrained(tmp_path / "base")
    transformers = bert.transformers_module()
    base = transformers.BertModel.from_pretrained(tmp_path / "base").eval()
    model = torch_impl.AdaptedModel(base, torch_impl.LoRA, target_layers=QV, adapter_kwargs={"rank": 2})
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2)
    model.eval()

    model.save_pretrained(tmp_path / "torch")

    config = _config(tmp_path / "torch")
    assert config["base_model_name_or_path"] == str(tmp_path / "base")  # transformers recorded the path
    assert config["auto_mapping"]["base_model_class"] == "BertModel"
    auto = peft.AutoPeftModel.from_pretrained(str(tmp_path / "torch")).eval()
    np.testing.assert_allclose(_torch_out(auto), _torch_out(model), rtol=1e-5, atol=1e-5)

    flax_model = flax_impl.AdaptedModel(
        flax_base, flax_impl.LoRA, target_layers=QV, adapter_kwargs={"rank": 2}, rngs=nnx.Rngs(0)
    )
    converters.torch_to_flax(model, flax_model)
    flax_model.save_pretrained(
        tmp_path / "flax", base_model_name_or_path=str(tmp_path / "base"), task_type="FEATURE_EXTRACTION"
    )
    config = _config(tmp_path / "flax")
    assert (config["task_type"], "auto_mapping" in config) == ("FEATURE_EXTRACTION", False)
    auto = peft.AutoPeftModelForFeatureExtraction.from_pretrained(str(tmp_path / "flax")).eval()
    np.testing.assert_allclose(_torch_out(auto), _flax_out(flax_model), rtol=1e-5, atol=1e-5)


def test_saver_records_per_layer_alphas_and_loader_and_file_merge_refuse_what_would_scale_wrongly(tmp_path):
    """A model from a PEFT directory with ``alpha_pattern`` (value layers at alpha 3, same rank)
    writes its per-layer options into the ``saver`` file; a model built with the model-wide
    kwargs only refuses it (it would load and scale the value layers by 6/4 instead of 3/4), the
    model with the patterns loads it in either twin, and a file merge, which applies one
    scaling, refuses it."""
    torch_bert, flax_bert = _pair()
    config = {k: v for k, v in PATTERNS.items() if k != "modules_to_save"}
    _peft_directory(tmp_path / "peft", torch_bert, **config)
    ours = torch_impl.AdaptedModel.from_pretrained(copy.deepcopy(torch_bert), tmp_path / "peft")
    ours.saver(str(tmp_path / "ours.safetensors"))
    with open(tmp_path / "ours.safetensors", "rb") as handle:
        header = handle.read(20000)
    assert b"layer_adapter_kwargs" in header

    plain = torch_impl.AdaptedModel(
        copy.deepcopy(torch_bert), torch_impl.LoRA, target_layers=QV, adapter_kwargs={"rank": 4, "alpha": 6.0}
    )
    with pytest.raises(
        CheckpointError, match=r"layer 'encoder.layer.0.attention.self.query' was saved with \{'rank': 2\}"
    ):
        plain.loader(str(tmp_path / "ours.safetensors"))
    again = torch_impl.AdaptedModel.from_pretrained(copy.deepcopy(torch_bert), tmp_path / "peft")
    again.loader(str(tmp_path / "ours.safetensors"))
    np.testing.assert_array_equal(_torch_out(again), _torch_out(ours))
    # Or built by hand with the per-layer options the refusal names, in either twin.
    built = {
        "target_layers": ours.replace_layers,
        "adapter_kwargs": ours.adapter_kwargs,
        "layer_adapter_kwargs": ours.layer_adapter_kwargs,
    }
    by_hand = torch_impl.AdaptedModel(copy.deepcopy(torch_bert), torch_impl.LoRA, **built)
    by_hand.loader(str(tmp_path / "ours.safetensors"))
    np.testing.assert_array_equal(_torch_out(by_hand), _torch_out(ours))
    flax_model = flax_impl.AdaptedModel(flax_bert, flax_impl.LoRA, **built, rngs=nnx.Rngs(2))
    flax_model.loader(str(tmp_path / "ours.safetensors"))
    np.testing.assert_allclose(_flax_out(flax_model), _torch_out(ours), rtol=1e-5, atol=1e-5)

    base_file = tmp_path / "base.safetensors"
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in torch_bert.state_dict().items()}, str(base_file)
    )
    with pytest.raises(MergeError, match="per-layer ranks or alphas"):
        converters.merge_adapter_file(
            str(base_file), str(tmp_path / "ours.safetensors"), str(tmp_path / "m.safetensors")
        )
    assert not (tmp_path / "m.safetensors").exists()
