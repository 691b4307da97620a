"""``whisper_log_mel`` against transformers' ``WhisperFeatureExtractor``: the filters, and the
features of audio shorter and longer than 30 s, for 80 and 128 mel bins."""

from __future__ import annotations

import numpy as np
import pytest

from flax_impl.models import whisper_log_mel
from flax_impl.models.whisper_features import mel_filters
from tests.zoo.bert import transformers_module


def _extractor(n_mels: int):
    pytest.importorskip("transformers")  # the reference; absent in the jax-only CI environment
    return transformers_module().WhisperFeatureExtractor(feature_size=n_mels)


def _audio(rng: np.random.Generator, samples: int) -> np.ndarray:
    t = np.arange(samples) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3100 * t * (1 + t / 10))
    return (tone + 0.05 * rng.standard_normal(samples)).astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_are_transformers_slaney_filters(n_mels):
    np.testing.assert_allclose(mel_filters(n_mels), _extractor(n_mels).mel_filters, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_of_short_and_long_audio_equals_the_feature_extractor(n_mels):
    rng = np.random.default_rng(n_mels)
    short, long = _audio(rng, 3 * 16000 + 123), _audio(rng, 31 * 16000)
    expected = _extractor(n_mels)([short, long], sampling_rate=16000, return_tensors="np").input_features

    actual = np.asarray(whisper_log_mel([short, long], n_mels))
    assert actual.shape == expected.shape == (2, n_mels, 3000)
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)
    # Array input (one row, padded by the function itself) gives the same features.
    np.testing.assert_allclose(np.asarray(whisper_log_mel(short, n_mels))[0], actual[0], atol=1e-6)


def test_other_sampling_rates_and_shapes_are_refused():
    with pytest.raises(ValueError, match="16000 Hz"):
        whisper_log_mel(np.zeros(100), sampling_rate=8000)
    with pytest.raises(ValueError, match="batch, samples"):
        whisper_log_mel(np.zeros((1, 2, 100)))
