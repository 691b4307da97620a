"""Several named adapters through the converters (issue #23 item 5), against the real ``peft``.

PEFT's own three-adapter BERT (small config, every base weight, factor and DoRA magnitude
perturbed): ``'default'`` with ``rank_pattern``/``alpha_pattern``, ``'dora'`` (DoRA on other
layers) and ``'rs'`` (rsLoRA sharing a layer with the default), saved in PEFT's multi-adapter
layout. It crosses into both twins by ``import_peft_adapter`` with the outputs ``PeftModel``
gives after ``set_adapter``; into one of our files and back by the CLI with PEFT's tensors bit
for bit; and from both twins back to PEFT. A one-adapter model or file writes what 0.2's
converters wrote, byte for byte.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import converters
import flax_impl
import torch_impl
from converters.cli import main
from converters.files import TensorFile, write_safetensors
from converters.peft import PeftConversionError, peft_to_adapter_file, read_peft_adapter
from flax_impl.models import BertModel as FlaxBert
from tests.zoo import bert
from twinformat import peft_format
from twinformat.format import adapter_metadata

peft = pytest.importorskip("peft")

NAMES = ("default", "dora", "rs")
CONFIGS = {
    "default": dict(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        rank_pattern={"value": 2},
        alpha_pattern={"query": 16},
    ),
    "dora": dict(r=2, lora_alpha=3, use_dora=True, target_modules=["key", "intermediate.dense"]),
    "rs": dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["query"]),
}


def _ids() -> np.ndarray:
    return (np.arange(15).reshape(3, 5) * 7 % bert.SMALL_CONFIG["vocab_size"]).astype(np.int64)


def _torch_out(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(_ids())).last_hidden_state.numpy()


def _flax_out(model: nnx.Module) -> np.ndarray:
    return np.asarray(model(jnp.asarray(_ids())))


def _tensors(path: Path) -> dict[str, np.ndarray]:
    with TensorFile(path) as f:
        return {name: f.get(name) for name in f.names}


def _assert_same_bits(ours: Path, theirs: Path) -> None:
    """Two PEFT directories hold the same tensors, bit for bit (names, dtypes, shapes, bytes)."""
    a, b = _tensors(ours / peft_format.PEFT_WEIGHTS_NAME), _tensors(theirs / peft_format.PEFT_WEIGHTS_NAME)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    torch_bert = bert.small_torch_bert()
    with torch.no_grad():  # no weight at its initial value (LayerNorm's ones, zero biases)
        for param in torch_bert.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    flax_bert = FlaxBert(torch_bert.config, rngs=nnx.Rngs(0))
    converters.torch_to_flax(torch_bert, flax_bert)
    flax_bert.eval()
    theirs = peft.get_peft_model(
        copy.deepcopy(torch_bert), peft.LoraConfig(init_lora_weights=False, **CONFIGS["default"])
    )
    for name in NAMES[1:]:
        theirs.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **CONFIGS[name]))
    bert.randomize_peft(theirs)
    folder = tmp_path_factory.mktemp("peft") / "three"
    theirs.eval().save_pretrained(str(folder))
    expected = {}
    for name in NAMES:
        theirs.set_adapter(name)
        expected[name] = _torch_out(theirs)
    return torch_bert, flax_bert, folder, expected


def _subfolder(folder: Path, name: str) -> Path:
    return peft_format.peft_adapter_subdirectory(folder, name)


def _peft_outputs(torch_bert, folder: Path) -> dict[str, np.ndarray]:
    """What ``PeftModel.from_pretrained`` then ``load_adapter`` compute from ``folder``."""
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_bert), str(folder))
    for name in NAMES[1:]:
        loaded.load_adapter(str(folder / name), adapter_name=name)
    out = {}
    for name in NAMES:
        loaded.set_adapter(name)
        out[name] = _torch_out(loaded.eval())
    return out


def test_every_adapter_imports_into_both_twins_with_peft_outputs_and_exports_back(setup, tmp_path):
    torch_bert, flax_bert, folder, expected = setup
    assert converters.peft.peft_adapter_names(folder) == ["default", "dora", "rs"]
    torch_model, _ = converters.import_peft_adapter(folder, copy.deepcopy(torch_bert))
    flax_model, _ = converters.import_peft_adapter(folder, copy.deepcopy(flax_bert), rngs=nnx.Rngs(1))
    assert torch_model.layer_adapter_kwargs  # value: rank 2; query: alpha 16
    for name in NAMES[1:]:
        _, report = converters.import_peft_adapter(folder, torch_model, adapter_name=name)
        assert report.loaded and all(key.startswith("adapted_model.") for key in report.loaded)
        converters.import_peft_adapter(folder, flax_model, adapter_name=name, rngs=nnx.Rngs(2))
    assert torch_model.adapters == flax_model.adapters == list(NAMES)
    assert torch_model.named_adapter_specs["dora"]["adapter_kwargs"]["use_dora"] is True

    for name in NAMES:
        torch_model.set_adapter(name)
        flax_model.set_adapter(name)
        np.testing.assert_allclose(_torch_out(torch_model), expected[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_flax_out(flax_model), expected[name], rtol=1e-5, atol=1e-5)

    for twin, model in (("torch", torch_model), ("flax", flax_model)):
        written = converters.export_peft_adapter(model, tmp_path / twin, selected_adapters=list(NAMES))
        assert sorted(written) == sorted(NAMES) and written["default"]["rank_pattern"]
        for name in NAMES:
            _assert_same_bits(_subfolder(tmp_path / twin, name), _subfolder(folder, name))
        for name, out in _peft_outputs(torch_bert, tmp_path / twin).items():
            np.testing.assert_allclose(out, expected[name], rtol=1e-5, atol=1e-5)
        # One chosen adapter alone: a one-adapter directory PEFT reads at its root.
        converters.export_peft_adapter(
            model, tmp_path / f"{twin}-rs", adapter_name="rs", task_type="FEATURE_EXTRACTION"
        )
        _assert_same_bits(tmp_path / f"{twin}-rs", folder / "rs")
        config = json.loads((tmp_path / f"{twin}-rs" / peft_format.PEFT_CONFIG_NAME).read_text())
        assert config["task_type"] == "FEATURE_EXTRACTION" and config["use_rslora"] is True


def test_the_cli_carries_a_multi_adapter_directory_into_one_file_and_back_bit_for_bit(
    setup, tmp_path, capsys
):
    torch_bert, flax_bert, folder, expected = setup
    ours = tmp_path / "three.safetensors"
    assert main(["peft-import", str(folder), str(ours), "--selected-adapters", ",".join(NAMES)]) == 0
    with TensorFile(ours) as f:
        named = json.loads(f.metadata["named_adapters"])
        assert sorted(named) == ["dora", "rs"] and named["dora"]["adapter_kwargs"]["use_dora"] is True
        assert json.loads(f.metadata["layer_adapter_kwargs"])  # the default's rank/alpha patterns
    back = tmp_path / "back"
    assert (
        main(
            [
                "peft-export",
                str(ours),
                str(back),
                "--task-type",
                "FEATURE_EXTRACTION",
                "--base-model-name-or-path",
                "tiny-bert",
            ]
        )  # fmt: skip
        == 0
    )
    assert "adapter 'dora'" in capsys.readouterr().out
    for name in NAMES:
        _assert_same_bits(_subfolder(back, name), _subfolder(folder, name))
        config = json.loads((_subfolder(back, name) / peft_format.PEFT_CONFIG_NAME).read_text())
        assert (
            config["task_type"] == "FEATURE_EXTRACTION" and config["base_model_name_or_path"] == "tiny-bert"
        )
    for name, out in _peft_outputs(torch_bert, back).items():
        np.testing.assert_allclose(out, expected[name], rtol=1e-5, atol=1e-5)

    # The file is the twins' own: a model holding the three adapters, zeroed, loads it with loader().
    for twin, model in (
        ("torch", torch_impl.AdaptedModel.from_pretrained(copy.deepcopy(torch_bert), back)),
        ("flax", flax_impl.AdaptedModel.from_pretrained(copy.deepcopy(flax_bert), back, rngs=nnx.Rngs(1))),
    ):
        for name in NAMES[1:]:
            model.load_adapter(back / name, name, **({} if twin == "torch" else {"rngs": nnx.Rngs(2)}))
        model.set_adapter(list(NAMES))
        run = _torch_out if twin == "torch" else _flax_out
        before = run(model)
        if twin == "torch":
            with torch.no_grad():
                for param in model.parameters():
                    if param.requires_grad:
                        param.zero_()
        else:
            state = nnx.state(model, model.trainable)
            nnx.update(model, jax.tree.map(jnp.zeros_like, state))
        assert not np.allclose(run(model), before, atol=1e-3)
        model.loader(str(ours))
        np.testing.assert_array_equal(run(model), before)

    # One adapter of the file, and one adapter of the directory, by name.
    assert main(["peft-export", str(ours), str(tmp_path / "dora"), "--adapter-name", "dora"]) == 0
    _assert_same_bits(tmp_path / "dora", folder / "dora")
    assert main(["peft-import", str(folder), str(tmp_path / "rs.safetensors"), "--adapter-name", "rs"]) == 0
    assert main(["peft-export", str(tmp_path / "rs.safetensors"), str(tmp_path / "rs")]) == 0
    _assert_same_bits(tmp_path / "rs", folder / "rs")


def test_an_unknown_adapter_name_is_refused_naming_the_adapters_that_exist(setup, tmp_path, capsys):
    torch_bert, _, folder, _ = setup
    with pytest.raises(PeftConversionError, match=r"no adapter named 'zzz'.*\['default', 'dora', 'rs'\]"):
        read_peft_adapter(folder, adapter_name="zzz")
    model, _ = converters.import_peft_adapter(folder, copy.deepcopy(torch_bert))
    with pytest.raises(PeftConversionError, match=r"no adapter named 'zzz'.*\['default', 'dora', 'rs'\]"):
        converters.import_peft_adapter(folder, model, adapter_name="zzz")
    assert model.adapters == ["default"]
    with pytest.raises(PeftConversionError, match=r"no adapter named 'zzz'; this model holds \['default'\]"):
        converters.export_peft_adapter(model, tmp_path / "out", adapter_name="zzz")

    ours = tmp_path / "two.safetensors"
    assert main(["peft-import", str(folder), str(ours), "--selected-adapters", "default,rs"]) == 0
    assert main(["peft-export", str(ours), str(tmp_path / "out"), "--selected-adapters", "rs,zzz"]) == 1
    error = capsys.readouterr().err
    assert "no adapter named 'zzz'" in error and "holds ['default', 'rs']" in error
    assert main(["peft-import", str(folder), str(tmp_path / "x.safetensors"), "--adapter-name", "zzz"]) == 1
    assert "['default', 'dora', 'rs']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.safetensors").exists()


def test_modules_to_save_cross_as_unfrozen_layers_and_only_the_first_adapter_of_a_file_holds_them(
    setup, tmp_path
):
    torch_bert, flax_bert, _, _ = setup
    theirs = peft.get_peft_model(
        copy.deepcopy(torch_bert),
        peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["value"], modules_to_save=["pooler"], init_lora_weights=False
        ),
    )
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.3)
    theirs.eval().save_pretrained(str(tmp_path / "saved"))
    with torch.no_grad():
        expected = theirs(input_ids=torch.from_numpy(_ids())).pooler_output.numpy()

    model, _ = converters.import_peft_adapter(tmp_path / "saved", copy.deepcopy(torch_bert))
    assert model.unfrozen_module_names == ["pooler"]
    with torch.no_grad():
        np.testing.assert_allclose(
            model(input_ids=torch.from_numpy(_ids())).pooler_output.numpy(), expected, rtol=1e-5, atol=1e-5
        )
    flax_model, _ = converters.import_peft_adapter(
        tmp_path / "saved", copy.deepcopy(flax_bert), rngs=nnx.Rngs(1)
    )
    pooled = np.asarray(flax_model.pooler(flax_model(jnp.asarray(_ids()))))
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-5)
    converters.export_peft_adapter(flax_model, tmp_path / "flax")
    _assert_same_bits(tmp_path / "flax", tmp_path / "saved")
    assert json.loads((tmp_path / "flax" / peft_format.PEFT_CONFIG_NAME).read_text())["modules_to_save"] == [
        "pooler"
    ]

    with pytest.raises(PeftConversionError, match="modules_to_save"):
        peft_to_adapter_file(tmp_path / "saved", tmp_path / "x.safetensors")  # the file merge's reader
    peft_to_adapter_file(tmp_path / "saved", tmp_path / "ours.safetensors", full=True)
    converters.export_peft_adapter(tmp_path / "ours.safetensors", tmp_path / "back")
    _assert_same_bits(tmp_path / "back", tmp_path / "saved")

    (tmp_path / "saved" / "other").mkdir()
    for name in (peft_format.PEFT_CONFIG_NAME, peft_format.PEFT_WEIGHTS_NAME):
        (tmp_path / "saved" / "other" / name).write_bytes((tmp_path / "saved" / name).read_bytes())
    with pytest.raises(
        PeftConversionError, match="adapter 'other' has modules_to_save.*only the first adapter"
    ):
        peft_to_adapter_file(
            tmp_path / "saved", tmp_path / "y.safetensors", selected_adapters=["default", "other"], full=True
        )
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def _old_export(model, directory: Path) -> None:
    """What 0.2's ``export_peft_adapter(model, directory)`` wrote for a one-adapter model: the
    factors read through the bridge, ``peft_files`` of the layers and kwargs alone."""
    state = converters.sides.model_state(model)
    factors = (".adapter_down_proj.weight", ".adapter_up_proj.weight", ".adapter_magnitude")
    tensors = {k: np.ascontiguousarray(state.read(k)) for k in state.specs if k.endswith(factors)}
    embeddings = [
        layer
        for layer in model.replace_layers
        if isinstance(model.adapted_model.get_submodule(layer).pretrained_module, torch.nn.Embedding)
    ]
    from twinformat.adapters import LORA

    config, peft_tensors = peft_format.peft_files(
        tensors,
        model.replace_layers,
        LORA.kwargs(model.adapter_kwargs),
        embeddings=embeddings,
        where=str(model),
    )
    peft_format.write_adapter_directory(
        directory,
        peft=True,
        config=config,
        write_weights=lambda p: write_safetensors(p, peft_tensors, {"format": "pt"}),
    )


def _old_import(directory: Path, path: Path) -> None:
    """What 0.2's ``peft_to_adapter_file(directory, path)`` wrote for a one-adapter directory."""
    adapter = read_peft_adapter(directory, full=False)
    metadata = adapter_metadata(
        framework="peft",
        adapter_class="LoRA",
        adapter_kwargs=adapter.adapter_kwargs,
        target_layers=[peft_format.escape_glob(layer) for layer in adapter.layers],
    )
    kinds = {}
    for layer in adapter.embeddings:
        kinds[f"adapted_model.{layer}.pretrained_module"] = "embedding"
        kinds[f"adapted_model.{layer}.adapter_down_proj"] = "embedding"
        kinds[f"adapted_model.{layer}.adapter_up_proj"] = "linear"
    if kinds:
        metadata["layer_kinds"] = json.dumps(kinds, sort_keys=True)
    write_safetensors(path, adapter.tensors, metadata)


@pytest.mark.parametrize(
    ("kwargs", "targets"),
    [
        ({"rank": 2, "alpha": 4.0}, ["1", "2"]),
        ({"rank": 2, "use_dora": True, "dropout": 0.1}, ["1"]),
        ({"rank": 2, "use_rslora": True}, ["0", "2"]),
    ],  # fmt: skip
    ids=["plain", "dora", "embedding"],
)
def test_a_one_adapter_model_and_file_write_what_they_always_wrote_byte_for_byte(tmp_path, kwargs, targets):
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))

    model = torch_impl.AdaptedModel(net(), torch_impl.LoRA, target_layers=targets, adapter_kwargs=kwargs)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_()
    _old_export(model, tmp_path / "old")
    converters.export_peft_adapter(model, tmp_path / "new")
    for name in (peft_format.PEFT_CONFIG_NAME, peft_format.PEFT_WEIGHTS_NAME):
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes(), name

    _old_import(tmp_path / "new", tmp_path / "old.safetensors")
    assert main(["peft-import", str(tmp_path / "new"), str(tmp_path / "new.safetensors")]) == 0
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "old.safetensors").read_bytes()
    assert main(["peft-export", str(tmp_path / "new.safetensors"), str(tmp_path / "again")]) == 0
    for name in (peft_format.PEFT_CONFIG_NAME, peft_format.PEFT_WEIGHTS_NAME):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "old" / name).read_bytes(), name


def test_the_default_adapter_of_a_model_holding_several_is_overwritten_in_place(setup, tmp_path):
    torch_bert, _, folder, expected = setup
    model, _ = converters.import_peft_adapter(folder, copy.deepcopy(torch_bert))
    converters.import_peft_adapter(folder, model, adapter_name="dora")
    with torch.no_grad():
        for key, value in model.state_dict(keep_vars=True).items():
            if ".adapter_" in key and ".named_adapters." not in key:
                value.zero_()
    model.set_adapter("default")
    assert not np.allclose(_torch_out(model), expected["default"], atol=1e-3)

    _, report = converters.import_peft_adapter(folder, model)  # the other adapter is no part of it

    assert report.ok and model.adapters == ["default", "dora"]
    np.testing.assert_allclose(_torch_out(model), expected["default"], rtol=1e-5, atol=1e-5)
    with pytest.raises(PeftConversionError, match="has rank=4, alpha=8.0.*the PEFT adapter rank=2"):
        converters.import_peft_adapter(folder / "dora", model)  # DoRA's layers are not the default's
    # The same factors plus a module the model does not train (modules_to_save): refused by key.
    extra = tmp_path / "extra"
    extra.mkdir()
    config = json.loads((folder / peft_format.PEFT_CONFIG_NAME).read_text())
    (extra / peft_format.PEFT_CONFIG_NAME).write_text(json.dumps({**config, "modules_to_save": ["pooler"]}))
    tensors = _tensors(folder / peft_format.PEFT_WEIGHTS_NAME)
    tensors["base_model.model.pooler.dense.weight"] = np.zeros((16, 16), np.float32)
    write_safetensors(extra / peft_format.PEFT_WEIGHTS_NAME, tensors, {"format": "pt"})
    with pytest.raises(
        PeftConversionError, match=r"does not fit adapter 'default'.*unexpected \['adapted_model.pooler"
    ):
        converters.import_peft_adapter(extra, model)
