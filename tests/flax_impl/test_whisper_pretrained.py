"""``from_pretrained`` of the Whisper twins: transformers ``save_pretrained`` directories (single and
sharded, with and without the tied ``proj_out.weight``) read without torch, in eval mode."""

from __future__ import annotations

import numpy as np
import pytest

# transformers (torch) builds the references: the jax-only CI environment skips this file.
torch = pytest.importorskip("torch")
from safetensors.numpy import load_file, save_file  # noqa: E402

from flax_impl import CheckpointError  # noqa: E402
from flax_impl.models import WhisperForConditionalGeneration, WhisperModel  # noqa: E402
from tests.zoo import whisper  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch_model = whisper.torch_model(seed=11)
    directory = tmp_path_factory.mktemp("whisper")
    torch_model.save_pretrained(directory)
    features = whisper.features(seed=11)
    with torch.no_grad():
        logits = torch_model(
            torch.from_numpy(features),
            decoder_input_ids=torch.from_numpy(whisper.DECODER_IDS),
            decoder_attention_mask=torch.from_numpy(whisper.DECODER_MASK),
        ).logits.numpy()
    return torch_model, directory, features, logits


def _logits(model, features):
    return np.asarray(model(features, whisper.DECODER_IDS, whisper.DECODER_MASK))


def test_a_generation_directory_loads_in_eval_mode_with_transformers_logits(saved):
    _, directory, features, expected = saved
    assert "proj_out.weight" not in load_file(directory / "model.safetensors")  # transformers drops the tie

    model, report = WhisperForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    assert report.ok and model.model.decoder.layers[0].self_attn.deterministic
    np.testing.assert_allclose(_logits(model, features), expected, atol=1e-5, rtol=1e-5)


def test_a_file_holding_proj_out_loads_when_equal_and_is_refused_when_not(saved, tmp_path):
    _, directory, features, expected = saved
    tensors = load_file(directory / "model.safetensors")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    save_file(
        {**tensors, "proj_out.weight": tensors["model.decoder.embed_tokens.weight"]},
        tmp_path / "model.safetensors",
    )
    model, report = WhisperForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert any("proj_out.weight" in note for note in report.notes)
    np.testing.assert_allclose(_logits(model, features), expected, atol=1e-5, rtol=1e-5)

    different = tensors["model.decoder.embed_tokens.weight"] + 1.0
    save_file({**tensors, "proj_out.weight": different}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="proj_out.weight"):
        WhisperForConditionalGeneration.from_pretrained(tmp_path)


def test_a_sharded_directory_and_whisper_model_under_the_model_prefix(saved, tmp_path):
    torch_model, _, features, _ = saved
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = WhisperForConditionalGeneration.from_pretrained(tmp_path)
    base, report = WhisperModel.from_pretrained(tmp_path, output_loading_info=True)

    with torch.no_grad():
        hidden = torch_model.model(
            torch.from_numpy(features), decoder_input_ids=torch.from_numpy(whisper.DECODER_IDS)
        ).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(base(features, whisper.DECODER_IDS)), hidden, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(model.model(features, whisper.DECODER_IDS)),
        np.asarray(base(features, whisper.DECODER_IDS)),
    )
    assert any("'model.'" in note for note in report.notes)
