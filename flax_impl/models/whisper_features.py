"""Whisper's log-mel front end without torch: ``transformers.WhisperFeatureExtractor`` in JAX.

16 kHz audio is zero-padded or cut to 30 s (480000 samples), framed by a centred STFT
(``n_fft=400``, ``hop_length=160``, periodic Hann window, reflect padding; the last of the 3001
frames is dropped, as transformers drops it), its power spectrum projected on Slaney-style mel
filters (0 to 8 kHz, the filters computed here in NumPy, equal to transformers' ``mel_filter_bank``),
then ``log10`` (floored at ``1e-10``), clipped to 8 below each example's maximum and scaled
``(x + 4) / 4``. Output ``(batch, n_mels, 3000)``: the ``input_features`` of the Whisper twins.

Example
-------
>>> import numpy as np
>>> audio = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
>>> whisper_log_mel(audio).shape, whisper_log_mel(audio[None], n_mels=128).shape
((1, 80, 3000), (1, 128, 3000))
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SAMPLING_RATE", "mel_filters", "whisper_log_mel"]

SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30  # seconds
N_SAMPLES = CHUNK_LENGTH * SAMPLING_RATE  # 480000: 3000 frames of 10 ms


def _hertz_to_mel(freq: float | np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (as librosa and transformers)."""
    freq = np.asarray(freq, np.float64)
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-300) / 1000.0) * (27.0 / np.log(6.4)), mels)


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, np.float64)
    freq = 200.0 * mels / 3.0
    return np.where(mels >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels - 15.0)), freq)


@functools.cache
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Slaney-normalised triangular mel filters ``(1 + n_fft // 2, n_mels)``, float64, from 0 Hz to
    8 kHz: transformers' ``mel_filter_bank(..., norm="slaney", mel_scale="slaney")`` as Whisper's
    feature extractor calls it. (Read-only: the result is cached.)

    >>> mel_filters(80).shape
    (201, 80)
    """
    if n_mels < 1:
        raise ValueError(f"n_mels must be a positive integer, got {n_mels}")
    num_frequency_bins = 1 + n_fft // 2
    mel_freqs = np.linspace(_hertz_to_mel(0.0), _hertz_to_mel(8000.0), n_mels + 2)
    filter_freqs = _mel_to_hertz(mel_freqs)
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    filter_diff = np.diff(filter_freqs)
    down = -slopes[:, :-2] / filter_diff[:-1]
    up = slopes[:, 2:] / filter_diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    # Slaney: roughly constant energy per channel.
    filters *= (2.0 / (filter_freqs[2 : n_mels + 2] - filter_freqs[:n_mels]))[None, :]
    filters.setflags(write=False)
    return filters


def _pad_or_trim(audio: Any) -> np.ndarray | jax.Array:
    """``(batch, 480000)``: each row zero-padded or cut to 30 s (a list of 1-d arrays may differ in length)."""
    if isinstance(audio, (list, tuple)):
        rows = [np.asarray(a, np.float32).reshape(-1)[:N_SAMPLES] for a in audio]
        return np.stack([np.pad(r, (0, N_SAMPLES - len(r))) for r in rows])
    audio = jnp.asarray(audio, jnp.float32)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2:
        raise ValueError(f"audio must be (samples,) or (batch, samples), got shape {tuple(audio.shape)}")
    audio = audio[:, :N_SAMPLES]
    return jnp.pad(audio, ((0, 0), (0, N_SAMPLES - audio.shape[1])))


def whisper_log_mel(
    audio: Any,
    n_mels: int = 80,
    *,
    sampling_rate: int = SAMPLING_RATE,
) -> jax.Array:
    """Whisper's log-mel ``input_features`` ``(batch, n_mels, 3000)`` of 16 kHz ``audio``.

    Arguments
    ---------
    audio : numpy.ndarray or list of numpy.ndarray
        ``(samples,)``, ``(batch, samples)``, or a list of 1-d arrays of any lengths; each row is
        zero-padded or cut to 30 s, as ``WhisperFeatureExtractor(...)(audio, sampling_rate=16000)``
        pads and truncates by default.
    n_mels : int
        80 (every Whisper up to large-v2) or 128 (large-v3): ``config.num_mel_bins``.
    sampling_rate : int
        Must be 16000 (Whisper's); other rates are refused rather than resampled.

    Returns
    -------
    jax.Array
        float32, equal to transformers' ``WhisperFeatureExtractor(feature_size=n_mels)`` output
        within 1e-4. Jit-compatible for array input.

    Example
    -------
    >>> import numpy as np
    >>> features = whisper_log_mel([np.zeros(8000), np.ones(100)])
    >>> features.shape, float(features[0].max())  # silence: log10(1e-10) = -10, (-10 + 4) / 4
    ((2, 80, 3000), -1.5)
    """
    if sampling_rate != SAMPLING_RATE:
        raise ValueError(
            f"Whisper's features are defined at {SAMPLING_RATE} Hz; got sampling_rate={sampling_rate}: "
            "resample the audio first"
        )
    filters = jnp.asarray(mel_filters(n_mels), jnp.float32)
    return _log_mel(jnp.asarray(_pad_or_trim(audio)), filters)


@jax.jit
def _log_mel(audio: jax.Array, filters: jax.Array) -> jax.Array:
    padded = jnp.pad(audio, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")  # center=True
    num_frames = 1 + N_SAMPLES // HOP_LENGTH
    index = jnp.arange(num_frames)[:, None] * HOP_LENGTH + jnp.arange(N_FFT)[None, :]
    window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(N_FFT) / N_FFT)  # periodic Hann, as torch
    spectrum = jnp.fft.rfft(padded[:, index] * window, n=N_FFT, axis=-1)
    power = (jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2)[:, :-1]  # drop the last frame
    mel = jnp.einsum("btf,fm->bmt", power, filters, precision=jax.lax.Precision.HIGHEST)
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
    log_spec = jnp.maximum(log_spec, log_spec.max(axis=(1, 2), keepdims=True) - 8.0)
    return (log_spec + 4.0) / 4.0
