"""``from_pretrained`` on every Flax twin reads what transformers' ``save_pretrained`` writes, without
torch, and returns eval mode (issue 14, item 12; issue 15, item 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# transformers (torch) writes the directories read here; the jax-only CI environment skips.
torch = pytest.importorskip("torch")

from safetensors.numpy import save_file  # noqa: E402

from flax_impl.models import BertModel, HubertModel, Wav2Vec2Model, WavLMModel, WhisperEncoder  # noqa: E402
from tests.equivalence import harness  # noqa: E402
from tests.zoo import bert, speech  # noqa: E402
from twinformat.errors import CheckpointError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _save(model: torch.nn.Module, directory: Path, **kwargs) -> Path:
    model.save_pretrained(str(directory), **kwargs)
    return directory


@pytest.fixture(scope="module")
def wav2vec2_dir(tmp_path_factory):
    torch.manual_seed(0)
    return _save(speech.torch_model("wav2vec2"), tmp_path_factory.mktemp("wav2vec2"))


def _hidden(model, batch):
    return np.asarray(model(batch["input_values"], batch["attention_mask"]))


@pytest.mark.parametrize(
    ("family", "flax_class", "overrides"),
    [
        ("wav2vec2", Wav2Vec2Model, {"feat_extract_norm": "layer", "do_stable_layer_norm": True}),
        ("hubert", HubertModel, {"conv_pos_batch_norm": True}),
        ("wavlm", WavLMModel, {"num_buckets": 16, "max_bucket_distance": 40}),
    ],
)
def test_a_save_pretrained_directory_loads_in_eval_mode_with_transformers_outputs(
    tmp_path, family, flax_class, overrides
):
    torch.manual_seed(0)
    torch_model = speech.torch_model(family, **overrides)
    _save(torch_model, tmp_path)

    model, report = flax_class.from_pretrained(tmp_path, output_loading_info=True)

    assert report.ok and not report.missing
    assert model.encoder.dropout.deterministic  # eval mode: dropout off
    batch = speech.audio_batch(np.random.default_rng(0))
    with torch.no_grad():
        expected = speech.run_torch_masked(torch_model, batch)[0].numpy()
    harness.assert_close([expected], [_hidden(model, batch)], atol=1e-5, rtol=1e-5, what=family)


def test_a_sharded_checkpoint_loads_like_a_single_file(tmp_path, wav2vec2_dir):
    torch.manual_seed(0)
    _save(speech.torch_model("wav2vec2"), tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (
        tmp_path / "model.safetensors"
    ).exists()
    batch = speech.audio_batch(np.random.default_rng(0))

    sharded = Wav2Vec2Model.from_pretrained(tmp_path)
    single = Wav2Vec2Model.from_pretrained(wav2vec2_dir)

    np.testing.assert_array_equal(_hidden(sharded, batch), _hidden(single, batch))


def test_a_model_with_a_head_is_read_under_its_prefix_and_the_head_is_left_out(tmp_path):
    transformers = bert.transformers_module()
    torch.manual_seed(0)
    ctc = transformers.Wav2Vec2ForCTC(speech.torch_config("wav2vec2", vocab_size=12)).eval()
    _save(ctc, tmp_path)

    model, report = Wav2Vec2Model.from_pretrained(tmp_path, output_loading_info=True)

    assert report.ok
    assert any("read the tensors under 'wav2vec2.'" in n for n in report.notes)
    assert any("left out 2 tensor(s) outside this model: lm_head.* (2)" in n for n in report.notes)
    batch = speech.audio_batch(np.random.default_rng(0))
    with torch.no_grad():
        expected = speech.run_torch_masked(ctc.wav2vec2, batch)[0].numpy()
    harness.assert_close([expected], [_hidden(model, batch)], atol=1e-5, rtol=1e-5, what="ctc")


@pytest.mark.parametrize("saved_from", ["WhisperModel", "WhisperForConditionalGeneration"])
def test_whisper_encoder_reads_a_whole_whisper_and_reports_the_decoder_left_out(tmp_path, saved_from):
    transformers = bert.transformers_module()
    torch.manual_seed(0)
    whole = getattr(transformers, saved_from)(transformers.WhisperConfig(**speech.WHISPER_CONFIG)).eval()
    _save(whole, tmp_path)

    model, report = WhisperEncoder.from_pretrained(tmp_path, output_loading_info=True)

    assert report.ok
    left_out = [n for n in report.notes if n.startswith("left out")]
    prefix = "decoder.*" if saved_from == "WhisperModel" else "model.*"
    assert left_out and prefix in left_out[0], report.notes
    features = speech.mel_batch(np.random.default_rng(0))["input_features"]
    with torch.no_grad():
        expected = whole.get_encoder()(torch.from_numpy(features)).last_hidden_state.numpy()
    harness.assert_close([expected], [np.asarray(model(features))], atol=1e-5, rtol=1e-5, what=saved_from)


def test_bert_from_pretrained_returns_eval_mode_and_transformers_outputs(tmp_path):
    transformers = bert.transformers_module()
    torch.manual_seed(0)
    torch_model = transformers.BertModel(transformers.BertConfig(**bert.SMALL_CONFIG)).eval()
    _save(torch_model, tmp_path)
    ids = np.array([[2, 7, 9, 4, 0], [3, 4, 5, 6, 8]])
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])

    model = BertModel.from_pretrained(tmp_path)

    with torch.no_grad():
        expected = torch_model(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state.numpy()
    harness.assert_close(
        [expected], [np.asarray(model(ids, attention_mask=mask))], atol=1e-5, rtol=1e-5, what="bert"
    )
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model(ids)))  # no dropout


def test_weight_norms_older_spelling_is_renamed_with_a_note(tmp_path, wav2vec2_dir):
    from safetensors.numpy import load_file

    tensors = load_file(str(wav2vec2_dir / "model.safetensors"))
    legacy = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in tensors.items()
    }
    save_file(legacy, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((wav2vec2_dir / "config.json").read_text())

    model, report = Wav2Vec2Model.from_pretrained(tmp_path, output_loading_info=True)

    assert report.ok and sum("older spelling" in n for n in report.notes) == 2
    batch = speech.audio_batch(np.random.default_rng(0))
    np.testing.assert_array_equal(
        _hidden(model, batch), _hidden(Wav2Vec2Model.from_pretrained(wav2vec2_dir), batch)
    )


def test_integer_buffers_are_left_out_with_a_note(tmp_path, wav2vec2_dir):
    from safetensors.numpy import load_file

    tensors = load_file(str(wav2vec2_dir / "model.safetensors"))
    save_file(
        {**tensors, "position_ids": np.arange(8, dtype=np.int64)[None]}, str(tmp_path / "model.safetensors")
    )
    (tmp_path / "config.json").write_text((wav2vec2_dir / "config.json").read_text())

    _, report = Wav2Vec2Model.from_pretrained(tmp_path, output_loading_info=True)

    assert report.ok and "position_ids: integer buffer, not a weight, left out" in report.notes


def test_from_pretrained_does_not_import_torch(wav2vec2_dir):
    code = (
        "import sys; from flax_impl.models import Wav2Vec2Model; "
        f"m = Wav2Vec2Model.from_pretrained({str(wav2vec2_dir)!r}); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)

    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_returned(tmp_path, wav2vec2_dir):
    config = json.loads((wav2vec2_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 24}))
    (tmp_path / "model.safetensors").write_bytes((wav2vec2_dir / "model.safetensors").read_bytes())

    with pytest.raises(CheckpointError, match="feed_forward.intermediate_dense.weight"):
        Wav2Vec2Model.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        ("missing", FileNotFoundError, "not a directory"),
        ("no_config", FileNotFoundError, "has no config.json"),
        ("pickle", FileNotFoundError, "pytorch_model.bin, PyTorch's pickle format"),
        ("wrong_type", CheckpointError, "holds a 'hubert' model"),
    ],
)
def test_bad_directories_are_refused_naming_what_is_wrong(tmp_path, wav2vec2_dir, setup, error, message):
    path = tmp_path / "dir"
    if setup != "missing":
        path.mkdir()
    if setup in ("pickle", "wrong_type"):
        config = json.loads((wav2vec2_dir / "config.json").read_text())
        (path / "config.json").write_text(
            json.dumps({**config, "model_type": "hubert"} if setup == "wrong_type" else config)
        )
    if setup == "pickle":
        (path / "pytorch_model.bin").write_bytes(b"not read")
    if setup == "wrong_type":
        (path / "model.safetensors").write_bytes((wav2vec2_dir / "model.safetensors").read_bytes())

    with pytest.raises(error, match=message):
        Wav2Vec2Model.from_pretrained(path)


def test_the_real_minilm_directory_loads_in_eval_mode_matching_transformers():
    from examples.pretrained import minilm_path

    torch_model, tokenizer = bert.load_minilm()
    batch = bert.tokenize(tokenizer)

    model, report = BertModel.from_pretrained(minilm_path(), output_loading_info=True)

    assert report.ok and "embeddings.position_ids: integer buffer, not a weight, left out" in report.notes
    with torch.no_grad():
        expected = torch_model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()
    actual = np.asarray(model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))
    keep = batch["attention_mask"].astype(bool)
    harness.assert_close([expected[keep]], [actual[keep]], atol=1e-5, rtol=1e-5, what="minilm")
