"""Every zoo pair, with every adapter kind: PyTorch and Flax compute the same numbers.

Each twin is built once per framework, adapted with the same patterns, given non-zero adapter
weights on the PyTorch side and converted to Flax with ``converters.torch_to_flax``; then each
framework runs ten AdamW steps on its own and the results are compared (SPEC, "Equivalence").
The three tests of one case read one cached run (``harness.run_case``).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.zoo.pairs import PAIRS

from . import harness

CASES = [
    pytest.param(pair.name, case.name, id=f"{pair.name}-{case.name}") for pair in PAIRS for case in pair.cases
]


@pytest.mark.parametrize(("pair", "case"), CASES)
def test_forward_outputs_agree_with_nonzero_adapters(pair, case):
    result = harness.run_case(pair, case)

    harness.assert_close(
        result.torch_outputs, result.flax_outputs, atol=1e-5, rtol=1e-5, what=f"{pair}/{case} output"
    )
    adapters = {k: v for k, v in result.torch_before.items() if "adapter_" in k}
    assert adapters and all(np.all(v != 0) for v in adapters.values()), "an adapter weight is zero"
    assert harness.max_abs_diff(result.base_outputs, result.torch_outputs) > 1e-3, (
        "the adapters change nothing"
    )


@pytest.mark.parametrize(("pair", "case"), CASES)
def test_gradients_of_every_trainable_parameter_agree(pair, case):
    result = harness.run_case(pair, case)

    # Same keys: the Flax trainable filter selects exactly what requires grad in PyTorch.
    assert sorted(result.flax_grads) == sorted(result.torch_grads)
    assert all(np.any(g != 0) for g in result.torch_grads.values()), "a trainable parameter gets no gradient"
    harness.assert_close(
        result.torch_grads, result.flax_grads, atol=1e-4, rtol=1e-4, what=f"{pair}/{case} gradient"
    )


@pytest.mark.parametrize(("pair", "case"), CASES)
def test_ten_adamw_steps_land_within_1e_4(pair, case):
    result = harness.run_case(pair, case)

    moved = [k for k in result.torch_grads if not np.allclose(result.torch_before[k], result.torch_after[k])]
    assert sorted(moved) == sorted(result.torch_grads), "a trainable parameter did not move"
    # Every weight, frozen ones included: those must not have moved on either side.
    harness.assert_close(
        result.torch_after, result.flax_after, atol=1e-4, rtol=0, what=f"{pair}/{case} after 10 steps"
    )


@pytest.mark.parametrize(("pair", "case"), CASES)
def test_weights_converted_back_after_flax_training_are_bit_exact(pair, case):
    result = harness.run_case(pair, case)

    assert sorted(result.converted_back) == sorted(result.flax_after)
    changed = [
        k for k in result.flax_after if not np.array_equal(result.converted_back[k], result.flax_after[k])
    ]
    assert not changed, f"flax_to_torch changed the bits of {changed}"
