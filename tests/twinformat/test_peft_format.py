"""``twinformat.peft_format``, the one home of PEFT's LoRA directory format: its key mapping
(factors, embedding factors, DoRA magnitudes) on numpy alone, and one table of refusals that
``converters.peft`` and both twins' ``AdaptedModel.from_pretrained`` share, checked against the
real ``peft`` where it says why a value is refused or accepted."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest

from twinformat import peft_format
from twinformat.errors import PeftConversionError

RNG = np.random.default_rng(0)
LINEAR, CONV, EMBED = "encoder.fc", "conv", "embeddings.words"


def _ours(use_dora: bool) -> dict[str, np.ndarray]:
    """Our LoRA tensors (torch layout) of rank 2: a Linear 5 -> 3, a Conv1d 4 -> 6 (kernel 3), an
    Embedding 7 x 3 (no DoRA on embeddings)."""
    tensors = {
        f"adapted_model.{LINEAR}.adapter_down_proj.weight": RNG.normal(size=(2, 5)),
        f"adapted_model.{LINEAR}.adapter_up_proj.weight": RNG.normal(size=(3, 2)),
        f"adapted_model.{CONV}.adapter_down_proj.weight": RNG.normal(size=(2, 4, 3)),
        f"adapted_model.{CONV}.adapter_up_proj.weight": RNG.normal(size=(6, 2, 1)),
    }
    if use_dora:
        tensors[f"adapted_model.{LINEAR}.adapter_magnitude"] = RNG.normal(size=3)
        tensors[f"adapted_model.{CONV}.adapter_magnitude"] = RNG.normal(size=6)
    else:
        tensors[f"adapted_model.{EMBED}.adapter_down_proj.weight"] = RNG.normal(size=(7, 2))
        tensors[f"adapted_model.{EMBED}.adapter_up_proj.weight"] = RNG.normal(size=(3, 2))
    return tensors


@pytest.mark.parametrize("use_dora", [False, True])
def test_our_tensors_cross_to_peft_layouts_and_back_unchanged(use_dora):
    ours = _ours(use_dora)
    layers = [LINEAR, CONV] if use_dora else [LINEAR, CONV, EMBED]
    config = peft_format.peft_config(layers, rank=2, alpha=3.0, use_dora=use_dora, dropout=0.1)

    theirs = peft_format.to_peft_tensors(ours, layers, embeddings=[EMBED], use_dora=use_dora)
    adapter = peft_format.peft_adapter(config, theirs, where="adapter_config.json")

    if use_dora:
        assert theirs[f"base_model.model.{CONV}.lora_magnitude_vector"].shape == (
            1,
            6,
            1,
        )  # PEFT's conv layout
        assert theirs[f"base_model.model.{LINEAR}.lora_magnitude_vector"].shape == (3,)
    else:
        assert theirs[f"base_model.model.{EMBED}.lora_embedding_A"].shape == (2, 7)  # PEFT's (r, num)
        assert adapter.embeddings == [EMBED]
    assert adapter.adapter_kwargs == {
        "rank": 2,
        "alpha": 3.0,
        "dropout": 0.1,
        **({"use_dora": True} if use_dora else {}),
    }
    assert sorted(adapter.tensors) == sorted(ours)
    for key, value in ours.items():
        np.testing.assert_array_equal(adapter.tensors[key], value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(f"base_model.model.{LINEAR}.lora_magnitude_vector"), "lacks lora_magnitude_vector"),
        (lambda t: t.update({f"base_model.model.{LINEAR}.lora_A.bias": np.zeros(2)}), "is not a LoRA factor"),
        (
            lambda t: t.update({f"base_model.model.{LINEAR}.lora_A.weight": np.zeros((3, 5))}),
            "do not fit rank 2",
        ),
        (
            lambda t: t.update({f"base_model.model.{CONV}.lora_magnitude_vector": np.ones((2, 6))}),
            "does not fit 6",
        ),
    ],
)
def test_peft_tensors_that_do_not_fit_the_config_are_refused_naming_the_layer(edit, message):
    config = peft_format.peft_config([LINEAR, CONV], rank=2, alpha=3.0, use_dora=True)
    theirs = peft_format.to_peft_tensors(_ours(True), [LINEAR, CONV], use_dora=True)
    edit(theirs)
    with pytest.raises(PeftConversionError, match=message):
        peft_format.peft_adapter(config, theirs, where="adapter_config.json")


def test_what_peft_has_no_place_for_is_refused_on_the_way_out():
    ours = {**_ours(False), "adapted_model.pooler.weight": np.zeros((3, 3))}
    with pytest.raises(PeftConversionError, match="'adapted_model.pooler.weight' is not a LoRA factor"):
        peft_format.to_peft_tensors(ours, [LINEAR, CONV, EMBED], embeddings=[EMBED])
    with pytest.raises(PeftConversionError, match="has no 'adapted_model.encoder.fc.adapter_magnitude'"):
        peft_format.to_peft_tensors(_ours(False), [LINEAR], use_dora=True)
    with pytest.raises(PeftConversionError, match=r"LoRA options \['activation'\] have no field"):
        peft_format.peft_options({"rank": 2, "activation": "relu"})


# --- one table for converters.peft and both twins, checked against peft ------------------------


@pytest.fixture(scope="module")
def sides():
    """A torch and a Flax net with one Linear ``fc`` of the same weights, and a PEFT directory
    for it written by the torch twin (real peft needed for the outputs)."""
    torch = pytest.importorskip("torch")
    nnx = pytest.importorskip("flax.nnx")
    peft = pytest.importorskip("peft")

    class TorchNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    class FlaxNet(nnx.Module):
        def __init__(self) -> None:
            self.fc = nnx.Linear(4, 3, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.fc(x)

    torch.manual_seed(0)
    net = TorchNet()

    def flax_net() -> FlaxNet:
        model = FlaxNet()
        model.fc.kernel.set_value(net.fc.weight.detach().numpy().T)
        model.fc.bias.set_value(net.fc.bias.detach().numpy())
        return model

    return torch, peft, net, flax_net


def _directory(sides, folder, **changes):
    import torch_impl

    torch, _, net, _ = sides
    model = torch_impl.AdaptedModel(
        copy.deepcopy(net), torch_impl.LoRA, target_layers="fc", adapter_kwargs={"rank": 2}
    )
    with torch.no_grad():
        model.adapted_model.fc.adapter_up_proj.weight.normal_()
    assert model.save_pretrained(folder) == "peft"
    config = json.loads((folder / peft_format.PEFT_CONFIG_NAME).read_text())
    (folder / peft_format.PEFT_CONFIG_NAME).write_text(json.dumps({**config, **changes}))


def _every_reader(sides, folder):
    """What each of the three readers does with ``folder``: the error message, or the model."""
    import converters.peft
    import flax_impl
    import torch_impl

    torch, _, net, flax_net = sides
    from flax import nnx

    readers = {
        "converters": lambda: converters.peft.read_peft_adapter(folder),
        "torch": lambda: torch_impl.AdaptedModel.from_pretrained(copy.deepcopy(net), folder),
        "flax": lambda: flax_impl.AdaptedModel.from_pretrained(flax_net(), folder, rngs=nnx.Rngs(0)),
    }
    results = {}
    for name, read in readers.items():
        try:
            results[name] = read()
        except PeftConversionError as exc:
            results[name] = str(exc)
    return results


@pytest.mark.parametrize("init", peft_format.BASE_CHANGING_INITS)
def test_every_reader_refuses_the_inits_that_rewrite_the_base_weights_with_one_message(sides, tmp_path, init):
    _directory(sides, tmp_path, init_lora_weights=init)

    results = _every_reader(sides, tmp_path)

    assert all(isinstance(r, str) for r in results.values()), results
    assert len(set(results.values())) == 1 and "rewrites the base weights" in results["torch"]
    if init in ("pissa", "olora"):  # why: loading such a config, peft itself rewrites the base layer
        torch, peft, net, _ = sides
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(net), str(tmp_path))
        assert not torch.equal(loaded.base_model.model.fc.base_layer.weight, net.fc.weight)


@pytest.mark.parametrize("init", ["eva", "orthogonal", "gaussian", "mica", False])
def test_every_reader_accepts_the_inits_that_leave_the_base_alone_with_peft_outputs(sides, tmp_path, init):
    torch, peft, net, _ = sides
    _directory(sides, tmp_path, init_lora_weights=init)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():  # peft: "eva_config is not specified", for "eva"
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(net), str(tmp_path))
    assert torch.equal(loaded.base_model.model.fc.base_layer.weight, net.fc.weight)

    results = _every_reader(sides, tmp_path)

    assert not any(isinstance(r, str) for r in results.values()), results
    with torch.no_grad():
        expected = loaded(x).numpy()
        torch.testing.assert_close(results["torch"](x).numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(results["flax"](x.numpy())), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field", sorted(peft_format.UNSUPPORTED))
def test_every_reader_refuses_the_unsupported_fields_with_one_message(sides, tmp_path, field):
    _directory(sides, tmp_path, **{field: True})

    results = _every_reader(sides, tmp_path)

    assert all(isinstance(r, str) for r in results.values()), results
    assert len(set(results.values())) == 1 and f"({field}=True) has no equivalent" in results["torch"]


def test_converters_peft_keeps_no_format_table_of_its_own():
    import converters.peft

    for name in ("_UNSUPPORTED", "_BASE_CHANGING_INITS", "_FACTORS", "_EMBEDDING_FACTORS", "_MAGNITUDE",
                 "_pattern_value", "_peft_selects", "_escape_glob", "_peft_config", "_write_directory",
                 "_check_config", "_check_values", "_parse_peft_key"):  # fmt: skip
        assert not hasattr(converters.peft, name), name
    assert converters.peft.PeftAdapter is peft_format.PeftAdapter
    assert converters.peft.PEFT_CONFIG_NAME == peft_format.PEFT_CONFIG_NAME == "adapter_config.json"
