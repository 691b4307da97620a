"""``from_pretrained`` of the LLM twins reads what transformers' ``save_pretrained`` writes, without
torch, tied embeddings included; the model without a head reads a causal-LM directory under
``model.``, its ``lm_head`` left out and noted."""

from __future__ import annotations

import numpy as np
import pytest

# transformers (torch) builds the references: the jax-only CI environment skips this file.
torch = pytest.importorskip("torch")

from flax_impl.models.gemma3 import Gemma3ForCausalLM, Gemma3TextModel  # noqa: E402
from flax_impl.models.llama import LlamaForCausalLM, LlamaModel  # noqa: E402
from tests.zoo import llm  # noqa: E402
from twinformat.errors import CheckpointError  # noqa: E402


def _saved(variant: str, tmp_path) -> tuple[torch.nn.Module, str]:
    model = llm.torch_model(variant)
    model.save_pretrained(tmp_path)
    return model, str(tmp_path)


@pytest.mark.parametrize(
    ("variant", "twin"), [("llama", LlamaForCausalLM), ("gemma3", Gemma3ForCausalLM)], ids=["untied", "tied"]
)
def test_a_transformers_directory_loads_with_the_same_logits(variant, twin, tmp_path):
    torch_model, path = _saved(variant, tmp_path)
    ids = llm.token_batch()["input_ids"]
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(ids)).logits.numpy()

    model, report = twin.from_pretrained(path, output_loading_info=True)

    assert report.ok and not report.missing
    np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=2e-5, rtol=1e-5)
    assert model.model.layers[0].self_attn.deterministic  # eval mode, as transformers returns it


@pytest.mark.parametrize(("variant", "twin"), [("llama", LlamaModel), ("gemma3", Gemma3TextModel)])
def test_the_model_without_a_head_reads_a_causal_lm_directory_under_model(variant, twin, tmp_path):
    torch_model, path = _saved(variant, tmp_path)
    ids = llm.token_batch()["input_ids"]
    with torch.no_grad():
        expected = torch_model.model(torch.from_numpy(ids)).last_hidden_state.numpy()

    model, report = twin.from_pretrained(path, output_loading_info=True)

    assert any("model." in note for note in report.notes)
    np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=2e-5, rtol=1e-5)


def test_bfloat16_is_asked_for_with_dtype(tmp_path):
    _, path = _saved("llama", tmp_path)
    import jax.numpy as jnp

    model = LlamaForCausalLM.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)

    assert model.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    assert model.model.embed_tokens.embedding[...].dtype == jnp.bfloat16


def test_a_directory_of_another_family_is_refused_naming_both(tmp_path):
    _, path = _saved("qwen3", tmp_path)
    with pytest.raises(CheckpointError, match="'qwen3'.*'llama'"):
        LlamaForCausalLM.from_pretrained(path)
