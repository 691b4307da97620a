"""The Whisper config as released checkpoints write it, and the options that change the computation
only in training (SpecAugment, dropout) or only in decoding (the default prompt)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

# transformers (torch) builds the references: the jax-only CI environment skips this file.
torch = pytest.importorskip("torch")
from flax import nnx  # noqa: E402

from flax_impl.models import WhisperConfig, WhisperForConditionalGeneration, WhisperModel  # noqa: E402
from tests.zoo import whisper  # noqa: E402
from tests.zoo.bert import transformers_module  # noqa: E402

#: whisper-tiny's config.json fields that matter here (older checkpoints carry the generation
#: options; large-v3 has 128 mel bins and vocab 51866).
TINY_JSON = {
    "begin_suppress_tokens": [220, 50257],
    "forced_decoder_ids": [[1, 50259], [2, 50359], [3, 50363]],
    "suppress_tokens": [1, 2, 7, 8, 9],
    "decoder_start_token_id": 50258,
    "max_length": 448,
    "scale_embedding": False,
    "apply_spec_augment": False,
}


def test_config_json_and_transformers_config_read_the_same_hashable_config():
    config = transformers_module().WhisperConfig(**whisper.TINY)
    from_object, from_dict = WhisperConfig.from_config(config), WhisperConfig.from_config(config.to_dict())
    assert from_object == from_dict and hash(from_object) == hash(from_dict)
    released = WhisperConfig.from_config(TINY_JSON)
    assert released.forced_decoder_ids == ((1, 50259), (2, 50359), (3, 50363))
    assert released.begin_suppress_tokens == (220, 50257) and hash(released)


def test_the_default_prompt_is_the_start_token_then_the_forced_ids():
    model = nnx.eval_shape(
        lambda: WhisperForConditionalGeneration(
            {**whisper.TINY, **TINY_JSON, "vocab_size": 51865}, rngs=nnx.Rngs(0)
        )
    )
    np.testing.assert_array_equal(model.default_prompt(2), [[50258, 50259, 50359, 50363]] * 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"decoder_attention_heads": 3}, "decoder_attention_heads"),
        ({"pad_token_id": 64}, "pad_token_id"),
        ({"activation_function": "mish"}, "activation_function"),
    ],
)
def test_configs_transformers_cannot_build_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        WhisperModel({**whisper.TINY, **overrides}, rngs=nnx.Rngs(0))


def test_spec_augment_and_dropout_act_in_training_mode_only():
    config = {**whisper.TINY, "apply_spec_augment": True, "mask_time_prob": 0.5, "mask_time_length": 2,
              "mask_feature_prob": 0.3, "mask_feature_length": 2, "dropout": 0.1}  # fmt: skip
    model = whisper.flax_twin(whisper.torch_model(config, head=False))  # no random init to compile
    model.train()
    features = jnp.asarray(whisper.features() + 3.0)  # no zero in the input

    masked = model.mask_input_features(features)
    assert (masked == 0).all(axis=1).any(axis=1).all()  # every row: zeroed frames (time spans)
    assert (masked == 0).all(axis=2).any(axis=1).all()  # every row: zeroed mel bins
    assert int((masked == 0).sum()) < masked.size  # not everything
    ids = whisper.DECODER_IDS
    assert not np.allclose(model(features, ids), model(features, ids))  # fresh spans and dropout

    model.eval()
    np.testing.assert_array_equal(model.mask_input_features(features), features)
