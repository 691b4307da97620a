"""Whole Whisper, transformers against the Flax twins: names, logits, greedy decoding, conversion
with the tied output projection, and teacher-forced cross-entropy training of LoRA adapters.

Small configs (``tests.zoo.whisper.TINY``), every weight perturbed, float32 at full precision; the
decoder batch has a padded row; one test runs the released 30 s input length.
"""

from __future__ import annotations

import copy
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import converters
import flax_impl
from flax_impl import CheckpointError
from flax_impl.checkpoint import load_torch_style_state_dict, torch_style_state_dict
from flax_impl.graph import named_modules
from flax_impl.models import WhisperForConditionalGeneration
from tests.zoo import whisper
from tests.zoo.pairs import AdapterCase

from . import harness

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _full_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def twins():
    torch_model = whisper.torch_model()
    return torch_model, whisper.flax_twin(torch_model)


@pytest.fixture(scope="module")
def decoding_twins():
    torch_model = whisper.torch_model(seed=9, scale=whisper.DECODING_SCALE)
    return torch_model, whisper.flax_twin(torch_model)


def _torch_logits(model, features, ids, mask=None):
    with torch.no_grad():
        return model(
            torch.from_numpy(features),
            decoder_input_ids=torch.from_numpy(ids),
            decoder_attention_mask=None if mask is None else torch.from_numpy(mask),
        ).logits.numpy()


def test_module_names_are_transformers_but_for_the_tied_proj_out(twins):
    torch_model, flax_model = twins
    torch_names = {name for name, _ in torch_model.named_modules()}
    flax_names = {name for name, _ in named_modules(flax_model)}
    # proj_out is computed through model.decoder.embed_tokens: no module, one stored matrix.
    assert torch_names - flax_names == {"proj_out"}
    assert flax_names <= torch_names
    assert flax_model.tied_weights == {"proj_out.weight": "model.decoder.embed_tokens.weight"}


def test_logits_match_transformers_with_a_padded_decoder_row(twins):
    torch_model, flax_model = twins
    features = whisper.features()
    expected = _torch_logits(torch_model, features, whisper.DECODER_IDS, whisper.DECODER_MASK)
    actual = np.asarray(flax_model(features, whisper.DECODER_IDS, whisper.DECODER_MASK))

    assert actual.shape == (2, 6, whisper.TINY["vocab_size"])
    harness.assert_close([expected], [actual], atol=1e-5, rtol=1e-5, what="logits")
    # The mask matters: without it the padded row's real positions still agree (causal), the others not.
    unmasked = np.asarray(flax_model(features, whisper.DECODER_IDS))
    np.testing.assert_allclose(unmasked[1, :3], actual[1, :3], atol=1e-6)
    assert not np.allclose(unmasked[1, 3:], actual[1, 3:], atol=1e-3)


def test_encoder_outputs_replace_the_features_and_whisper_model_gives_the_decoder_state(twins):
    torch_model, flax_model = twins
    features = whisper.features()
    encoded = flax_model.model.encoder(features)
    with torch.no_grad():
        expected = torch_model.model(
            torch.from_numpy(features), decoder_input_ids=torch.from_numpy(whisper.DECODER_IDS)
        ).last_hidden_state.numpy()

    hidden = np.asarray(flax_model.model(features, whisper.DECODER_IDS))
    harness.assert_close([expected], [hidden], atol=1e-5, rtol=1e-5, what="decoder last hidden state")
    np.testing.assert_array_equal(
        np.asarray(flax_model(encoder_outputs=encoded, decoder_input_ids=whisper.DECODER_IDS)),
        np.asarray(flax_model(features, whisper.DECODER_IDS)),
    )


def test_whisper_model_twin_converts_from_transformers_whisper_model():
    torch_model = whisper.torch_model(head=False, seed=3)
    flax_model = whisper.flax_twin(torch_model)
    features = whisper.features(seed=3)
    with torch.no_grad():
        expected = torch_model(
            torch.from_numpy(features),
            decoder_input_ids=torch.from_numpy(whisper.DECODER_IDS),
            decoder_attention_mask=torch.from_numpy(whisper.DECODER_MASK),
        ).last_hidden_state.numpy()

    assert {n for n, _ in named_modules(flax_model)} == {n for n, _ in torch_model.named_modules()}
    actual = np.asarray(flax_model(features, whisper.DECODER_IDS, whisper.DECODER_MASK))
    harness.assert_close([expected], [actual], atol=1e-5, rtol=1e-5, what="WhisperModel")


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"scale_embedding": True}, id="scale_embedding-read-and-unused-as-in-transformers"),
        pytest.param({"tie_word_embeddings": False}, id="untied-proj_out"),
        pytest.param(
            {"num_mel_bins": 128, "vocab_size": 70, "activation_function": "gelu_new"}, id="128-mels"
        ),
    ],
)
def test_config_variants_compute_transformers_logits(overrides):
    config = {**whisper.TINY, **overrides}
    torch_model = whisper.torch_model(config, seed=1)
    flax_model = whisper.flax_twin(torch_model)
    features = whisper.features(config, seed=1)

    expected = _torch_logits(torch_model, features, whisper.DECODER_IDS, whisper.DECODER_MASK)
    actual = np.asarray(flax_model(features, whisper.DECODER_IDS, whisper.DECODER_MASK))
    harness.assert_close([expected], [actual], atol=1e-5, rtol=1e-5, what=str(overrides))
    assert ("proj_out.weight" in flax_model.tied_weights) == config.get("tie_word_embeddings", True)


def test_thirty_seconds_of_features_at_the_released_1500_positions():
    torch_model = whisper.torch_model(whisper.FULL_LENGTH, seed=2)
    flax_model = whisper.flax_twin(torch_model)
    features = whisper.features(whisper.FULL_LENGTH, seed=2)
    assert features.shape == (2, 80, 3000)

    expected = _torch_logits(torch_model, features, whisper.DECODER_IDS, whisper.DECODER_MASK)
    actual = np.asarray(flax_model(features, whisper.DECODER_IDS, whisper.DECODER_MASK))
    harness.assert_close([expected], [actual], atol=1e-5, rtol=1e-5, what="30 s logits")


# ---------------------------------------------------------------------------------------------
# Greedy decoding


def test_generate_gives_the_tokens_of_a_greedy_loop_over_transformers_with_its_suppression(decoding_twins):
    torch_model, flax_model = decoding_twins
    features = whisper.features(batch=3, seed=5)
    prompt = np.array([[2, 40], [2, 41], [2, 42]], np.int64)
    # No row stops early with the configured eos: 12 tokens of every row are compared.
    expected = whisper.torch_greedy(torch_model, features, prompt, 12, eos_token_id=63)
    actual = np.asarray(flax_model.generate(features, prompt, 12, eos_token_id=63))

    np.testing.assert_array_equal(actual, expected)
    new = expected[:, 2:]
    assert not np.isin(new, whisper.TINY["suppress_tokens"]).any()
    assert not np.isin(new[:, 0], whisper.TINY["begin_suppress_tokens"]).any()
    assert len(np.unique(new)) > 2, "a degenerate model would not test much"


def test_generate_stops_a_row_at_eos_and_pads_it_with_eos(decoding_twins):
    torch_model, flax_model = decoding_twins
    features = whisper.features(batch=3, seed=5)
    prompt = np.array([[2, 40], [2, 41], [2, 42]], np.int64)
    free = whisper.torch_greedy(torch_model, features, prompt, 12, eos_token_id=63)
    # An end-of-sequence token row 0 produces at its 4th new token (not first: begin-suppressed).
    eos = int(free[0, 2 + 3])
    expected = whisper.torch_greedy(torch_model, features, prompt, 12, eos_token_id=eos)
    actual = np.asarray(flax_model.generate(features, prompt, 12, eos_token_id=eos))

    np.testing.assert_array_equal(actual, expected)
    first = int(np.argmax(actual[0, 2:] == eos))
    assert (actual[0, 2 + first :] == eos).all() and first <= 3


def test_generate_with_encoder_outputs_and_the_default_prompt(decoding_twins):
    torch_model, flax_model = decoding_twins
    features = whisper.features(batch=2, seed=6)
    start = np.full((2, 1), whisper.TINY["decoder_start_token_id"], np.int64)
    expected = whisper.torch_greedy(torch_model, features, start, 5, eos_token_id=63)
    encoded = flax_model.model.encoder(features)

    np.testing.assert_array_equal(
        np.asarray(flax_model.generate(encoder_outputs=encoded, max_new_tokens=5, eos_token_id=63)), expected
    )


def test_generate_with_one_adapter_per_utterance_decodes_each_as_its_adapter_alone(decoding_twins):
    """A Whisper server's mixed batch: each utterance decoded through its own adapter (or none),
    encoder and decoder alike, in one compiled loop; each row the tokens of that adapter alone."""
    _, flax_model = decoding_twins
    adapted = flax_impl.AdaptedModel(
        copy.deepcopy(flax_model), flax_impl.LoRA, target_layers=["*q_proj", "*v_proj"], rngs=nnx.Rngs(1)
    )
    adapted.add_adapter(
        "b", flax_impl.LoRA, ["*fc1", "*fc2", "*k_proj"], adapter_kwargs={"rank": 4}, rngs=nnx.Rngs(2)
    )
    params = nnx.state(adapted, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(3), 512))
    for path, variable in nnx.to_flat_state(params):
        if "adapter_" in ".".join(map(str, path)):
            variable.set_value(0.5 * jax.random.normal(next(keys), variable.get_value().shape))
    nnx.update(adapted, params)
    adapted.eval()
    features = whisper.features(batch=3, seed=5)
    prompt = np.array([[2, 40], [2, 41], [2, 42]], np.int64)
    names = ["b", "__base__", "default"]

    mixed = np.asarray(adapted.generate(features, prompt, 8, eos_token_id=63, adapter_names=names))

    for row, name in enumerate(names):
        one = dict(features=features[row : row + 1], prompt=prompt[row : row + 1])
        if name == "__base__":
            with adapted.disable_adapter():
                alone = adapted.generate(one["features"], one["prompt"], 8, eos_token_id=63)
        else:
            adapted.set_adapter(name)
            alone = adapted.generate(one["features"], one["prompt"], 8, eos_token_id=63)
        np.testing.assert_array_equal(mixed[row], np.asarray(alone)[0])
    base = np.asarray(flax_model.generate(features, prompt, 8, eos_token_id=63))
    assert (mixed[[0, 2]] != base[[0, 2]]).any(axis=1).all()  # both adapters change the tokens


def test_generate_refuses_more_tokens_than_the_position_table(twins):
    _, flax_model = twins
    with pytest.raises(ValueError, match="max_target_positions"):
        flax_model.generate(whisper.features(), np.array([[2], [2]]), whisper.TINY["max_target_positions"])


# ---------------------------------------------------------------------------------------------
# Conversion with the tied output projection


def test_conversion_both_ways_is_bit_exact_and_keeps_the_tie(twins):
    torch_model, flax_model = twins
    state = torch_style_state_dict(flax_model)
    expected = harness.torch_state_dict(torch_model)

    assert sorted(state) == sorted(expected)  # proj_out.weight included, with its source's values
    for key in expected:
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)

    target = copy.deepcopy(torch_model)
    with torch.no_grad():
        for param in target.parameters():
            param.zero_()
    converters.flax_to_torch(flax_model, target)
    assert target.proj_out.weight is target.model.decoder.embed_tokens.weight
    for key, value in harness.torch_state_dict(target).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_a_state_with_or_without_proj_out_loads_and_a_different_proj_out_is_refused(twins):
    torch_model, _ = twins
    state = harness.torch_state_dict(torch_model)
    target = whisper.flax_twin(torch_model)

    without = {k: v for k, v in state.items() if k != "proj_out.weight"}
    assert any("proj_out.weight" in note for note in load_torch_style_state_dict(target, without).notes)
    assert load_torch_style_state_dict(target, state).ok

    changed = dict(state)
    changed["proj_out.weight"] = changed["proj_out.weight"] + 1.0
    before = torch_style_state_dict(target)
    with pytest.raises(CheckpointError, match="proj_out.weight"):
        load_torch_style_state_dict(target, changed)
    with pytest.raises(converters.ConversionError, match="proj_out.weight"):
        converters.torch_to_flax(changed, target)
    for key, value in torch_style_state_dict(target).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# Teacher-forced cross-entropy training of LoRA adapters

LORA = AdapterCase(
    "lora",
    "LoRA",
    {"rank": 4, "alpha": 8.0},
    target_layers=(
        "model.encoder.layers.*.self_attn.[qv]_proj",
        "model.decoder.layers.*.self_attn.[qv]_proj",
        "model.decoder.layers.*.encoder_attn.[kv]_proj",
        "model.decoder.layers.1.fc1",
    ),
)


def _labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The next token at each position, -100 where there is none (padding, the last position)."""
    labels = np.concatenate([ids[:, 1:], np.full((ids.shape[0], 1), -100)], axis=1)
    keep = np.concatenate([mask[:, 1:], np.zeros((ids.shape[0], 1), mask.dtype)], axis=1)
    return np.where(keep.astype(bool), labels, -100)


def _train_torch(model, features, ids, mask, labels, steps):
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [p for _, p in named],
        lr=harness.LEARNING_RATE,
        betas=harness.BETAS,
        eps=harness.EPS,
        weight_decay=harness.WEIGHT_DECAY,
    )
    tensors = [torch.from_numpy(a) for a in (features, ids, mask, labels)]
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        logits = model(tensors[0], decoder_input_ids=tensors[1], decoder_attention_mask=tensors[2]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tensors[3].reshape(-1))
        loss.backward()
        if step == 0:
            first = (float(loss), {name: p.grad.numpy().copy() for name, p in named})
        optimizer.step()
    return first


def _train_flax(model, features, ids, mask, labels, steps):
    tx = optax.adamw(
        harness.LEARNING_RATE,
        b1=harness.BETAS[0],
        b2=harness.BETAS[1],
        eps=harness.EPS,
        eps_root=0.0,
        weight_decay=harness.WEIGHT_DECAY,
    )
    optimizer = nnx.Optimizer(model, tx, wrt=model.trainable)
    graphdef, state = nnx.split((model, optimizer))
    valid = labels != -100

    def loss_fn(model):
        logits = model(features, ids, mask)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.sum(valid)

    # XLA's backend optimisations change nothing compared here and take half the compile time.
    @partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def step(state):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss, grads

    for i in range(steps):
        state, loss, grads = step(state)
        if i == 0:
            first = (float(loss), harness.flax_in_torch_layout(model, grads))
    nnx.update((model, optimizer), state)
    return first


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    torch_model = harness.adapted(whisper.torch_model(seed=4, scale=whisper.DECODING_SCALE), LORA, "torch")
    harness.randomize_adapters(torch_model, seed=4, scale=0.1)
    torch_model.eval()
    flax_model = harness.placeholder(
        lambda: harness.adapted(
            WhisperForConditionalGeneration(torch_model.config, rngs=nnx.Rngs(0)), LORA, "flax"
        )
    )
    flax_model.eval()
    converters.torch_to_flax(torch_model, flax_model)
    features = whisper.features(seed=4)
    ids, mask = whisper.DECODER_IDS, whisper.DECODER_MASK
    labels = _labels(ids, mask)
    torch_first = _train_torch(torch_model, features, ids, mask, labels, harness.STEPS)
    flax_first = _train_flax(flax_model, features, ids, mask, labels, harness.STEPS)
    return torch_model, flax_model, torch_first, flax_first, features


def test_cross_entropy_and_adapter_gradients_match(trained):
    _, _, (torch_loss, torch_grads), (flax_loss, flax_grads), _ = trained
    assert abs(torch_loss - flax_loss) < 1e-5
    assert sorted(flax_grads) == sorted(torch_grads) and len(torch_grads) == 2 * 13  # 13 layers, down and up
    harness.assert_close(torch_grads, flax_grads, atol=1e-4, rtol=1e-4, what="gradient")
    assert all(np.abs(g).max() > 0 for g in torch_grads.values())


def test_ten_adamw_steps_land_together_and_greedy_tokens_agree_after_training(trained):
    torch_model, flax_model, _, _, features = trained
    after_torch = harness.torch_state_dict(torch_model)
    after_flax = torch_style_state_dict(flax_model)
    harness.assert_close(after_torch, after_flax, atol=1e-4, rtol=1e-4, what="after 10 steps")

    prompt = np.array([[2, 40], [2, 41]], np.int64)
    expected = whisper.torch_greedy(torch_model, features, prompt, 8, eos_token_id=63)
    np.testing.assert_array_equal(
        np.asarray(flax_model.generate(features, prompt, 8, eos_token_id=63)), expected
    )


def test_trained_flax_model_goes_back_to_pytorch_bit_exact(trained):
    torch_model, flax_model, *_ = trained
    target = copy.deepcopy(torch_model)
    converters.flax_to_torch(flax_model, target)
    back = harness.torch_state_dict(target)
    for key, value in torch_style_state_dict(flax_model).items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert target.adapted_model.proj_out.weight is target.adapted_model.model.decoder.embed_tokens.weight
