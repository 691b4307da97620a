"""Build our ``AdaptedModel`` and SpeechBrain's from one model factory, and compare them.

The comparison is written for any model, not for the ones in ``tests/zoo/torch_models.py``: hand
:func:`build_twins` a factory (called under a fixed seed) and :func:`assert_twins_agree` a
function making an input, and it checks everything a user swapping SpeechBrain for us relies on.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torch_impl
from tests.conftest import import_speechbrain_adapters

Factory = Callable[[], nn.Module]

# SPEC "Equivalence": float32 outputs to 1e-5, gradients to 1e-4. Our fused LoRA Linear path
# orders the float sums differently from SpeechBrain's formula, so results are not bitwise equal.
FORWARD_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
GRADIENT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def speechbrain_adapters():
    """``speechbrain.nnet.adapters``, or a clean skip where SpeechBrain is not installed."""
    try:
        adapters = import_speechbrain_adapters()
    except ImportError as exc:  # pragma: no cover - CI installs speechbrain
        pytest.skip(f"speechbrain is not installed: {exc}")
    purge_speechbrain_lazy_modules()
    return adapters


def purge_speechbrain_lazy_modules() -> list[str]:
    """Take SpeechBrain's lazy-import placeholders out of ``sys.modules``; returns their names.

    SpeechBrain puts ``LazyModule`` objects for optional integrations (k2, spacy, flair, ...)
    into ``sys.modules``; touching one imports its target, which raises ``ImportError`` when the
    optional dependency is absent. Hypothesis scans every module in ``sys.modules`` for constants
    the first time it draws after new imports, so any property test run later in the same
    process (any test package, under ``pytest -n``) would fail with that ImportError. The
    placeholders stay reachable as attributes of their parent packages.
    """
    importutils = sys.modules.get("speechbrain.utils.importutils")
    if importutils is None:
        return []
    lazy = [name for name, module in list(sys.modules.items()) if isinstance(module, importutils.LazyModule)]
    for name in lazy:
        del sys.modules[name]
    return lazy


@dataclass
class Twins:
    """Our adapted model and SpeechBrain's, built from the same base weights and seed."""

    ours: torch_impl.AdaptedModel
    theirs: nn.Module
    ours_warnings: list[str]
    theirs_warnings: list[str]
    rebuild: Callable[[], Twins] = field(repr=False)


def _adapt(adapted_model_cls: type, adapter_cls: type, base: nn.Module, seed: int, kwargs: dict[str, Any]):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(seed)
        model = adapted_model_cls(base, adapter_cls, **copy.deepcopy(kwargs))
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return model, [m for m in messages if "multi-head attention" in m]


def build_twins(sb, factory: Factory, adapter: str = "LoRA", *, seed: int = 0, **kwargs: Any) -> Twins:
    """Adapt two copies of ``factory()`` (seeded) with ours and SpeechBrain's ``AdaptedModel``.

    ``adapter`` names the class in both modules (``"LoRA"`` or ``"HoulsbyAdapterLinear"``);
    ``kwargs`` go to both constructors (patterns as lists: SpeechBrain iterates a string).
    Adapters are created under the same seed, so they start with the same numbers. With
    ``manual_adapter_insertion=True`` both models' ``insert_adapters()`` is called afterwards,
    under one more shared seed (what a SpeechBrain user does after loading pretrained weights).
    """
    kwargs.setdefault("adapter_kwargs", {})
    torch.manual_seed(seed)
    base = factory()
    base_copy = copy.deepcopy(base)
    ours, ours_warnings = _adapt(
        torch_impl.AdaptedModel, getattr(torch_impl, adapter), base, seed + 1, kwargs
    )
    theirs, theirs_warnings = _adapt(sb.AdaptedModel, getattr(sb, adapter), base_copy, seed + 1, kwargs)
    if kwargs.get("manual_adapter_insertion"):
        assert repr(ours) == repr(theirs) == f"AdaptedModel(\n  (adapted_model): {_indent(repr(base))}\n)"
        for model in (ours, theirs):
            torch.manual_seed(seed + 2)
            model.insert_adapters()
    return Twins(
        ours,
        theirs,
        ours_warnings,
        theirs_warnings,
        lambda: build_twins(sb, factory, adapter, seed=seed, **kwargs),
    )


def _indent(text: str) -> str:
    return text.replace("\n", "\n  ")


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def randomize_trainable(model: nn.Module, seed: int = 1234) -> None:
    """Give every trainable parameter random values, so adapters actually change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def assert_state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> None:
    keys = list(a) if keys is None else list(keys)
    for key in keys:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


def _forward(model: nn.Module, x: torch.Tensor, *, train: bool) -> torch.Tensor:
    model.train(train)
    return model(x)


def assert_twins_agree(
    twins: Twins,
    make_input: Callable[[], torch.Tensor],
    tmp_path: Path,
    *,
    eval_mode: bool = True,
) -> None:
    """Everything a user swapping SpeechBrain's ``AdaptedModel`` for ours relies on.

    Same printed structure, ``state_dict`` keys and initial numbers; same trainable set and
    multi-head-attention warnings; after giving the trainable parameters random values, the
    same outputs (train mode, and eval mode unless ``eval_mode=False``) and gradients; and
    each one's ``saver`` file loads into a fresh copy of the other.
    """
    ours, theirs = twins.ours, twins.theirs
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert_state_dicts_equal(ours.state_dict(), theirs.state_dict())
    assert trainable_names(ours) == trainable_names(theirs)
    assert trainable_names(ours), "the comparison needs at least one trainable parameter"
    assert twins.ours_warnings == twins.theirs_warnings

    randomize_trainable(ours)
    theirs.load_state_dict(ours.state_dict())
    torch.manual_seed(99)
    x = make_input()
    out_ours = _forward(ours, x, train=True)
    out_theirs = _forward(theirs, x, train=True)
    torch.testing.assert_close(out_ours, out_theirs, **FORWARD_TOLERANCE)
    assert not torch.allclose(out_ours, _forward(twins.rebuild().ours, x, train=True)), (
        "random adapter weights should change the output"
    )

    weights = torch.randn_like(out_ours)
    (out_ours * weights).sum().backward()
    (out_theirs * weights).sum().backward()
    grads_theirs = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            torch.testing.assert_close(p.grad, grads_theirs[name].grad, **GRADIENT_TOLERANCE)
        else:
            assert p.grad is None, f"frozen {name} got a gradient"

    if eval_mode:
        with torch.no_grad():
            torch.testing.assert_close(
                _forward(ours, x, train=False), _forward(theirs, x, train=False), **FORWARD_TOLERANCE
            )

    _assert_checkpoints_cross(twins, tmp_path)


def _assert_checkpoints_cross(twins: Twins, tmp_path: Path) -> None:
    ours, theirs = twins.ours, twins.theirs
    ours_file, theirs_file = tmp_path / "ours.ckpt", tmp_path / "theirs.ckpt"
    ours.saver(ours_file)
    theirs.saver(theirs_file)

    ours_keys = list(torch.load(ours_file, weights_only=True))
    theirs_keys = list(torch.load(theirs_file, weights_only=True))
    assert theirs_keys == trainable_names(theirs)
    # Ours also keeps the buffers (BatchNorm running stats) of unfrozen layers.
    unfrozen_buffers = [key for key in ours_keys if key not in theirs_keys]
    buffer_names = {name for name, _ in ours.named_buffers()}
    assert [key for key in ours_keys if key in theirs_keys] == theirs_keys
    assert all(key in buffer_names for key in unfrozen_buffers), unfrozen_buffers

    fresh = twins.rebuild()
    fresh.theirs.loader(ours_file, False)
    assert_state_dicts_equal(ours.state_dict(), fresh.theirs.state_dict(), keys=ours_keys)
    fresh.ours.loader(theirs_file)
    assert_state_dicts_equal(theirs.state_dict(), fresh.ours.state_dict(), keys=theirs_keys)
