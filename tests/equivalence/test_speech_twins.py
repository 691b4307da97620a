"""The speech twins are declared like transformers' models: names, keys, every config option the
checkpoints use, attention-mask semantics, configs read by attribute name, errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import converters
from flax_impl.graph import named_modules
from flax_impl.models import WavLMConfig, WhisperConfig, WhisperEncoder
from flax_impl.models._speech import SpeechConfig, feature_vector_attention_mask
from tests.zoo import speech

from . import harness

VARIANTS = [pytest.param(family, overrides, id=name) for name, (family, overrides) in speech.VARIANTS.items()]


def _twins(family: str, overrides: dict, **flax_kwargs):
    torch.manual_seed(0)
    torch_model = speech.torch_model(family, **overrides)
    flax_model = harness.placeholder(
        lambda: speech.flax_model(family, torch_model.config, nnx.Rngs(0), **flax_kwargs)
    )
    flax_model.eval()
    converters.torch_to_flax(torch_model, flax_model)
    return torch_model, flax_model


def _torch_module_names(model: torch.nn.Module) -> set[str]:
    # PyTorch's _WeightNorm (".parametrizations.weight.0") holds no tensor: the twin computes it.
    return {name for name, _ in model.named_modules() if not name.endswith(".parametrizations.weight.0")}


@pytest.mark.parametrize(("family", "overrides"), VARIANTS)
def test_module_names_and_state_dict_keys_are_transformers(family, overrides):
    torch_model, flax_model = _twins(family, overrides)

    assert {name for name, _ in named_modules(flax_model)} == _torch_module_names(torch_model)
    torch_shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    torch_shapes = {k: v for k, v in torch_shapes.items() if not k.endswith("num_batches_tracked")}
    assert {
        k: v.shape for k, v in harness.flax_in_torch_layout(flax_model).items() if "running_" not in k
    } == {k: v for k, v in torch_shapes.items() if "running_" not in k}


@pytest.mark.parametrize(("family", "overrides"), VARIANTS)
def test_forward_matches_transformers_on_one_second_with_and_without_mask(family, overrides):
    torch_model, flax_model = _twins(family, overrides)
    batch = speech.audio_batch(np.random.default_rng(1))

    with torch.no_grad():
        expected = [t.numpy() for t in speech.run_torch_audio(torch_model, batch)]
    actual = [np.asarray(a) for a in speech.run_flax_audio(flax_model, batch)]

    harness.assert_close(expected, actual, atol=1e-5, rtol=1e-5, what=family)
    assert actual[0].shape == (2, 49, 16)


def test_whisper_encoder_matches_transformers_on_80_by_3000_features():
    torch.manual_seed(0)
    torch_model = speech.whisper_torch()
    flax_model = harness.placeholder(lambda: WhisperEncoder(torch_model.config, rngs=nnx.Rngs(0)))
    flax_model.eval()
    converters.torch_to_flax(torch_model, flax_model)
    batch = speech.mel_batch(np.random.default_rng(0))

    with torch.no_grad():
        expected = speech.run_torch_whisper(torch_model, batch)[0].numpy()

    assert {name for name, _ in named_modules(flax_model)} == {
        name for name, _ in torch_model.named_modules()
    }
    harness.assert_close(
        [expected], [np.asarray(flax_model(batch["input_features"]))], atol=1e-5, rtol=1e-5, what="whisper"
    )


def test_fused_attention_computes_the_same_function():
    torch_model, flax_model = _twins("wav2vec2", {}, attention_implementation="xla")
    batch = speech.audio_batch(np.random.default_rng(2))

    with torch.no_grad():
        expected = [t.numpy() for t in speech.run_torch_audio(torch_model, batch)]

    harness.assert_close(
        expected,
        [np.asarray(a) for a in speech.run_flax_audio(flax_model, batch)],
        atol=1e-5,
        rtol=1e-5,
        what="xla",
    )


@pytest.mark.parametrize("real_samples", [16000, 8000, 400, 399, 1])
def test_the_frame_mask_is_transformers_own_reduction_even_for_rows_too_short_to_make_a_frame(real_samples):
    torch.manual_seed(0)
    torch_model = speech.torch_model("wav2vec2")
    mask = np.ones((2, 16000), np.int64)
    mask[1, real_samples:] = 0

    expected = torch_model._get_feature_vector_attention_mask(49, torch.from_numpy(mask)).numpy()
    actual = np.asarray(feature_vector_attention_mask(49, mask, SpeechConfig.from_config(torch_model.config)))

    np.testing.assert_array_equal(actual, expected)


def test_config_json_dict_and_transformers_config_read_the_same():
    config = speech.torch_config("wavlm", do_stable_layer_norm=True, num_buckets=16)
    from_object = WavLMConfig.from_config(config)
    from_dict = WavLMConfig.from_config(config.to_dict())

    assert from_object == from_dict
    assert (from_dict.num_buckets, from_dict.do_stable_layer_norm, from_dict.conv_dim) == (16, True, (8,) * 7)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"feat_extract_norm": "batch"}, "feat_extract_norm is 'batch'"),
        ({"hidden_size": 20, "num_attention_heads": 3}, "multiple of num_attention_heads"),
        ({"conv_stride": (5, 2)}, "one \\(equal\\) length"),
        ({"hidden_act": "mish"}, "hidden_act 'mish' is not supported"),
        ({"add_adapter": True}, "add_adapter=True"),
        ({"adapter_attn_dim": 16}, "adapter_attn_dim=16"),
    ],
)
def test_a_config_the_twin_cannot_compute_is_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        SpeechConfig.from_config({**speech.SPEECH_BASE, **overrides})


def test_whisper_refuses_features_not_padded_to_its_length():
    model = WhisperEncoder(
        WhisperConfig(
            d_model=8,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=8,
            num_mel_bins=4,
            max_source_positions=6,
        ),
        rngs=nnx.Rngs(0),
    )

    with pytest.raises(ValueError, match=r"\(batch, 4, 12\)"):
        model(np.zeros((1, 4, 10), np.float32))


def test_training_mode_applies_dropout_and_eval_mode_removes_it():
    _, model = _twins("wav2vec2", {"hidden_dropout": 0.5})
    model.train()
    values = speech.audio_batch(np.random.default_rng(0))["input_values"]
    encode = nnx.jit(lambda model, values: model(values))  # the dropout streams advance in place

    train_a, train_b = np.asarray(encode(model, values)), np.asarray(encode(model, values))
    model.eval()
    eval_a, eval_b = np.asarray(encode(model, values)), np.asarray(encode(model, values))

    assert not np.allclose(train_a, train_b)
    np.testing.assert_array_equal(eval_a, eval_b)


def test_an_attention_implementation_that_cannot_run_says_which_to_use():
    model = speech.flax_model(
        "wav2vec2", speech.torch_config("wav2vec2"), nnx.Rngs(0), attention_implementation="cudnn"
    )
    model.eval()
    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN may run this shape on a GPU")

    with pytest.raises(ValueError, match="attention_implementation=None"):
        model(np.zeros((1, 16000), np.float32))


@pytest.mark.parametrize("family", ["wav2vec2", "hubert", "wavlm"])
def test_training_mode_with_given_mask_time_indices_matches_transformers(family):
    """In training mode (dropout 0, so the run is deterministic) both sides use the given
    mask_time_indices instead of drawing; mask_feature_prob=0 draws no feature spans."""
    overrides = dict(hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, layerdrop=0.0)
    if family == "wavlm":
        overrides.update(num_buckets=16, max_bucket_distance=40)
    torch_model, flax_model = _twins(family, overrides)
    torch_model.train()
    flax_model.train()
    batch = speech.audio_batch(np.random.default_rng(3))
    indices = np.zeros((2, 49), bool)
    indices[0, 5:15] = indices[1, 20:30] = indices[1, 40:] = True

    with torch.no_grad():
        expected = torch_model(
            torch.from_numpy(batch["input_values"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
            mask_time_indices=torch.from_numpy(indices),
        ).last_hidden_state.numpy()
    actual = np.asarray(flax_model(batch["input_values"], batch["attention_mask"], mask_time_indices=indices))
    flax_model.eval()
    unmasked = np.asarray(flax_model(batch["input_values"], batch["attention_mask"]))

    harness.assert_close([expected], [actual], atol=1e-5, rtol=1e-5, what=f"{family} train")
    assert not np.allclose(actual, unmasked)
