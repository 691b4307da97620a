"""A transformers LLM converts to its Flax twin and back with the library alone: the PyTorch bridge
knows transformers' own RMSNorm classes (``LlamaRMSNorm``, ..., ``Gemma3RMSNorm``) as the
``rms_norm`` kind without any registration by the user, and the command line converts a
``save_pretrained`` file both ways."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import converters  # noqa: E402
from tests.zoo import llm  # noqa: E402
from torch_impl.interchange import layer_kind  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_every_norm_of_a_transformers_llm_has_the_rms_norm_kind(family):
    torch_model = llm.torch_model(family)
    norms = [name for name, m in torch_model.named_modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(layer_kind(dict(torch_model.named_modules())[n]) == "rms_norm" for n in norms)
    assert layer_kind(torch.nn.Linear(2, 2, bias=False)) == "linear"  # a 2-d weight is no norm


def test_a_llama_converts_to_flax_and_back_bit_exact_through_the_command_line(tmp_path):
    torch_model = llm.torch_model("llama")
    torch_model.save_pretrained(str(tmp_path / "hf"))
    source = tmp_path / "hf" / "model.safetensors"
    like = ["--like", "flax_impl.models:LlamaForCausalLM", "--config", str(tmp_path / "hf" / "config.json")]
    for args in (
        ["convert", source, tmp_path / "flax.safetensors", "--to", "flax", *like],
        ["convert", tmp_path / "flax.safetensors", tmp_path / "back.safetensors", "--to", "torch"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "converters", *map(str, args)], capture_output=True, text=True, cwd=ROOT
        )
        assert result.returncode == 0, result.stderr
    from converters.files import TensorFile

    with TensorFile(source) as original, TensorFile(tmp_path / "back.safetensors") as back:
        for name in original.names:
            np.testing.assert_array_equal(back.get(name), original.get(name), err_msg=name)
    assert converters.torch_to_flax(torch_model, llm.flax_model("llama")).ok
