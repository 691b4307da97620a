"""Speech encoders on both sides: transformers' ``Wav2Vec2Model``, ``HubertModel``, ``WavLMModel``
and ``WhisperEncoder`` against the Flax twins in ``flax_impl.models``.

Small configs (hidden 16, two layers) with the real geometry where it matters: the seven-conv
feature encoder of the released checkpoints (1 s of 16 kHz audio -> 49 frames), an even positional
kernel (so the same-pad layer drops a frame) with groups, Whisper's 80 x 3000 input. The adapter
pairs run with an attention mask whose second row is padded (the first is not), so the
feature-vector mask reduction is exercised in every gradient and training comparison; the
unadapted forward is compared without and with the mask for every config variant.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flax import nnx

from flax_impl import models as flax_models

from .bert import transformers_module
from .pairs import AdapterCase, Batch, Pair, _houlsby, _lora

SAMPLES = 16000  # 1 s at 16 kHz
PADDED_LENGTH = 11000  # the second row's real samples

#: wav2vec2-family options shared by the small configs (the feature encoder of the checkpoints).
SPEECH_BASE = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    conv_dim=(8, 8, 8, 8, 8, 8, 8),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)

#: Config variants each twin must match transformers on (forward, with and without a mask).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "wav2vec2-base": ("wav2vec2", {}),
    "wav2vec2-large-lv60": (
        "wav2vec2",
        dict(
            feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, num_conv_pos_embeddings=15
        ),
    ),
    "wav2vec2-relu-no-spec-embed": (
        "wav2vec2",
        dict(hidden_act="relu", feat_extract_activation="gelu_new", mask_time_prob=0.0, layer_norm_eps=1e-6),
    ),
    "hubert-base": ("hubert", {}),
    "hubert-no-projection-norm": ("hubert", dict(feat_proj_layer_norm=False)),
    "hubert-batch-norm-pos-conv": ("hubert", dict(conv_pos_batch_norm=True)),
    "hubert-large": ("hubert", dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)),
    "wavlm-base": ("wavlm", dict(num_buckets=16, max_bucket_distance=40)),
    "wavlm-large": (
        "wavlm",
        dict(num_buckets=16, max_bucket_distance=40, feat_extract_norm="layer", do_stable_layer_norm=True),
    ),
    "wavlm-default-buckets": ("wavlm", {}),
}

WHISPER_CONFIG = dict(
    d_model=16,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_layers=1,
    decoder_attention_heads=2,
    decoder_ffn_dim=32,
    num_mel_bins=80,
    max_source_positions=1500,
    max_target_positions=16,
    vocab_size=64,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=3,
    decoder_start_token_id=2,
)

_TORCH_CLASSES = {"wav2vec2": "Wav2Vec2", "hubert": "Hubert", "wavlm": "WavLM"}
_FLAX_CLASSES = {
    "wav2vec2": flax_models.Wav2Vec2Model,
    "hubert": flax_models.HubertModel,
    "wavlm": flax_models.WavLMModel,
}


def torch_config(family: str, **overrides: Any) -> Any:
    """A transformers config of ``family`` ('wav2vec2', 'hubert', 'wavlm') from :data:`SPEECH_BASE`."""
    transformers = transformers_module()
    return getattr(transformers, f"{_TORCH_CLASSES[family]}Config")(**{**SPEECH_BASE, **overrides})


def torch_model(family: str, **overrides: Any) -> torch.nn.Module:
    """transformers' model of ``family`` with a small config and random weights (seed first), eval mode.

    HuBERT's BatchNorm gets non-trivial running statistics, so the conversion of its buffers counts.
    """
    transformers = transformers_module()
    config = torch_config(family, **overrides)
    model = getattr(transformers, f"{_TORCH_CLASSES[family]}Model")(config).eval()
    batch_norm = getattr(model.encoder.pos_conv_embed, "batch_norm", None)
    if batch_norm is not None:
        with torch.no_grad():
            batch_norm.running_mean.normal_()
            batch_norm.running_var.uniform_(0.5, 2.0)
    return model


def flax_model(family: str, config: Any, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
    """The Flax twin of ``family`` built from ``config`` (a transformers config or a dict)."""
    return _FLAX_CLASSES[family](config, rngs=rngs, **kwargs)


def whisper_torch() -> torch.nn.Module:
    """transformers' ``WhisperEncoder`` (the encoder of a small ``WhisperModel``), eval mode."""
    transformers = transformers_module()
    return transformers.WhisperModel(transformers.WhisperConfig(**WHISPER_CONFIG)).encoder.eval()


def audio_batch(rng: np.random.Generator) -> Batch:
    """Two rows of 1 s of noise-like audio; the mask pads the second row after 11000 samples."""
    values = rng.standard_normal((2, SAMPLES)).astype(np.float32)
    mask = np.ones((2, SAMPLES), dtype=np.int64)
    mask[1, PADDED_LENGTH:] = 0
    values[1, PADDED_LENGTH:] = 0.0  # as a feature extractor pads
    return {"input_values": values, "attention_mask": mask}


def mel_batch(rng: np.random.Generator) -> Batch:
    """Two rows of 80 x 3000 log-mel-like features (Whisper's fixed 30 s input)."""
    return {"input_features": rng.standard_normal((2, 80, 3000)).astype(np.float32)}


def run_torch_audio(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(last hidden state without a mask, with the mask)`` of a (possibly adapted) torch model."""
    values = torch.from_numpy(batch["input_values"])
    unmasked = model(values).last_hidden_state
    masked = model(values, attention_mask=torch.from_numpy(batch["attention_mask"])).last_hidden_state
    return unmasked, masked


def run_flax_audio(model: nnx.Module, batch: Batch) -> tuple[Any, Any]:
    """The same two outputs from a (possibly adapted) Flax twin."""
    return model(batch["input_values"]), model(batch["input_values"], batch["attention_mask"])


def run_torch_whisper(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor]:
    return (model(torch.from_numpy(batch["input_features"])).last_hidden_state,)


def run_flax_whisper(model: nnx.Module, batch: Batch) -> tuple[Any]:
    return (model(batch["input_features"]),)


_ATTENTION = "encoder.layers.*.attention"
_FEED_FORWARD = "encoder.layers.*.feed_forward"
_FEATURE_CONVS = "feature_extractor.conv_layers.*.conv"


def run_torch_masked(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor]:
    """The last hidden state with the mask (row 0 is unpadded), for the adapter pairs."""
    values, mask = (torch.from_numpy(batch[k]) for k in ("input_values", "attention_mask"))
    return (model(values, attention_mask=mask).last_hidden_state,)


def run_flax_masked(model: nnx.Module, batch: Batch) -> tuple[Any]:
    return (model(batch["input_values"], batch["attention_mask"]),)


#: LoRA on attention projections, a feed-forward layer and the feature-extractor convs, by glob.
LORA_MIXED = _lora(
    "lora",
    rank=2,
    target_layers=(
        f"{_ATTENTION}.[qv]_proj",
        f"{_FEED_FORWARD}.intermediate_dense",
        "feature_extractor.conv_layers.[05].conv",
    ),
)
#: Houlsby on the feed-forward output, with a norm and the projection unfrozen.
HOULSBY_UNFROZEN = _houlsby(
    "houlsby",
    target_layers=(f"{_FEED_FORWARD}.output_dense",),
    unfrozen_layers=(
        "encoder.layer_norm",
        "encoder.layers.*.final_layer_norm",
        "feature_projection.projection",
    ),
)


def _audio_pair(name: str, family: str, cases: tuple[AdapterCase, ...], **overrides: Any) -> Pair:
    return Pair(
        name=name,
        make_torch=lambda: torch_model(family, **overrides),
        make_flax=lambda rngs: flax_model(family, torch_config(family, **overrides), rngs),
        make_batch=audio_batch,
        run_torch=run_torch_masked,
        run_flax=run_flax_masked,
        cases=cases,
    )


WAV2VEC2 = _audio_pair("wav2vec2", "wav2vec2", (LORA_MIXED, HOULSBY_UNFROZEN))
HUBERT = _audio_pair(
    "hubert",
    "hubert",
    (_lora("lora", target_layers=(f"{_ATTENTION}.[kv]_proj", f"{_FEED_FORWARD}.output_dense")),),
)
# transformers' WavLM attention passes q_proj/k_proj/v_proj.weight straight to
# F.multi_head_attention_forward: a torch LoRA there changes nothing today (issue 14, item 7), so
# WavLM's adapters sit on layers it calls: the feed-forward, the gate's projection, the convs.
WAVLM = _audio_pair(
    "wavlm",
    "wavlm",
    (
        _lora(
            "lora",
            rank=2,
            target_layers=(f"{_ATTENTION}.gru_rel_pos_linear", f"{_FEED_FORWARD}.*_dense", _FEATURE_CONVS),
        ),
    ),
    num_buckets=16,
    max_bucket_distance=40,
)
WHISPER = Pair(
    name="whisper",
    make_torch=whisper_torch,
    make_flax=lambda rngs: flax_models.WhisperEncoder(WHISPER_CONFIG, rngs=rngs),
    make_batch=mel_batch,
    run_torch=run_torch_whisper,
    run_flax=run_flax_whisper,
    cases=(
        _lora(
            "lora", target_layers=("layers.*.self_attn.q_proj", "layers.*.self_attn.v_proj", "layers.0.fc1")
        ),
        _houlsby("houlsby", target_layers=("layers.*.fc2",), unfrozen_layers=("layer_norm",)),
        _lora("convs", rank=2, target_layers=("conv1", "conv2")),
    ),
)


SPEECH_PAIRS: tuple[Pair, ...] = (WAV2VEC2, HUBERT, WAVLM, WHISPER)
SPEECH_PAIRS_BY_NAME = {pair.name: pair for pair in SPEECH_PAIRS}
