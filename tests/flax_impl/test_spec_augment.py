"""SpecAugment in the speech twins' training mode: the JAX draw of the random spans has the
distribution of transformers' ``_compute_mask_indices`` (compared statistically against the real
function), and ``Wav2Vec2Model``/``HubertModel``/``WavLMModel`` apply it as transformers'
``_mask_hidden_states`` does: time spans become ``masked_spec_embed``, feature spans 0, only in
training mode, from the model's own random stream, under ``jax.jit`` and inside ``AdaptedModel``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_impl import AdaptedModel, LoRA
from flax_impl.models import Wav2Vec2Model
from flax_impl.models._speech import compute_mask_indices

# The reference is transformers' own function, and the twins' configs come from the zoo's torch
# models: the jax-only environment skips this file, the full run runs it.
torch = pytest.importorskip("torch")
from tests.zoo import speech  # noqa: E402

transformers_wav2vec2 = pytest.importorskip("transformers.models.wav2vec2.modeling_wav2vec2")

DRAWS = 4000

#: (batch, size), real lengths per row (None: no attention mask), mask_prob, mask_length, min_masks.
#: "defaults": transformers' time-mask defaults on 49 frames (1 s) with rows too short for a span;
#: "several": several spans per row that merge; "rounding": min_masks=0, so epsilon decides
#: whether a row (or, through the full-length row, the whole batch) gets a span at all;
#: "features": a feature mask (no attention mask), as for mask_feature_prob.
SETTINGS = {
    "defaults": ((4, 49), (49, 30, 12, 5), 0.05, 10, 2),
    "several": ((3, 60), (60, 41, 20), 0.3, 4, 0),
    "rounding": ((3, 30), (30, 20, 8), 0.1, 5, 0),
    "features": ((2, 16), None, 0.5, 3, 0),
}


def _attention_mask(shape, lengths):
    if lengths is None:
        return None
    return np.arange(shape[1])[None, :] < np.asarray(lengths)[:, None]


@functools.cache
def _draws(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``DRAWS`` masks ``(draws, batch, size)`` from transformers and from the JAX twin (fixed seeds)."""
    shape, lengths, prob, length, min_masks = SETTINGS[name]
    mask = _attention_mask(shape, lengths)
    np.random.seed(0)  # transformers draws from NumPy's global generator
    torch_mask = None if mask is None else torch.from_numpy(mask.astype(np.int64))
    expected = np.stack(
        [
            transformers_wav2vec2._compute_mask_indices(shape, prob, length, torch_mask, min_masks)
            for _ in range(DRAWS)
        ]
    )
    draw = jax.jit(jax.vmap(lambda key: compute_mask_indices(key, shape, prob, length, mask, min_masks)))
    actual = np.asarray(draw(jax.random.split(jax.random.key(0), DRAWS)))
    return expected, actual


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """``(start, length)`` of each maximal run of True in ``row``."""
    padded = np.concatenate([[False], row, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _mean_tolerance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Five standard errors of the difference of two sample means (plus a hair for zero variance)."""
    return 5.0 * np.sqrt((a.var(0) + b.var(0)) / len(a)) + 1e-9


@pytest.mark.parametrize("name", SETTINGS)
def test_masked_frames_and_runs_per_row_have_transformers_means(name):
    expected, actual = _draws(name)
    for stat in (
        lambda m: m.sum(-1).astype(float),  # masked frames per row
        lambda m: np.array([[len(_runs(r)) for r in d] for d in m], float),  # runs (merged spans) per row
    ):
        e, a = stat(expected), stat(actual)
        np.testing.assert_array_less(np.abs(e.mean(0) - a.mean(0)), _mean_tolerance(e, a))


@pytest.mark.parametrize("name", SETTINGS)
def test_the_per_frame_masking_probability_is_transformers(name):
    expected, actual = _draws(name)
    p_expected, p_actual = expected.mean(0), actual.mean(0)
    tolerance = 5.0 * np.sqrt((p_expected * (1 - p_expected) + p_actual * (1 - p_actual)) / DRAWS) + 1e-9

    np.testing.assert_array_less(np.abs(p_expected - p_actual), tolerance)
    # Where transformers never (always) masks, neither does the twin.
    np.testing.assert_array_equal(p_actual == 0, p_expected == 0)
    np.testing.assert_array_equal(p_actual == 1, p_expected == 1)


@pytest.mark.parametrize("name", SETTINGS)
def test_rows_share_one_rounding_epsilon_as_in_transformers(name):
    """transformers draws one epsilon per call: the rows' span counts move together."""
    expected, actual = _draws(name)
    e, a = expected.sum(-1).astype(float), actual.sum(-1).astype(float)
    e_cov = (e[:, 0] - e[:, 0].mean()) * (e[:, -1] - e[:, -1].mean())
    a_cov = (a[:, 0] - a[:, 0].mean()) * (a[:, -1] - a[:, -1].mean())

    assert abs(e_cov.mean() - a_cov.mean()) < 5.0 * np.sqrt((e_cov.var() + a_cov.var()) / DRAWS) + 1e-9


@pytest.mark.parametrize("name", SETTINGS)
def test_spans_are_whole_within_the_real_frames_and_min_masks_holds(name):
    shape, lengths, prob, length, min_masks = SETTINGS[name]
    lengths = lengths or (shape[1],) * shape[0]
    for masks in _draws(name):
        for draw in masks:
            for row, real in zip(draw, lengths, strict=True):
                runs = _runs(row)
                # transformers' dummy index for a row without spans: its last (padding) frame alone.
                dummy = [(shape[1] - 1, 1)] if real < shape[1] else []
                spans = [r for r in runs if r not in dummy]
                assert all(size >= length for _, size in spans), runs
                assert all(start + size <= real for start, size in spans), (runs, real)
                if spans:
                    assert (shape[1] - 1, 1) not in runs
                if min_masks and real >= length + min_masks - 1:
                    assert sum(size for _, size in spans) >= length, runs  # at least one span


def test_min_masks_spans_are_drawn_for_every_long_enough_row():
    """min_masks=2 of length 10 on 49 frames: rows of >= 11 frames get two distinct starts (a
    merged run of >= 11 frames, or two runs)."""
    _, actual = _draws("defaults")
    for row in (0, 1, 2):
        runs = [_runs(r) for r in actual[:, row]]
        assert all(len(rs) == 2 or (len(rs) == 1 and rs[0][1] > 10) for rs in runs)


@pytest.mark.parametrize(
    ("mask_length", "message"), [(0, "bigger than 0"), (31, "smaller than `sequence_length`")]
)
def test_a_mask_length_transformers_refuses_is_refused_with_its_message(mask_length, message):
    with pytest.raises(ValueError, match=message):
        transformers_wav2vec2._compute_mask_indices((2, 30), 0.1, mask_length)
    with pytest.raises(ValueError, match=message):
        compute_mask_indices(jax.random.key(0), (2, 30), 0.1, mask_length)


def test_no_span_when_the_probability_and_min_masks_are_zero():
    assert not compute_mask_indices(jax.random.key(0), (2, 30), 0.0, 5).any()


# ---------------------------------------------------------------------------------------------
# The models

#: No dropout anywhere, so training mode differs from eval mode by SpecAugment alone.
NO_DROPOUT = dict(hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, layerdrop=0.0)
FAMILIES = ("wav2vec2", "hubert", "wavlm")
_WAVLM = dict(num_buckets=16, max_bucket_distance=40)


def _model(family: str, rngs: nnx.Rngs | None = None, **overrides):
    extra = _WAVLM if family == "wavlm" else {}
    config = speech.torch_config(family, **NO_DROPOUT, **extra, **overrides)
    return speech.flax_model(family, config, rngs or nnx.Rngs(params=0, dropout=1))


def _batch():
    return speech.audio_batch(np.random.default_rng(0))


def _masked_frames(model, frames: jax.Array) -> np.ndarray:
    return np.asarray((frames == model.masked_spec_embed[...]).all(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_mode_masks_time_spans_with_masked_spec_embed_and_eval_mode_does_not(family):
    model = _model(family)
    batch = _batch()
    values, mask = batch["input_values"], batch["attention_mask"]

    train_frames, _ = model.embed(values, mask)
    train_out = np.asarray(model(values, mask))
    model.eval()
    eval_frames, _ = model.embed(values, mask)
    eval_out = np.asarray(model(values, mask))

    masked = _masked_frames(model, train_frames)
    # transformers' defaults on 49 frames: two spans of 10 (min_masks=2) per row.
    assert masked.shape == (2, 49) and all(masked.sum(-1) >= 11)
    np.testing.assert_array_equal(np.asarray(train_frames)[~masked], np.asarray(eval_frames)[~masked])
    assert not _masked_frames(model, eval_frames).any()
    assert not np.allclose(train_out, eval_out)


@pytest.mark.parametrize("overrides", [dict(apply_spec_augment=False), dict(mask_time_prob=0.0)])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_mode_equals_eval_mode_without_spec_augment(family, overrides):
    model = _model(family, **overrides)
    values, mask = _batch()["input_values"], _batch()["attention_mask"]

    train_out = np.asarray(model(values, mask))
    model.eval()

    np.testing.assert_array_equal(train_out, np.asarray(model(values, mask)))


def test_two_random_states_draw_different_masks_and_nnx_rngs_with_one_seed_works():
    values = _batch()["input_values"]
    masks = [
        _masked_frames(m, m.embed(values)[0])
        for m in (_model("wav2vec2", nnx.Rngs(params=0, dropout=d)) for d in (1, 2))
    ]
    single = _model("wav2vec2", nnx.Rngs(0))
    first, second = (_masked_frames(single, single.embed(values)[0]) for _ in range(2))

    assert not np.array_equal(*masks)
    assert first.any() and not np.array_equal(first, second)  # the stream advances per call


def test_under_jit_over_split_state_the_masks_follow_the_returned_state():
    model = _model("wav2vec2")
    values = jnp.asarray(_batch()["input_values"])

    def jitted(graphdef):
        @jax.jit
        def pure(state, values):
            model = nnx.merge(graphdef, state)
            frames, _ = model.embed(values)
            return frames, nnx.state(model)

        return pure

    graphdef, state = nnx.split(model)
    pure = jitted(graphdef)
    a, new_state = pure(state, values)
    again, _ = pure(state, values)
    b, _ = pure(new_state, values)
    masked_a, masked_b = _masked_frames(model, a), _masked_frames(model, b)

    np.testing.assert_array_equal(np.asarray(a), np.asarray(again))  # same state, same draw
    assert masked_a.any() and masked_b.any() and not np.array_equal(masked_a, masked_b)
    model.eval()  # the mode is static: it is in the graphdef of a new split
    graphdef, state = nnx.split(model)
    eval_frames, _ = jitted(graphdef)(state, values)
    assert not _masked_frames(model, eval_frames).any()


@pytest.mark.parametrize("train", [True, False])
def test_given_mask_time_indices_are_used_instead_of_a_draw_in_either_mode(train):
    model = _model("wav2vec2")
    model.train() if train else model.eval()
    values = _batch()["input_values"]
    given = np.zeros((2, 49), bool)
    given[0, 3:5] = given[1, 40] = True

    frames, _ = model.embed(values, mask_time_indices=given)

    np.testing.assert_array_equal(_masked_frames(model, frames), given)


def test_feature_spans_zero_channels_on_every_frame_after_the_time_spans():
    model = _model("wav2vec2", mask_feature_prob=0.5, mask_feature_length=3)
    values = _batch()["input_values"]
    given = np.zeros((2, 49), bool)
    given[:, 7] = True

    frames = np.asarray(model.embed(values, mask_time_indices=given)[0])
    zero = (frames == 0).all(1)  # (batch, channels) zero on every frame
    embed = np.asarray(model.masked_spec_embed[...])

    assert zero.any() and not zero.all()
    for row in range(2):  # the time-masked frame is masked_spec_embed with the feature spans zeroed
        np.testing.assert_array_equal(frames[row, 7], np.where(zero[row], 0.0, embed))
    model.eval()
    assert not (np.asarray(model.embed(values)[0]) == 0).all(1).any()


def test_wav2vec2_keeps_time_spans_off_padding_and_hubert_does_not_as_in_transformers():
    """transformers' HubertModel.forward does not pass the attention mask to _mask_hidden_states."""
    batch = _batch()
    values, mask = jnp.asarray(batch["input_values"]), jnp.asarray(batch["attention_mask"])
    padding = {}
    for family in ("wav2vec2", "hubert"):
        graphdef, state = nnx.split(_model(family))

        @jax.jit
        def masked_padding(state, graphdef=graphdef):
            model = nnx.merge(graphdef, state)
            frames, frame_mask = model.embed(values, mask)
            hits = ((frames == model.masked_spec_embed[...]).all(-1) & ~frame_mask).sum()
            return hits, nnx.state(model)

        padding[family] = 0
        for _ in range(20):
            hits, state = masked_padding(state)
            padding[family] += int(hits)

    assert padding["wav2vec2"] == 0 and padding["hubert"] > 0


def test_adapted_model_train_and_eval_reach_spec_augment():
    model = AdaptedModel(
        _model("wav2vec2"),
        LoRA,
        target_layers="encoder.layers.*.attention.q_proj",
        adapter_kwargs={"rank": 2},
        rngs=nnx.Rngs(3),
    )
    values = _batch()["input_values"]

    model.eval()
    eval_out = np.asarray(model(values))
    model.train()
    train_out = np.asarray(model(values))

    assert not model.adapted_model.deterministic
    assert not np.allclose(eval_out, train_out)
    model.eval()
    np.testing.assert_array_equal(eval_out, np.asarray(model(values)))


def test_the_readme_training_step_draws_new_spans_each_step():
    """The README's idiom: jax.jit over the split (AdaptedModel, optimizer) state, gradients of the
    adapters; the SpecAugment stream advances once per step through the returned state."""
    model = AdaptedModel(
        _model("wav2vec2"),
        LoRA,
        target_layers="encoder.layers.*.attention.[qv]_proj",
        adapter_kwargs={"rank": 2},
        rngs=nnx.Rngs(3),
    )
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=model.trainable)
    graphdef, state = nnx.split((model, optimizer))
    trainable = model.trainable
    values = jnp.asarray(_batch()["input_values"])

    @jax.jit
    def train_step(state, x):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            return jnp.mean(model(x) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    for _ in range(2):
        _, state = train_step(state, values)
    nnx.update((model, optimizer), state)

    assert int(model.adapted_model.rngs.count[...]) == 2


def test_from_pretrained_comes_back_in_eval_mode_and_train_draws_spans(tmp_path):
    speech.torch_model("wav2vec2", **NO_DROPOUT).save_pretrained(str(tmp_path))
    model = Wav2Vec2Model.from_pretrained(tmp_path)
    values = _batch()["input_values"]

    assert model.deterministic and not _masked_frames(model, model.embed(values)[0]).any()
    model.train()
    assert _masked_frames(model, model.embed(values)[0]).any()
