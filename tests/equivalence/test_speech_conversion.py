"""Speech checkpoints cross between transformers and the Flax twins exactly: from the model, from a
file, from the command line; weight norm in both spellings; adapter checkpoints both ways,
including one saved from SpeechBrain's real ``Wav2Vec2`` lobe, whose keys sit under ``model.``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import converters
import flax_impl
import torch_impl
from flax_impl.interchange import model_state
from tests.zoo import speech

from . import harness

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = [
    pytest.param("wav2vec2", {}, id="wav2vec2"),
    pytest.param("hubert", {"conv_pos_batch_norm": True}, id="hubert-batch-norm"),
    pytest.param("wavlm", {"num_buckets": 16, "max_bucket_distance": 40}, id="wavlm"),
]
#: SpeechBrain's rename rule: its Wav2Vec2 lobe keeps the transformers model at ``self.model``.
SPEECHBRAIN_RENAME = [("adapted_model.model.*", "adapted_model.*")]


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return harness.torch_state_dict(model)


def _flax_twin(family: str, overrides: dict, seed: int = 1) -> nnx.Module:
    model = harness.placeholder(
        lambda: speech.flax_model(family, speech.torch_config(family, **overrides), nnx.Rngs(seed))
    )
    model.eval()
    return model


def _flax_hidden(model: nnx.Module, batch: dict) -> np.ndarray:
    return np.asarray(model(batch["input_values"], batch["attention_mask"]))


def _torch_hidden(model: torch.nn.Module, batch: dict) -> np.ndarray:
    with torch.no_grad():
        return speech.run_torch_masked(model, batch)[0].numpy()


def _assert_same_bits(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    assert sorted(expected) == sorted(actual)
    changed = [
        k for k in expected if not np.array_equal(expected[k].view(np.uint8), actual[k].view(np.uint8))
    ]
    assert not changed, f"bits changed: {changed}"


@pytest.mark.parametrize(("family", "overrides"), FAMILIES)
def test_model_to_model_both_ways_is_bit_exact_weight_norm_included(family, overrides):
    torch.manual_seed(0)
    source = speech.torch_model(family, **overrides)
    flax_model = _flax_twin(family, overrides)

    report = converters.torch_to_flax(source, flax_model)
    torch.manual_seed(1)
    target = speech.torch_model(family, **overrides)
    converters.flax_to_torch(flax_model, target)

    assert any(k.endswith("parametrizations.weight.original0") for k in report.loaded) != (
        "conv_pos_batch_norm" in overrides
    )
    expected = {k: v for k, v in _state(source).items() if not k.endswith("num_batches_tracked")}
    _assert_same_bits(expected, {k: v for k, v in _state(target).items() if k in expected})
    batch = speech.audio_batch(np.random.default_rng(0))
    harness.assert_close(
        [_torch_hidden(source, batch)], [_flax_hidden(flax_model, batch)], atol=1e-5, rtol=1e-5, what=family
    )


def test_a_transformers_file_converts_to_flax_and_back_through_files(tmp_path):
    torch.manual_seed(0)
    source = speech.torch_model("wav2vec2")
    path = tmp_path / "wav2vec2.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in _state(source).items()}, str(path))
    flax_model = _flax_twin("wav2vec2", {})

    converters.torch_to_flax(str(path), flax_model)
    converters.save_torch_layout(flax_model, str(tmp_path / "back.safetensors"))

    _assert_same_bits(load_file(str(path)), load_file(str(tmp_path / "back.safetensors")))


def test_the_cli_converts_with_kinds_written_from_the_twin_bit_exact(tmp_path):
    torch.manual_seed(0)
    source = speech.torch_model("wavlm", num_buckets=16, max_bucket_distance=40)
    path, flax_path, back = (
        tmp_path / "torch.safetensors",
        tmp_path / "flax.safetensors",
        tmp_path / "back.safetensors",
    )
    save_file({k: np.ascontiguousarray(v) for k, v in _state(source).items()}, str(path))
    flax_model = _flax_twin("wavlm", {"num_buckets": 16, "max_bucket_distance": 40})
    kinds = tmp_path / "kinds.json"
    kinds.write_text(json.dumps(model_state(flax_model).kinds))

    def cli(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "converters", "convert", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr

    cli(str(path), str(flax_path), "--to", "flax", "--kinds", str(kinds), "--no-progress")
    cli(str(flax_path), str(back), "--to", "torch", "--no-progress")

    _assert_same_bits(load_file(str(path)), load_file(str(back)))
    flax_file = load_file(str(flax_path))
    assert flax_file["encoder.pos_conv_embed.conv.parametrizations.weight.weight_v"].shape == (16, 4, 16)
    converters.torch_to_flax(str(flax_path), flax_model)
    batch = speech.audio_batch(np.random.default_rng(0))
    harness.assert_close(
        [_torch_hidden(source, batch)], [_flax_hidden(flax_model, batch)], atol=1e-5, rtol=1e-5, what="cli"
    )


def test_weight_norms_older_spelling_converts_with_one_rename_rule_each_way(tmp_path):
    torch.manual_seed(0)
    source = speech.torch_model("hubert")
    legacy = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in _state(source).items()
    }
    assert "encoder.pos_conv_embed.conv.weight_g" in legacy
    path = tmp_path / "legacy.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in legacy.items()}, str(path))
    flax_model = _flax_twin("hubert", {})
    to_new = [
        ("*.weight_g", "*.parametrizations.weight.original0"),
        ("*.weight_v", "*.parametrizations.weight.original1"),
    ]

    converters.torch_to_flax(str(path), flax_model, rename=to_new)
    torch.manual_seed(1)
    target = speech.torch_model("hubert")
    converters.flax_to_torch(flax_model, target)

    _assert_same_bits(_state(source), _state(target))


def _adapted_pair(seed: int = 0):
    torch.manual_seed(seed)
    torch_model = speech.torch_model("wav2vec2")
    flax_model = _flax_twin("wav2vec2", {})
    converters.torch_to_flax(torch_model, flax_model)
    targets = ["encoder.layers.*.attention.[qv]_proj", "feature_extractor.conv_layers.0.conv"]
    kwargs = dict(
        target_layers=targets,
        unfrozen_layers=["encoder.layer_norm"],
        adapter_kwargs={"rank": 2, "alpha": 4.0},
    )
    torch_adapted = torch_impl.AdaptedModel(torch_model, torch_impl.LoRA, **kwargs).eval()
    flax_adapted = flax_impl.AdaptedModel(flax_model, flax_impl.LoRA, **kwargs, rngs=nnx.Rngs(3))
    flax_adapted.eval()
    return torch_adapted, flax_adapted


def test_an_adapter_checkpoint_saved_in_torch_loads_in_flax_and_the_reverse(tmp_path):
    torch_adapted, flax_adapted = _adapted_pair()
    harness.randomize_adapters(torch_adapted, seed=5)
    with torch.no_grad():
        torch_adapted.adapted_model.encoder.layer_norm.weight.mul_(1.5)
    batch = speech.audio_batch(np.random.default_rng(0))

    torch_adapted.saver(str(tmp_path / "torch.safetensors"))
    flax_adapted.loader(str(tmp_path / "torch.safetensors"))
    harness.assert_close(
        [_torch_hidden(torch_adapted, batch)],
        [_flax_hidden(flax_adapted, batch)],
        atol=1e-5,
        rtol=1e-5,
        what="torch->flax",
    )

    back, _ = _adapted_pair()
    flax_adapted.saver(str(tmp_path / "flax.safetensors"))
    back.loader(str(tmp_path / "flax.safetensors"))
    _assert_same_bits(
        {k: v.detach().numpy() for k, v in torch_adapted.trainable_state_dict().items()},
        {k: v.detach().numpy() for k, v in back.trainable_state_dict().items()},
    )


def speechbrain_wav2vec2_lobe(directory: Path, hf_model: torch.nn.Module) -> torch.nn.Module:
    """SpeechBrain's real ``Wav2Vec2`` lobe (``speechbrain.lobes.models.huggingface_transformers
    .wav2vec2``, at ``speechbrain.integrations.huggingface.wav2vec2`` in 1.1) built offline from a
    local ``save_pretrained`` directory: it keeps the transformers model at ``self.model``."""
    from tests.conftest import import_speechbrain_adapters

    import_speechbrain_adapters()  # stubs torchaudio, which does not load beside the CPU torch wheel
    from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2

    hf_model.save_pretrained(str(directory))
    speech.transformers_module().Wav2Vec2FeatureExtractor().save_pretrained(str(directory))
    return Wav2Vec2(str(directory), save_path=str(directory / "cache"), freeze=False)


def test_a_speechbrain_wav2vec2_adapter_checkpoint_crosses_with_one_rename_rule(tmp_path):
    torch.manual_seed(0)
    lobe = speechbrain_wav2vec2_lobe(tmp_path / "hf", speech.torch_model("wav2vec2"))
    flax_model = _flax_twin("wav2vec2", {})
    converters.torch_to_flax(lobe.model, flax_model)
    targets = ["model.encoder.layers.*.attention.[qv]_proj"]
    adapted_lobe = torch_impl.AdaptedModel(lobe, torch_impl.LoRA, target_layers=targets).eval()
    harness.randomize_adapters(adapted_lobe, seed=7)
    adapted_lobe.saver(str(tmp_path / "sb.safetensors"))
    assert all(
        k.startswith("adapted_model.model.encoder.") for k in load_file(str(tmp_path / "sb.safetensors"))
    )
    flax_adapted = flax_impl.AdaptedModel(
        flax_model, flax_impl.LoRA, target_layers=["encoder.layers.*.attention.[qv]_proj"], rngs=nnx.Rngs(0)
    )
    flax_adapted.eval()

    report = converters.torch_to_flax(
        str(tmp_path / "sb.safetensors"), flax_adapted, rename=SPEECHBRAIN_RENAME
    )

    assert len(report.loaded) == 8 and report.ok
    batch = speech.audio_batch(np.random.default_rng(0))
    harness.assert_close(
        [_torch_hidden(adapted_lobe.adapted_model.model, batch)],
        [_flax_hidden(flax_adapted, batch)],
        atol=1e-5,
        rtol=1e-5,
        what="speechbrain",
    )

    # And back: the Flax adapters into a fresh SpeechBrain lobe, with the reverse rule.
    flax_adapted.saver(str(tmp_path / "flax.safetensors"))
    fresh = torch_impl.AdaptedModel(
        speechbrain_wav2vec2_lobe(tmp_path / "hf2", speech.torch_model("wav2vec2")),
        torch_impl.LoRA,
        target_layers=targets,
    )
    converters.flax_to_torch(
        str(tmp_path / "flax.safetensors"), fresh, rename=[("adapted_model.*", "adapted_model.model.*")]
    )
    _assert_same_bits(
        {k: v.detach().numpy() for k, v in adapted_lobe.trainable_state_dict().items()},
        {k: v.detach().numpy() for k, v in fresh.trainable_state_dict().items()},
    )


def test_all_conv_meets_the_grouped_positional_conv_and_target_layers_leave_it_out():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="encoder.pos_conv_embed.conv"):
        torch_impl.AdaptedModel(speech.torch_model("wav2vec2"), torch_impl.LoRA, all_conv=True)
    # The Flax twin meets it too (it is a WeightNormConv there, not an nnx.Conv) and refuses the
    # same way, naming it, before changing the model: it used to adapt the other convs silently.
    twin = _flax_twin("wav2vec2", {})
    before = [np.array(leaf) for leaf in jax.tree.leaves(nnx.state(twin, nnx.Param))]
    with pytest.raises(ValueError, match="encoder.pos_conv_embed.conv"):
        flax_impl.AdaptedModel(twin, flax_impl.LoRA, all_conv=True, rngs=nnx.Rngs(0))
    assert type(twin.feature_extractor.conv_layers[0].conv) is nnx.Conv  # nothing was wrapped
    after = jax.tree.leaves(nnx.state(twin, nnx.Param))
    assert len(after) == len(before)
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(np.array(new), old)

    convs = ["feature_extractor.conv_layers.*.conv"]  # what the README shows instead of all_conv
    adapted = torch_impl.AdaptedModel(speech.torch_model("wav2vec2"), torch_impl.LoRA, target_layers=convs)
    flax_adapted = flax_impl.AdaptedModel(
        _flax_twin("wav2vec2", {}), flax_impl.LoRA, target_layers=convs, rngs=nnx.Rngs(0)
    )
    assert (
        adapted.replace_layers
        == flax_adapted.replace_layers
        == [f"feature_extractor.conv_layers.{i}.conv" for i in range(7)]
    )
