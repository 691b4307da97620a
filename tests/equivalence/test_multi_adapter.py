"""Several named adapters, the Flax twin against the real ``peft`` (issue #23): PEFT's own
three-adapter BERT (small config, random init, every factor and DoRA magnitude perturbed) saved in
its multi-adapter layout, read by the Flax ``AdaptedModel`` (``from_pretrained`` then
``load_adapter``) and by the converters from the PyTorch twin; outputs after each
``set_adapter``, with a list active, under ``disable_adapter``, in a mixed batch and after
``delete_adapter`` equal ``PeftModel``'s; the Flax directory crosses back to PEFT."""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import converters
import flax_impl
import torch_impl
from flax_impl.models import BertModel as FlaxBert
from tests.zoo import bert

peft = pytest.importorskip("peft")

CONFIGS = {
    "default": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    "b": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["query", "key"]),
    "c": dict(r=3, lora_alpha=5, use_dora=True, target_modules=["output.dense"]),
}


def _ids(batch: int = 4) -> np.ndarray:
    return (np.arange(batch * 5).reshape(batch, 5) % bert.SMALL_CONFIG["vocab_size"]).astype(np.int64)


def _torch_out(model: torch.nn.Module, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(_ids()), **kwargs).last_hidden_state.numpy()


def _flax_out(model: nnx.Module, **kwargs) -> np.ndarray:
    return np.asarray(model(jnp.asarray(_ids()), **kwargs))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    torch_bert = bert.small_torch_bert()
    flax_bert = FlaxBert(torch_bert.config, rngs=nnx.Rngs(0))
    converters.torch_to_flax(torch_bert, flax_bert)
    flax_bert.eval()
    theirs = peft.get_peft_model(
        copy.deepcopy(torch_bert), peft.LoraConfig(init_lora_weights=False, **CONFIGS["default"])
    )
    for name in ("b", "c"):
        theirs.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **CONFIGS[name]))
    bert.randomize_peft(theirs)
    folder = tmp_path_factory.mktemp("peft") / "three"
    theirs.eval().save_pretrained(str(folder))
    return torch_bert, flax_bert, theirs, folder


def _flax_from_files(setup) -> flax_impl.AdaptedModel:
    _, flax_bert, _, folder = setup
    model = flax_impl.AdaptedModel.from_pretrained(copy.deepcopy(flax_bert), folder, rngs=nnx.Rngs(1))
    for name in ("b", "c"):
        model.load_adapter(folder / name, name, rngs=nnx.Rngs(2))
    return model


def test_flax_outputs_equal_peft_for_every_active_set_disable_mixed_batch_and_delete(setup):
    torch_bert, _, theirs, _ = setup
    ours = _flax_from_files(setup)
    base = _torch_out(torch_bert)

    for active in ("default", "b", "c", ["default", "b"], ["b", "c", "default"]):
        theirs.base_model.set_adapter(active)
        ours.set_adapter(active)
        np.testing.assert_allclose(_flax_out(ours), _torch_out(theirs), rtol=1e-5, atol=1e-5)
        with ours.disable_adapter():
            np.testing.assert_allclose(_flax_out(ours), base, rtol=1e-5, atol=1e-5)
    names = ["b", "default", "__base__", "b"]  # PEFT refuses DoRA ('c') in a mixed batch
    np.testing.assert_allclose(
        _flax_out(ours, adapter_names=names), _torch_out(theirs, adapter_names=names), rtol=1e-5, atol=1e-5
    )

    ours.delete_adapter("b")
    theirs_again = copy.deepcopy(theirs)
    theirs_again.delete_adapter("b")
    for name in ("default", "c"):
        ours.set_adapter(name)
        theirs_again.set_adapter(name)
        np.testing.assert_allclose(_flax_out(ours), _torch_out(theirs_again), rtol=1e-5, atol=1e-5)


def test_the_converters_carry_every_adapter_from_the_torch_twin_and_the_flax_files_load_in_peft(
    setup, tmp_path
):
    torch_bert, flax_bert, theirs, folder = setup
    torch_model = torch_impl.AdaptedModel.from_pretrained(copy.deepcopy(torch_bert), folder)
    flax_model = flax_impl.AdaptedModel(
        copy.deepcopy(flax_bert),
        flax_impl.LoRA,
        target_layers=bert.QUERY_VALUE,
        adapter_kwargs={"rank": 4, "alpha": 8},
        rngs=nnx.Rngs(1),
    )
    for name, targets, kwargs in (
        ("b", ["*.query", "*.key"], {"rank": 2, "alpha": 3, "use_rslora": True}),
        ("c", ["*output.dense"], {"rank": 3, "alpha": 5, "use_dora": True}),
    ):
        torch_model.load_adapter(folder / name, name)
        flax_model.add_adapter(name, flax_impl.LoRA, targets, adapter_kwargs=kwargs, rngs=nnx.Rngs(2))

    converters.torch_to_flax(torch_model, flax_model)

    flax_model.eval()
    for name in ("default", "b", "c"):
        flax_model.set_adapter(name)
        theirs.base_model.set_adapter(name)
        np.testing.assert_allclose(_flax_out(flax_model), _torch_out(theirs), rtol=1e-5, atol=1e-5)

    assert flax_model.save_pretrained(tmp_path / "flax") == {"default": "peft", "b": "peft", "c": "peft"}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_bert), str(tmp_path / "flax")).eval()
    for name in ("b", "c"):
        loaded.load_adapter(str(tmp_path / "flax" / name), adapter_name=name)
    for name in ("default", "b", "c"):
        loaded.set_adapter(name)
        theirs.base_model.set_adapter(name)
        np.testing.assert_allclose(_torch_out(loaded), _torch_out(theirs), rtol=1e-5, atol=1e-5)


def test_flax_weighted_adapters_and_merge_and_unload_equal_peft(setup):
    torch_bert, _, peft_model, _ = setup
    theirs = copy.deepcopy(peft_model)
    ours = _flax_from_files(setup)

    for new, adapters, weights, kind in (
        ("lin", ["b", "b"], [0.5, -0.25], "linear"),
        ("cat", ["default", "b"], [1.0, 0.5], "cat"),
    ):
        theirs.add_weighted_adapter(adapters, weights, new, combination_type=kind)
        ours.add_weighted_adapter(adapters, weights, new, combination_type=kind, rngs=nnx.Rngs(5))
        theirs.set_adapter(new)
        ours.set_adapter(new)
        np.testing.assert_allclose(_flax_out(ours), _torch_out(theirs), rtol=1e-5, atol=1e-5)

    plain = ours.merge_and_unload(adapter_names=["default", "b", "c"])
    merged = theirs.merge_and_unload(adapter_names=["default", "b", "c"])
    assert type(plain).__name__ == "BertModel"
    np.testing.assert_allclose(
        np.asarray(plain(jnp.asarray(_ids()))), _torch_out(merged), rtol=1e-5, atol=1e-5
    )
