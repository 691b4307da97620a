"""The shared decoder on its own (no torch): bad input named before anything runs, the tied head,
the key/value cache against recomputing the whole sequence, and the config tables."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_impl.models.decoder import KVCache, generation_positions
from flax_impl.models.gemma3 import Gemma3ForCausalLM
from flax_impl.models.mistral import MistralForCausalLM

CONFIG = {
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 3,
    "eos_token_id": 2,
}


@pytest.fixture(scope="module")
def model() -> MistralForCausalLM:
    model = MistralForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    model.eval()
    return model


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m(jnp.zeros((4,), jnp.int32)), "input_ids must be integer token ids of shape"),
        (lambda m: m(jnp.zeros((1, 4))), "input_ids must be integer token ids"),
        (lambda m: m(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 3))), "attention_mask has shape"),
        (lambda m: m.generate(jnp.zeros((1, 4), jnp.int32), 0), "max_new_tokens must be a positive integer"),
        (
            lambda m: m(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4)), jnp.arange(4)[None], packed=True),
            "packed=True reads the sequences from position_ids",
        ),
        (lambda m: m(None), "exactly one of input_ids and inputs_embeds"),
    ],
)
def test_bad_input_is_refused_naming_what_was_expected(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)


def test_greedy_decoding_with_ring_caches_equals_recomputing_the_whole_sequence(model):
    """The window (3) is shorter than the prompt (5): the sliding layers' caches wrap around."""
    ids = jnp.array([[0, 0, 5, 6, 7], [4, 9, 6, 11, 8]], jnp.int32)
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    tokens = np.asarray(model.generate(ids, 6, attention_mask=mask, eos_token_id=[]))

    # The oracle: the whole sequence recomputed for every new token. One fixed shape (the final
    # length; causality keeps the not-yet-written tail from reaching earlier tokens): one compile.
    full_mask = jnp.concatenate([mask, jnp.ones((2, 6), mask.dtype)], axis=1)
    positions = generation_positions(full_mask)
    forward = nnx.jit(lambda m, s: m(s, full_mask, positions))
    seq = jnp.concatenate([ids, jnp.zeros((2, 6), jnp.int32)], axis=1)
    for step in range(6):
        logits = forward(model, seq)
        seq = seq.at[:, 5 + step].set(jnp.argmax(logits[:, 4 + step], -1).astype(jnp.int32))

    np.testing.assert_array_equal(tokens, np.asarray(seq))
    assert model.model.layers[0].self_attn.sliding_window == 3


def test_a_cache_slot_is_the_token_index_modulo_its_length():
    cache = KVCache(jnp.zeros((1, 3, 1, 2)), jnp.zeros((1, 3, 1, 2)), jnp.full((3,), -1, jnp.int32))
    for index in range(5):
        cache = cache.write(jnp.full((1, 1, 1, 2), float(index)), jnp.zeros((1, 1, 1, 2)), jnp.asarray(index))
    assert cache.index.tolist() == [3, 4, 2]
    assert cache.keys[0, :, 0, 0].tolist() == [3.0, 4.0, 2.0]


def test_tied_logits_are_the_embedding_transpose_and_softcapped():
    config = {
        **CONFIG,
        "head_dim": 4,
        "final_logit_softcapping": 2.0,
        "layer_types": ["sliding_attention", "full_attention"],
    }
    model = Gemma3ForCausalLM(config, rngs=nnx.Rngs(0))
    hidden = jnp.ones((1, 1, 16))
    table = model.model.embed_tokens.embedding[...]

    logits = model.logits(hidden)

    np.testing.assert_allclose(
        np.asarray(logits), np.tanh(np.asarray(hidden @ table.T) / 2.0) * 2.0, atol=1e-6
    )
    assert not hasattr(model, "lm_head") and model.tied_weights == {
        "lm_head.weight": "model.embed_tokens.weight"
    }
    assert float(jnp.abs(model(jnp.array([[1, 2, 3]])).max())) <= 2.0


def test_gemma_norms_start_at_zero_and_llama_norms_at_one(model):
    gemma = Gemma3ForCausalLM({**CONFIG, "head_dim": 4}, rngs=nnx.Rngs(0))
    assert float(jnp.abs(gemma.model.norm.scale[...]).max()) == 0.0
    assert float(model.model.norm.scale[...].min()) == 1.0
