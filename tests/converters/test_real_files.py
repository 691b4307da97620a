"""Conversions of the files people actually have: the real all-MiniLM-L6-v2 ``model.safetensors``.

That file (as most Hugging Face BERT files) holds the buffer ``embeddings.position_ids``, which
is no weight and has no Flax variable: it is named in the report and left out, while every
parameter stays strictly checked.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flax import nnx

import converters
from examples.pretrained import minilm_path
from flax_impl.models import BertConfig, BertModel


@pytest.fixture(scope="module")
def minilm_dir():
    return minilm_path()


def _flax_bert(folder) -> BertModel:
    config = json.loads((folder / "config.json").read_text())
    fields = {k: v for k, v in config.items() if k in BertConfig.__dataclass_fields__}
    return BertModel(BertConfig(**fields), rngs=nnx.Rngs(0))


def test_minilm_file_loads_strictly_into_the_flax_twin_with_its_buffer_named(minilm_dir):
    twin = _flax_bert(minilm_dir)
    from safetensors.numpy import load_file

    weights = load_file(str(minilm_dir / "model.safetensors"))
    report = converters.torch_to_flax(str(minilm_dir / "model.safetensors"), twin)
    assert report.ok and sorted(report.loaded) == sorted(k for k in weights if k != "embeddings.position_ids")
    assert report.notes == ["embeddings.position_ids: buffer (I64) the target does not hold, not converted"]
    kernel = np.asarray(twin.encoder.layer[2].attention.self.query.kernel[...])
    np.testing.assert_array_equal(kernel, weights["encoder.layer.2.attention.self.query.weight"].T)


def test_strict_stays_strict_for_parameters(minilm_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(minilm_dir / "model.safetensors"))
    del weights["encoder.layer.0.output.dense.bias"]  # a parameter, not a buffer
    save_file(weights, str(tmp_path / "broken.safetensors"))
    twin = _flax_bert(minilm_dir)
    before = np.asarray(twin.encoder.layer[0].output.dense.kernel[...]).copy()
    with pytest.raises(converters.ConversionError) as caught:
        converters.torch_to_flax(str(tmp_path / "broken.safetensors"), twin)
    assert caught.value.report.missing == ["encoder.layer.0.output.dense.bias"]
    np.testing.assert_array_equal(np.asarray(twin.encoder.layer[0].output.dense.kernel[...]), before)


def test_a_float_buffer_of_a_torch_model_is_named_not_refused():
    class WithMask(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)
            self.register_buffer("mask", torch.tril(torch.ones(3, 3)))  # a float causal mask

    twin = nnx.Module()
    twin.fc = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    report = converters.torch_to_flax(WithMask(), twin)
    assert report.ok and report.loaded == ["fc.weight", "fc.bias"]
    assert report.notes == ["mask: buffer (F32) the target does not hold, not converted"]
