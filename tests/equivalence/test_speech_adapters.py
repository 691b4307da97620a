"""The speech twins with adapters: PyTorch (transformers + torch_impl) and Flax compute the same numbers.

Per pair (wav2vec2, HuBERT, WavLM, Whisper's encoder) and adapter case (LoRA on attention
projections, feed-forward layers and feature-extractor convs by glob, Houlsby on the feed-forward
output, ``unfrozen_layers``): the torch model gets non-zero adapters, is converted to Flax with
``converters.torch_to_flax``, both train ten AdamW steps on 1 s of audio (Whisper: 80 x 3000
features) on a batch whose second row is padded (attention mask), and the results are compared at SPEC's tolerances;
then the trained Flax weights go back to PyTorch bit-exact. The four tests of one case read one run.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from tests.zoo.speech import SPEECH_PAIRS, SPEECH_PAIRS_BY_NAME

from . import harness

CASES = [
    pytest.param(pair.name, case.name, id=f"{pair.name}-{case.name}")
    for pair in SPEECH_PAIRS
    for case in pair.cases
]


@functools.cache
def run(pair_name: str, case_name: str) -> harness.CaseResult:
    pair = SPEECH_PAIRS_BY_NAME[pair_name]
    return harness.run_pair(pair, pair.case(case_name))


@pytest.mark.parametrize(("pair", "case"), CASES)
def test_forward_outputs_agree_on_a_padded_batch(pair, case):
    result = run(pair, case)

    harness.assert_close(
        result.torch_outputs, result.flax_outputs, atol=1e-5, rtol=1e-5, what=f"{pair}/{case}"
    )
    assert harness.max_abs_diff(result.base_outputs, result.torch_outputs) > 1e-3, (
        "the adapters change nothing"
    )


@pytest.mark.parametrize(("pair", "case"), CASES)
def test_gradients_of_every_trainable_parameter_agree(pair, case):
    result = run(pair, case)

    assert sorted(result.flax_grads) == sorted(result.torch_grads)
    assert all(np.any(g != 0) for g in result.torch_grads.values()), "a trainable parameter gets no gradient"
    harness.assert_close(
        result.torch_grads, result.flax_grads, atol=1e-4, rtol=1e-4, what=f"{pair}/{case} grad"
    )


@pytest.mark.parametrize(("pair", "case"), CASES)
def test_ten_adamw_steps_land_within_1e_4(pair, case):
    result = run(pair, case)

    moved = [k for k in result.torch_grads if not np.allclose(result.torch_before[k], result.torch_after[k])]
    assert sorted(moved) == sorted(result.torch_grads), "a trainable parameter did not move"
    harness.assert_close(
        result.torch_after, result.flax_after, atol=1e-4, rtol=0, what=f"{pair}/{case} after"
    )


@pytest.mark.parametrize(("pair", "case"), CASES)
def test_weights_converted_back_after_flax_training_are_bit_exact(pair, case):
    result = run(pair, case)

    assert sorted(result.converted_back) == sorted(result.flax_after)
    changed = [
        k for k in result.flax_after if not np.array_equal(result.converted_back[k], result.flax_after[k])
    ]
    assert not changed, f"flax_to_torch changed the bits of {changed}"


def test_lora_on_wavlm_attention_projections_agrees_across_frameworks():
    from tests.zoo.pairs import _lora

    pair = SPEECH_PAIRS_BY_NAME["wavlm"]
    twins = harness.build_twins(pair, _lora("qv", target_layers=("encoder.layers.*.attention.[qv]_proj",)))
    batch = pair.make_batch(np.random.default_rng(0))

    harness.assert_close(
        harness.torch_outputs(twins, batch),
        harness.flax_outputs(twins, batch),
        atol=1e-5,
        rtol=1e-5,
        what="wavlm q,v",
    )
