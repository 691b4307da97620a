"""One list of glob patterns selects the same layers in a PyTorch model and in its Flax twin."""

from __future__ import annotations

import pytest
import torch
from flax import nnx

import flax_impl
import torch_impl
from flax_impl.graph import named_modules
from tests.zoo.pairs import PAIRS
from twinformat.errors import NoMatchError

from . import harness

CASES = [pytest.param(pair, case, id=f"{pair.name}-{case.name}") for pair in PAIRS for case in pair.cases]


@pytest.mark.parametrize("pair", [pytest.param(pair, id=pair.name) for pair in PAIRS])
def test_twin_module_names_equal_torch_named_modules(pair):
    torch_names = [name for name, _ in pair.make_torch().named_modules()]
    flax_names = [name for name, _ in named_modules(harness.placeholder(lambda: pair.make_flax(nnx.Rngs(0))))]

    assert {
        "only in flax": set(flax_names) - set(torch_names),
        "only in torch": set(torch_names) - set(flax_names),
    } == {
        "only in flax": set(),
        "only in torch": set(),
    }
    assert len(flax_names) == len(torch_names)


@pytest.mark.parametrize(("pair", "case"), CASES)
def test_same_patterns_adapt_and_unfreeze_the_same_layers(pair, case):
    torch_model = harness.adapted(pair.make_torch(), case, "torch")
    flax_model = harness.placeholder(lambda: harness.adapted(pair.make_flax(nnx.Rngs(0)), case, "flax"))

    adapter_types = (torch_impl.LoRA, torch_impl.HoulsbyAdapterLinear)
    torch_adapted = sorted(n for n, m in torch_model.named_modules() if isinstance(m, adapter_types))
    flax_types = (flax_impl.LoRA, flax_impl.HoulsbyAdapterLinear)
    flax_adapted = sorted(n for n, m in named_modules(flax_model) if isinstance(m, flax_types))
    assert torch_adapted and flax_adapted == torch_adapted
    assert sorted(flax_model.replace_layers) == sorted(torch_model.replace_layers)

    torch_trainable = sorted(n for n, p in torch_model.named_parameters() if p.requires_grad)
    flax_trainable = sorted(
        harness.flax_in_torch_layout(flax_model, nnx.state(flax_model, flax_model.trainable))
    )
    assert flax_trainable == torch_trainable


@pytest.mark.parametrize(
    ("patterns", "bad"),
    [
        ({"target_layers": ["layer3"]}, "layer3"),
        ({"target_layers": ["layer1"], "unfrozen_layers": "nrom"}, "nrom"),
        ({"target_layers": ["layer1", "Layer2"]}, "Layer2"),
    ],
    ids=["missing-target", "typo-unfrozen", "case-sensitive"],
)
def test_a_pattern_matching_no_layer_is_refused_by_both_twins(patterns, bad):
    pair = PAIRS[0]  # the MLP: layer1, norm, layer2, head
    with pytest.raises(NoMatchError, match=repr(bad)):
        torch_impl.AdaptedModel(pair.make_torch(), torch_impl.LoRA, **patterns)
    with pytest.raises(NoMatchError, match=repr(bad)):
        flax_impl.AdaptedModel(pair.make_flax(nnx.Rngs(0)), flax_impl.LoRA, **patterns, rngs=nnx.Rngs(0))


def test_a_single_string_is_one_pattern_in_both_twins():
    pair = PAIRS[0]
    torch_model = torch_impl.AdaptedModel(pair.make_torch(), torch_impl.LoRA, target_layers="layer1")
    flax_model = flax_impl.AdaptedModel(
        pair.make_flax(nnx.Rngs(0)), flax_impl.LoRA, target_layers="layer1", rngs=nnx.Rngs(0)
    )
    assert torch_model.replace_layers == flax_model.replace_layers == ["layer1"]
    assert isinstance(torch_model.adapted_model.head, torch.nn.Linear)
