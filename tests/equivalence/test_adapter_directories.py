"""Adapter directories and files cross the twins and PEFT: ``save_pretrained`` in one twin,
``from_pretrained`` (or ``peft.PeftModel.from_pretrained``) in the other, the same outputs; the
recorded adapter is checked across twins; adapter files with unfrozen layers convert with the
CLI from either twin's saver (they record every layer's kind)."""

from __future__ import annotations

import copy
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import converters
import flax_impl
import torch_impl
from flax_impl.models import BertModel as FlaxBert
from tests.zoo import bert

peft = pytest.importorskip("peft")

QV = bert.QUERY_VALUE
UNFROZEN = ["embeddings.LayerNorm", "pooler.dense"]


def _pair() -> tuple[torch.nn.Module, FlaxBert]:
    """A small random transformers BERT and its Flax twin with the same weights, both in eval."""
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


def _randomize_torch(model: torch_impl.AdaptedModel) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def test_flax_lora_directory_loads_in_peft_on_the_torch_twin_with_the_same_outputs(tmp_path):
    torch_bert, flax_bert = _pair()
    flax_model = flax_impl.AdaptedModel(
        flax_bert,
        flax_impl.LoRA,
        target_layers=QV,
        adapter_kwargs={"rank": 4, "alpha": 8.0},
        rngs=nnx.Rngs(1),
    )
    torch_model = torch_impl.AdaptedModel(
        copy.deepcopy(torch_bert), torch_impl.LoRA, target_layers=QV, adapter_kwargs={"rank": 4, "alpha": 8.0}
    )
    _randomize_torch(torch_model)
    converters.torch_to_flax(torch_model, flax_model)  # trained-looking adapters, the same on both sides
    expected = _flax_out(flax_model)

    assert flax_model.save_pretrained(tmp_path / "adapter") == "peft"

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_bert), str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(_torch_out(peft_model), expected, rtol=1e-5, atol=1e-5)
    ours = torch_impl.AdaptedModel.from_pretrained(copy.deepcopy(torch_bert), tmp_path / "adapter").eval()
    np.testing.assert_allclose(_torch_out(ours), expected, rtol=1e-5, atol=1e-5)


def test_torch_directories_load_in_flax_with_the_same_outputs_in_both_formats(tmp_path):
    cases = {
        "peft": dict(adapter_class=torch_impl.LoRA, adapter_kwargs={"rank": 4, "alpha": 8.0}),
        "peft-twins": dict(
            adapter_class=torch_impl.HoulsbyAdapterLinear,
            adapter_kwargs={"projection_size": 3},
            unfrozen_layers=UNFROZEN,
        ),
    }
    for expected_format, kwargs in cases.items():
        torch_bert, flax_bert = _pair()
        torch_model = torch_impl.AdaptedModel(torch_bert, target_layers=QV, **kwargs).eval()
        _randomize_torch(torch_model)

        assert torch_model.save_pretrained(tmp_path / expected_format) == expected_format

        flax_model = flax_impl.AdaptedModel.from_pretrained(
            flax_bert, tmp_path / expected_format, rngs=nnx.Rngs(3)
        )
        assert flax_model.adapter_class.adapter_kind is torch_model.adapter_class.adapter_kind
        assert flax_model.unfrozen_module_names == torch_model.unfrozen_module_names
        np.testing.assert_allclose(_flax_out(flax_model), _torch_out(torch_model), rtol=1e-5, atol=1e-5)


def test_a_torch_file_with_another_alpha_is_refused_by_the_flax_loader(tmp_path):
    torch_bert, flax_bert = _pair()
    torch_model = torch_impl.AdaptedModel(
        torch_bert, torch_impl.LoRA, target_layers=QV, adapter_kwargs={"rank": 4, "alpha": 16}
    )
    torch_model.saver(tmp_path / "a.safetensors")
    flax_model = flax_impl.AdaptedModel(
        flax_bert, flax_impl.LoRA, target_layers=QV, adapter_kwargs={"rank": 4}, rngs=nnx.Rngs(1)
    )

    with pytest.raises(flax_impl.CheckpointError, match="alpha differs"):
        flax_model.loader(tmp_path / "a.safetensors")


def _saved_with_unfrozen_layers(framework: str, path) -> None:
    torch_bert, flax_bert = _pair()
    if framework == "torch":
        model = torch_impl.AdaptedModel(
            torch_bert,
            torch_impl.LoRA,
            target_layers=QV,
            unfrozen_layers=UNFROZEN,
            adapter_kwargs={"rank": 2},
        )
    else:
        model = flax_impl.AdaptedModel(
            flax_bert,
            flax_impl.LoRA,
            target_layers=QV,
            unfrozen_layers=UNFROZEN,
            adapter_kwargs={"rank": 2},
            rngs=nnx.Rngs(1),
        )
    model.saver(path)


@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_adapter_files_with_unfrozen_layers_convert_with_the_cli(tmp_path, framework):
    source = tmp_path / "adapter.safetensors"
    _saved_with_unfrozen_layers(framework, source)

    for target, layout in (("flax.safetensors", "flax"), ("back.safetensors", "torch")):
        origin = source if layout == "flax" else tmp_path / "flax.safetensors"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "converters",
                "convert",
                str(origin),
                str(tmp_path / target),
                "--to",
                layout,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr

    flax_layout = load_file(str(tmp_path / "flax.safetensors"))
    assert flax_layout["adapted_model.pooler.dense.kernel"].shape == (16, 16)
    assert "adapted_model.embeddings.LayerNorm.scale" in flax_layout
    original, back = load_file(str(source)), load_file(str(tmp_path / "back.safetensors"))
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(back[key], value)


# --- every LoRA option PEFT has, on the Flax twin -----------------------------------------------

OPTIONS = bert.PEFT_LORA_OPTIONS


@pytest.mark.parametrize("option", list(OPTIONS))
def test_peft_directories_of_every_option_load_into_the_flax_twin_with_peft_outputs(tmp_path, option):
    peft_options, ours, extra = OPTIONS[option]
    torch_bert, flax_bert = _pair()
    config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["query", "value", *extra], init_lora_weights=False, **peft_options
    )
    peft_model = peft.get_peft_model(copy.deepcopy(torch_bert), config)
    bert.randomize_peft(peft_model)
    peft_model.eval().save_pretrained(str(tmp_path / "peft"))
    expected = _torch_out(peft_model)

    flax_model = flax_impl.AdaptedModel.from_pretrained(flax_bert, tmp_path / "peft", rngs=nnx.Rngs(3))

    assert flax_model.adapter_kwargs == {"rank": 4, "alpha": 6.0, **ours}
    np.testing.assert_allclose(_flax_out(flax_model), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_flax_out(flax_model), _flax_out(flax_model))  # eval mode: no dropout


@pytest.mark.parametrize("option", ["dropout", "rslora", "dora", "embedding", "dora-rslora-dropout"])
def test_flax_save_pretrained_writes_every_lora_option_in_peft_format_and_peft_loads_it(tmp_path, option):
    peft_options, ours, extra = OPTIONS[option]
    kwargs = {"rank": 4, "alpha": 6.0, **ours}
    targets = [*QV, "embeddings.word_embeddings"] if extra else QV
    torch_bert, flax_bert = _pair()
    torch_model = torch_impl.AdaptedModel(
        copy.deepcopy(torch_bert), torch_impl.LoRA, target_layers=targets, adapter_kwargs=kwargs
    )
    _randomize_torch(torch_model)
    flax_model = flax_impl.AdaptedModel(
        flax_bert, flax_impl.LoRA, target_layers=targets, adapter_kwargs=kwargs, rngs=nnx.Rngs(1)
    )
    converters.torch_to_flax(torch_model, flax_model)  # trained-looking adapters, the same on both sides
    flax_model.eval()
    expected = _flax_out(flax_model)

    assert flax_model.save_pretrained(tmp_path / "adapter") == "peft"

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_bert), str(tmp_path / "adapter"))
    np.testing.assert_allclose(_torch_out(peft_model), expected, rtol=1e-5, atol=1e-5)
    again = flax_impl.AdaptedModel.from_pretrained(_pair()[1], tmp_path / "adapter", rngs=nnx.Rngs(4))
    assert again.adapter_kwargs == flax_model.adapter_kwargs
    np.testing.assert_allclose(_flax_out(again), expected, rtol=1e-6, atol=1e-6)
    torch_again = torch_impl.AdaptedModel.from_pretrained(copy.deepcopy(torch_bert), tmp_path / "adapter")
    np.testing.assert_allclose(_torch_out(torch_again), expected, rtol=1e-5, atol=1e-5)
