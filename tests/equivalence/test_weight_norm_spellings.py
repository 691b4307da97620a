"""Weight norm's two spellings cross both ways: ``weight_g``/``weight_v`` (``torch.nn.utils.weight_norm``,
as transformers 4.x with an older torch writes wav2vec2, HuBERT and WavLM's positional conv) and
``parametrizations.weight.original0/1`` (``torch.nn.utils.parametrizations.weight_norm``), from state
dicts, files and models (0.1's ``converters.torch_to_flax`` refused the older spelling:
``missing ...original0/1, unexpected ...weight_g/weight_v``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax import nnx  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import converters  # noqa: E402
from tests.equivalence import harness  # noqa: E402
from tests.zoo import speech  # noqa: E402
from tests.zoo.arrays import randomize_torch  # noqa: E402

FAMILIES = ("wav2vec2", "hubert", "wavlm")
NEW = ("parametrizations.weight.original0", "parametrizations.weight.original1")
OLD = ("weight_g", "weight_v")


def _old_spelling(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        for new, old in zip(NEW, OLD, strict=True):
            if key.endswith(new):
                key = key[: -len(new)] + old
        renamed[key] = value
    return renamed


def _with_legacy_weight_norm(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its positional conv's weight norm redone by the deprecated
    ``torch.nn.utils.weight_norm`` (same g and v, same function)."""
    conv = model.encoder.pos_conv_embed.conv
    g = conv.parametrizations.weight.original0.detach().clone()
    v = conv.parametrizations.weight.original1.detach().clone()
    parametrize.remove_parametrizations(conv, "weight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(conv, name="weight", dim=2)
    with torch.no_grad():
        conv.weight_g.copy_(g)
        conv.weight_v.copy_(v)
    return model


def _models(family: str):
    torch.manual_seed(0)
    torch_model = randomize_torch(speech.torch_model(family)).eval()
    flax_model = speech.flax_model(family, torch_model.config, nnx.Rngs(1))
    flax_model.eval()
    return torch_model, flax_model


def _agree(torch_model, flax_model, what):
    batch = speech.audio_batch(np.random.default_rng(0))
    with torch.no_grad():
        expected = [t.numpy() for t in speech.run_torch_audio(torch_model, batch)]
    harness.assert_close(
        expected,
        [np.asarray(a) for a in speech.run_flax_audio(flax_model, batch)],
        atol=2e-5,
        rtol=2e-5,
        what=what,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_the_older_spelling_converts_to_flax_from_a_state_dict_and_a_file(tmp_path, family):
    torch_model, flax_model = _models(family)
    old = _old_spelling(torch_model.state_dict())
    assert any(k.endswith(".weight_g") for k in old)

    report = converters.torch_to_flax(old, flax_model)
    assert report.ok and any("older (weight_g/weight_v) spelling" in n for n in report.notes)
    _agree(torch_model, flax_model, f"{family} from an old-spelling state dict")

    save_file({k: v.contiguous() for k, v in old.items()}, str(tmp_path / "old.safetensors"))
    _, fresh = _models(family)
    assert converters.torch_to_flax(tmp_path / "old.safetensors", fresh).ok
    _agree(torch_model, fresh, f"{family} from an old-spelling file")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_under_the_deprecated_weight_norm_converts_both_ways(family):
    torch_model, flax_model = _models(family)
    legacy = _with_legacy_weight_norm(torch_model)
    assert "encoder.pos_conv_embed.conv.weight_g" in legacy.state_dict()

    assert converters.torch_to_flax(legacy, flax_model).ok  # torch -> Flax, from the model
    _agree(legacy, flax_model, f"{family} from a legacy weight-norm model")

    torch.manual_seed(5)
    target = _with_legacy_weight_norm(randomize_torch(speech.torch_model(family), seed=5).eval())
    assert converters.flax_to_torch(flax_model, target).ok  # Flax -> torch, into the old spelling
    for key, value in legacy.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)
