"""``--rename`` on peft-import, peft-export and merge, with the real PEFT and transformers: a PEFT
LoRA trained on Gemma 3's multimodal model (``Gemma3ForConditionalGeneration``, its language model
under ``model.language_model.*``) becomes a file the Flax text twin (``model.*``) loads with
``loader()``, comes back as a directory ``PeftModel`` loads on the multimodal model, and merges into
the hub spelling's checkpoint (``language_model.model.*``), each with PeftModel's logits; a rule
that matches no module is a one-line error naming it, and nothing is written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flax import nnx

# transformers and PEFT (torch) build the references: the jax-only CI environment skips this file.
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from safetensors.numpy import load_file  # noqa: E402

from converters.files import TensorFile  # noqa: E402
from flax_impl import AdaptedModel, LoRA  # noqa: E402
from flax_impl.models.gemma3 import Gemma3ForCausalLM  # noqa: E402
from tests.converters.test_cli import _one_line_error, run_cli, run_main  # noqa: E402
from tests.flax_impl.test_gemma3_multimodal import (  # noqa: E402
    LANGUAGE_ONLY,
    _assert_logits,
    _logits,
    _multimodal,
)
from tests.zoo import llm  # noqa: E402
from tests.zoo.bert import randomize_peft  # noqa: E402
from twinformat.errors import CheckpointError  # noqa: E402
from twinformat.format import parse_metadata  # noqa: E402

TO_TWIN = ("--rename", "model.language_model.*", "model.*")
TO_MULTIMODAL = ("--rename", "model.*", "model.language_model.*")
#: PEFT LoRAs on the multimodal model's language model (a bare ["q_proj", "v_proj"] would also
#: adapt the vision tower's).
VARIANTS = {
    "q_proj, v_proj": dict(target_modules=LANGUAGE_ONLY),
    "DoRA on every linear layer, rank_pattern, alpha_pattern": dict(
        target_modules=r".*language_model.*\.(q|k|v|o|gate|up|down)_proj",
        use_dora=True,
        rank_pattern={"o_proj": 3},
        alpha_pattern={"down_proj": 8.0},
    ),
}


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """The multimodal model (every parameter drawn), the zoo's batch, and its saved directory."""
    model = _multimodal()
    directory = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(directory)
    keys = load_file(str(directory / "model.safetensors"))
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys  # transformers 5: the hub spelling
    return model, llm.token_batch(), directory


@pytest.fixture(scope="module")
def peft_dirs(multimodal, tmp_path_factory):
    """``{variant: (PEFT directory, PeftModel's logits)}``, every LoRA factor and DoRA magnitude drawn."""
    model, batch, _ = multimodal
    base_logits = _logits(model, batch)
    out = {}
    for variant, options in VARIANTS.items():
        config = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **options)
        peft_model = randomize_peft(peft.get_peft_model(llm.fresh_copy(model), config)).eval()
        folder = tmp_path_factory.mktemp("peft")
        peft_model.save_pretrained(folder)
        keys = load_file(str(folder / "adapter_model.safetensors"))
        assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys), sorted(keys)[
            :4
        ]
        out[variant] = folder, _logits(peft_model, batch)
        assert not np.allclose(out[variant][1], base_logits, atol=1e-2)  # every check sees the adapter
    return out


def _imported(folder, path) -> None:
    result = run_main("peft-import", folder, path, *TO_TWIN)
    assert result.returncode == 0, result.stderr
    assert "renamed " in result.stdout and " -> model.layers.0." in result.stdout, result.stdout


def _twin_with_adapter_file(directory, path) -> AdaptedModel:
    """The Flax text twin of ``directory`` with LoRA where the adapter file says (its recorded
    target layers, kwargs and per-layer kwargs), loaded by ``loader()``."""
    with TensorFile(path) as f:
        metadata = parse_metadata(f.metadata)
    adapted = AdaptedModel(
        Gemma3ForCausalLM.from_pretrained(directory),
        LoRA,
        target_layers=metadata["target_layers"],
        adapter_kwargs=metadata["adapter_kwargs"],
        layer_adapter_kwargs=json.loads(metadata.get("layer_adapter_kwargs", "{}")),
        rngs=nnx.Rngs(0),
    )
    adapted.loader(str(path))
    adapted.eval()
    return adapted


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_import_rename_writes_a_file_the_flax_text_twin_loads_with_peftmodels_logits(
    multimodal, peft_dirs, variant, tmp_path
):
    _, batch, directory = multimodal
    folder, expected = peft_dirs[variant]

    _imported(folder, tmp_path / "ours.safetensors")

    with TensorFile(tmp_path / "ours.safetensors") as f:
        names, metadata = f.names, parse_metadata(f.metadata)
    assert all(name.startswith("adapted_model.model.layers.") for name in names), names[:4]
    assert all(layer.startswith("model.layers.") for layer in metadata["target_layers"])
    if "rank_pattern" in VARIANTS[variant]:  # the per-layer ranks and alphas follow their layers
        per_layer = json.loads(metadata["layer_adapter_kwargs"])
        assert per_layer["model.layers.0.self_attn.o_proj"] == {"rank": 3}
        assert per_layer["model.layers.2.mlp.down_proj"] == {"alpha": 8.0}
    _assert_logits(
        expected, _twin_with_adapter_file(directory, tmp_path / "ours.safetensors"), batch, variant
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_export_rename_writes_what_peftmodel_loads_on_the_multimodal_model(
    multimodal, peft_dirs, variant, tmp_path
):
    model, batch, _ = multimodal
    folder, expected = peft_dirs[variant]
    _imported(folder, tmp_path / "ours.safetensors")

    result = run_main("peft-export", tmp_path / "ours.safetensors", tmp_path / "back", *TO_MULTIMODAL)

    assert result.returncode == 0, result.stderr
    original = load_file(str(folder / "adapter_model.safetensors"))
    written = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert sorted(written) == sorted(original)  # PEFT's own keys, every tensor bit for bit
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    again = peft.PeftModel.from_pretrained(llm.fresh_copy(model), tmp_path / "back").eval()
    np.testing.assert_allclose(_logits(again, batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source", ["PEFT directory", "our file in the text twin's names"])
def test_merge_rename_folds_a_multimodal_peft_lora_into_the_hub_spelling_with_peftmodels_logits(
    multimodal, peft_dirs, source, tmp_path
):
    _, batch, directory = multimodal
    folder, expected = peft_dirs["q_proj, v_proj"]
    if source == "PEFT directory":
        adapter, rule = folder, ("model.language_model.*", "language_model.model.*")
    else:
        adapter, rule = tmp_path / "ours.safetensors", ("model.*", "language_model.model.*")
        _imported(folder, adapter)
    merged = tmp_path / "merged"
    merged.mkdir()
    shutil.copy(directory / "config.json", merged)

    result = run_main(
        "merge", directory / "model.safetensors", adapter, merged / "model.safetensors", "--rename", *rule
    )

    assert result.returncode == 0, result.stderr
    assert "renamed 6 of 6 modules" in result.stdout
    _assert_logits(expected, Gemma3ForCausalLM.from_pretrained(merged), batch, f"merged from the {source}")


@pytest.mark.parametrize("command", ["peft-import", "peft-export", "merge"])
def test_a_rename_rule_matching_no_module_is_a_one_line_error_naming_it_and_nothing_is_written(
    multimodal, peft_dirs, command, tmp_path
):
    _, _, directory = multimodal
    folder, _ = peft_dirs["q_proj, v_proj"]
    ours = tmp_path / "ours.safetensors"
    _imported(folder, ours)
    output = tmp_path / "out"
    # A rule that takes every module, then one left with none to match.
    args, rule = {
        "peft-import": ([folder, f"{output}.safetensors", *TO_TWIN], "model.language_model.layer.*"),
        "peft-export": ([ours, output, *TO_MULTIMODAL], "model.layer.*"),
        "merge": (
            [
                directory / "model.safetensors",
                folder,
                f"{output}.safetensors",
                "--rename",
                "model.*",
                "language_model.model.*",
            ],
            "model.language_model.layer.*",
        ),
    }[command]

    result = run_cli(command, *args, "--rename", rule, "x.*")

    _one_line_error(result, f"rename pattern {rule!r} matches no module name. Some names are: 'model.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors"]


def test_a_file_imported_without_rename_is_refused_by_the_twins_loader_naming_the_rename(
    multimodal, peft_dirs, tmp_path
):
    _, _, directory = multimodal
    folder, _ = peft_dirs["q_proj, v_proj"]
    path = tmp_path / "multimodal_names.safetensors"
    assert run_main("peft-import", folder, path).returncode == 0
    adapted = AdaptedModel(
        Gemma3ForCausalLM.from_pretrained(directory),
        LoRA,
        target_layers="model.layers.*.self_attn.[qv]_proj",
        adapter_kwargs={"rank": 2, "alpha": 4},
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(CheckpointError, match=r"--rename 'model\.language_model\.\*' 'model\.\*'"):
        adapted.loader(str(path))
