"""Gemma 3's multimodal checkpoints (``Gemma3ForConditionalGeneration``, gemma-3-4b and up) in the
Flax text twins: ``from_pretrained`` reads the language model in either key spelling (transformers'
module names ``model.language_model.*``, or the hub files' ``language_model.model.*``, which
transformers 5 writes back), single file or sharded, leaves the vision tower and projector out,
and computes the multimodal model's text logits; a PEFT LoRA on the language model loads and is
written back in the names it came with, one that reaches into the vision tower is refused."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

# transformers and PEFT (torch) build the references: the jax-only CI environment skips this file.
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from safetensors.numpy import load_file, save_file  # noqa: E402

import converters  # noqa: E402
from flax_impl import AdaptedModel, LoRA  # noqa: E402
from flax_impl.models.gemma3 import (  # noqa: E402
    MULTIMODAL_LAYOUTS,
    Gemma3ForCausalLM,
    Gemma3TextModel,
    gemma3_config,
)
from tests.zoo import llm  # noqa: E402
from tests.zoo.bert import randomize_peft  # noqa: E402
from twinformat.errors import PeftConversionError  # noqa: E402

transformers = llm.transformers
TEXT = {**llm.BASE, **llm.VARIANTS["gemma3"][1]}  # the zoo's Gemma 3: local/global, softcap, linear RoPE
VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)
#: A LoRA on the language model alone, as one trains on the multimodal model (["q_proj", "v_proj"]
#: would also adapt the vision tower's q_proj and v_proj).
LANGUAGE_ONLY = r".*language_model.*\.(q_proj|v_proj)"
ATOL = RTOL = 1e-5

# Each spelling from transformers' module names (the "modules" spelling) and back.
_HUB = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")]
_HUB += [(f"model.{part}.", f"{part}.") for part in ("vision_tower", "multi_modal_projector")]


def _spelled(name: str, spelling: str, prefix: str = "") -> str:
    """``name`` (transformers' module names, under ``prefix``) in ``spelling``."""
    for modules, hub in _HUB:
        if spelling == "hub" and name.startswith(prefix + modules):
            return prefix + hub + name[len(prefix + modules) :]
    return name


def _in_modules_spelling(name: str, prefix: str = "") -> str:
    for modules, hub in _HUB:
        if name.startswith(prefix + hub):
            return prefix + modules + name[len(prefix + hub) :]
    return name


def _respell(file: str, spelling: str, prefix: str = "") -> list[str]:
    """Rewrite the safetensors ``file`` with its keys in ``spelling`` (whatever transformers
    wrote); returns the new keys."""
    tensors = load_file(file)
    out = {_spelled(_in_modules_spelling(k, prefix), spelling, prefix): v for k, v in tensors.items()}
    save_file(out, file, {"format": "pt"})
    return sorted(out)


def _multimodal(tie: bool = True) -> torch.nn.Module:
    config = transformers.Gemma3Config(
        text_config=TEXT, vision_config=VISION, mm_tokens_per_image=1, tie_word_embeddings=tie
    )
    torch.manual_seed(0)
    return llm.randomize(transformers.Gemma3ForConditionalGeneration(config).eval())


def _logits(model: torch.nn.Module, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
        )
    return out.logits.numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The multimodal model, its logits on the zoo's batch, and its directories: one file in
    each spelling, and transformers' sharded save."""
    model = _multimodal()
    batch = llm.token_batch()
    directories = {}
    for spelling in ("modules", "hub"):
        directory = tmp_path_factory.mktemp(spelling)
        model.save_pretrained(directory)
        keys = _respell(str(directory / "model.safetensors"), spelling)
        assert any(
            k.startswith("model.vision_tower." if spelling == "modules" else "vision_tower.") for k in keys
        )
        directories[spelling] = directory
    directories["sharded"] = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(directories["sharded"], max_shard_size="20KB")
    index = json.loads((directories["sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    return model, batch, _logits(model, batch), directories


def _assert_logits(expected: np.ndarray, model, batch, what: str) -> None:
    """Every position of the unpadded row, the real positions of the left-padded one."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.astype(bool)
    actual = np.asarray(model(ids, mask))
    assert real[0].all() and not real[1].all()  # one row without padding, one left-padded
    np.testing.assert_allclose(actual[real], expected[real], atol=ATOL, rtol=RTOL, err_msg=what)


@pytest.mark.parametrize("copy", ["modules", "hub", "sharded"])
def test_the_text_twin_reads_a_multimodal_directory_with_its_text_logits(saved, copy):
    _, batch, expected, directories = saved

    model, report = Gemma3ForCausalLM.from_pretrained(directories[copy], output_loading_info=True)

    assert report.ok, report.describe()
    left_out = next(note for note in report.notes if note.startswith("left out"))
    assert "vision_tower.* (" in left_out and "multi_modal_projector.* (" in left_out, report.notes
    assert any("Gemma3ForConditionalGeneration" in note for note in report.notes)
    assert model.peft_layout == MULTIMODAL_LAYOUTS["modules"]  # PEFT names the layers so
    _assert_logits(expected, model, batch, copy)


def test_the_model_without_a_head_reads_the_language_models_decoder(saved):
    torch_model, batch, _, directories = saved
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = torch_model.model.language_model(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state.numpy()

    model, report = Gemma3TextModel.from_pretrained(directories["hub"], output_loading_info=True)

    real = mask.astype(bool)
    assert report.ok and any("language_model.model.* as the root" in note for note in report.notes)
    np.testing.assert_allclose(np.asarray(model(ids, mask))[real], expected[real], atol=ATOL, rtol=RTOL)


def test_an_untied_head_is_read_from_the_language_models_lm_head(tmp_path):
    torch_model = _multimodal(tie=False)
    torch_model.save_pretrained(tmp_path)
    keys = _respell(str(tmp_path / "model.safetensors"), "hub")
    assert "language_model.lm_head.weight" in keys
    batch = llm.token_batch(seed=1)

    model = Gemma3ForCausalLM.from_pretrained(tmp_path)

    assert not model.config.tie_word_embeddings and hasattr(model, "lm_head")
    _assert_logits(_logits(torch_model, batch), model, batch, "untied")


def test_the_constructor_reads_a_multimodal_config_through_its_text_config(saved):
    torch_model, _, _, directories = saved
    config = json.loads((directories["hub"] / "config.json").read_text())
    assert config["model_type"] == "gemma3" and "vision_config" in config

    from_dict = nnx.eval_shape(lambda: Gemma3ForCausalLM(config, rngs=nnx.Rngs(0))).config

    # The same text model, but for the final softcapping, which the multimodal model does not apply.
    text = gemma3_config(torch_model.config.text_config)
    assert text.final_logit_softcapping == 5.0 and from_dict.final_logit_softcapping is None
    assert from_dict == dataclasses.replace(text, final_logit_softcapping=None)
    assert from_dict == gemma3_config(torch_model.config)  # the transformers object, too
    assert not gemma3_config(
        {**config, "tie_word_embeddings": False}
    ).tie_word_embeddings  # the top level ties


def _peft_directory(torch_model, directory, target_modules, spelling: str = "modules") -> list[str]:
    """A PEFT LoRA (random factors) on the multimodal model, saved; its keys in ``spelling``."""
    peft_model = peft.get_peft_model(
        torch_model,
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=target_modules, init_lora_weights=False),
    )
    randomize_peft(peft_model).eval()
    peft_model.save_pretrained(directory)
    return _respell(str(directory / "adapter_model.safetensors"), spelling, prefix="base_model.model.")


@pytest.mark.parametrize("spelling", ["modules", "hub"])
def test_a_peft_lora_on_the_language_model_loads_and_is_written_back_in_its_names(saved, spelling, tmp_path):
    torch_model, batch, _, directories = saved
    keys = _peft_directory(llm.fresh_copy(torch_model), tmp_path / "peft", LANGUAGE_ONLY, spelling)
    expected = _logits(
        peft.PeftModel.from_pretrained(llm.fresh_copy(torch_model), tmp_path / "peft").eval(), batch
    )

    base = Gemma3ForCausalLM.from_pretrained(directories["hub"])
    adapted = AdaptedModel.from_pretrained(base, tmp_path / "peft", rngs=nnx.Rngs(0))

    assert sorted(adapted.replace_layers) == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qv"
    ]
    assert base.peft_layout == MULTIMODAL_LAYOUTS[spelling]
    _assert_logits(expected, adapted, batch, f"PEFT, {spelling} spelling")

    assert adapted.save_pretrained(tmp_path / "flax") == "peft"
    assert sorted(load_file(str(tmp_path / "flax" / "adapter_model.safetensors"))) == keys
    written = json.loads((tmp_path / "flax" / "adapter_config.json").read_text())
    assert written["target_modules"] == LANGUAGE_ONLY
    again = peft.PeftModel.from_pretrained(llm.fresh_copy(torch_model), tmp_path / "flax").eval()
    np.testing.assert_array_equal(_logits(again, batch), expected)

    adapted.load_adapter(tmp_path / "peft", "second", rngs=nnx.Rngs(1))  # a named adapter: the same names
    adapted.set_adapter("second")
    _assert_logits(expected, adapted, batch, f"load_adapter, {spelling} spelling")


def test_a_peft_lora_reaching_into_the_vision_tower_is_refused_by_name(saved, tmp_path):
    torch_model, _, _, directories = saved
    keys = _peft_directory(llm.fresh_copy(torch_model), tmp_path / "peft", ["q_proj", "v_proj"])
    assert any(".vision_tower." in key for key in keys)
    base = Gemma3ForCausalLM.from_pretrained(directories["modules"])
    before = jax.tree.map(np.asarray, nnx.state(base, nnx.Param))

    message = r"adapts \['model\.vision_tower\.[^']*_proj'.*Gemma3ForCausalLM holds the language model only"
    with pytest.raises(PeftConversionError, match=message):
        AdaptedModel.from_pretrained(base, tmp_path / "peft", rngs=nnx.Rngs(0))

    assert type(base.model.layers[0].self_attn.q_proj) is nnx.Linear  # nothing was changed
    assert base.peft_layout == MULTIMODAL_LAYOUTS["modules"]
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(base, nnx.Param)))


def test_a_lora_made_on_the_flax_twin_of_a_multimodal_directory_is_written_for_peft(saved, tmp_path):
    torch_model, batch, _, directories = saved
    base = Gemma3ForCausalLM.from_pretrained(directories["hub"])
    adapted = AdaptedModel(
        base,
        LoRA,
        target_layers="model.layers.*.self_attn.q_proj",
        adapter_kwargs={"rank": 2},
        rngs=nnx.Rngs(1),
    )
    params = nnx.state(adapted, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(0), 16))
    for path, variable in nnx.to_flat_state(params):  # a zero up factor would hide a wrong name
        if "adapter_" in ".".join(map(str, path)):
            variable.set_value(0.3 * jax.random.normal(next(keys), variable.get_value().shape))
    nnx.update(adapted, params)
    adapted.eval()
    expected = np.asarray(adapted(batch["input_ids"], batch["attention_mask"]))

    assert adapted.save_pretrained(tmp_path / "flax") == "peft"

    written = sorted(load_file(str(tmp_path / "flax" / "adapter_model.safetensors")))
    assert written and all(k.startswith("base_model.model.model.language_model.layers.") for k in written)
    config = json.loads((tmp_path / "flax" / "adapter_config.json").read_text())
    assert config["auto_mapping"]["base_model_class"] == "Gemma3ForConditionalGeneration"
    assert re.fullmatch(config["target_modules"], "model.language_model.layers.0.self_attn.q_proj")
    again = peft.PeftModel.from_pretrained(llm.fresh_copy(torch_model), tmp_path / "flax").eval()
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(_logits(again, batch)[real], expected[real], atol=ATOL, rtol=RTOL)
    # The converters' export of the model writes the same names and tensors (it reads the layout).
    converters.export_peft_adapter(adapted, tmp_path / "converters")
    exported = load_file(str(tmp_path / "converters" / "adapter_model.safetensors"))
    assert sorted(exported) == written
    flax_written = load_file(str(tmp_path / "flax" / "adapter_model.safetensors"))
    assert all(np.array_equal(exported[k], flax_written[k]) for k in written)
