"""``AdaptedModel.save_pretrained`` / ``from_pretrained`` in flax_impl (PEFT's directory format
where it can represent the adapter, ours otherwise), the recorded adapter checked by ``loader``,
and the attributes ``__getattr__`` no longer hands to the wrapped model. On the Flax BERT twin
(small config, random init); PEFT and PyTorch themselves are in tests/equivalence."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_impl import AdaptedModel, CheckpointError, HoulsbyAdapterLinear, LoRA
from flax_impl.models import BertConfig, BertModel
from tests.zoo import bert
from twinformat.errors import PeftConversionError

SMALL_BERT = BertConfig(**bert.SMALL_CONFIG)
QV = bert.QUERY_VALUE


def _bert() -> BertModel:
    model = BertModel(SMALL_BERT, rngs=nnx.Rngs(0))
    model.eval()
    return model


def _out(model: nnx.Module) -> np.ndarray:
    ids = jnp.arange(2 * 7).reshape(2, 7) % SMALL_BERT.vocab_size
    return np.asarray(model(ids))


def _randomize(model: AdaptedModel, seed: int = 1) -> None:
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    for _, variable in nnx.to_flat_state(nnx.state(model, model.trainable)):
        value = variable.get_value()
        variable.set_value(0.3 * jax.random.normal(next(keys), value.shape, value.dtype))


def _adapted_bert(**kwargs) -> AdaptedModel:
    kwargs.setdefault("adapter_kwargs", {"rank": 4, "alpha": 8.0})
    kwargs.setdefault("target_layers", QV)
    model = AdaptedModel(_bert(), kwargs.pop("adapter_class", LoRA), rngs=nnx.Rngs(1), **kwargs)
    _randomize(model)
    return model


def test_lora_save_pretrained_writes_a_peft_directory_and_from_pretrained_reads_it(tmp_path):
    model = _adapted_bert()
    expected = _out(model)
    assert np.abs(expected - _out(_bert())).max() > 1e-2

    assert model.save_pretrained(tmp_path / "adapter") == "peft"

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "np") as f:
        keys = sorted(f.keys())
    assert keys[0] == "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    assert len(keys) == 2 * 2 * SMALL_BERT.num_hidden_layers
    again = AdaptedModel.from_pretrained(_bert(), tmp_path / "adapter", rngs=nnx.Rngs(5))
    assert again.adapter_kwargs == {"rank": 4, "alpha": 8.0}
    np.testing.assert_array_equal(_out(again), expected)


def test_houlsby_with_unfrozen_layers_saves_our_format_and_round_trips(tmp_path):
    model = _adapted_bert(
        adapter_class=HoulsbyAdapterLinear,
        adapter_kwargs={"projection_size": 3},
        unfrozen_layers=["pooler.dense", "embeddings.LayerNorm"],
    )
    expected = _out(model)

    assert model.save_pretrained(tmp_path / "houlsby") == "peft-twins"

    assert sorted(p.name for p in (tmp_path / "houlsby").iterdir()) == [
        "adapters.safetensors",
        "peft_twins_adapter.json",
    ]
    again = AdaptedModel.from_pretrained(_bert(), tmp_path / "houlsby", rngs=nnx.Rngs(5))
    assert again.adapter_class is HoulsbyAdapterLinear
    assert again.unfrozen_module_names == model.unfrozen_module_names
    np.testing.assert_array_equal(_out(again), expected)


def test_a_dilated_conv_lora_falls_back_to_our_format(tmp_path):
    def base() -> nnx.Module:
        return nnx.Sequential(nnx.Conv(3, 4, (3,), kernel_dilation=2, padding=[(2, 2)], rngs=nnx.Rngs(0)))

    model = AdaptedModel(base(), LoRA, all_conv=True, adapter_kwargs={"rank": 2}, rngs=nnx.Rngs(1))
    _randomize(model)
    x = jax.random.normal(jax.random.key(0), (2, 9, 3))

    assert model.save_pretrained(tmp_path / "conv") == "peft-twins"
    again = AdaptedModel.from_pretrained(base(), tmp_path / "conv", rngs=nnx.Rngs(2))
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(model(x)))


def test_a_refused_from_pretrained_leaves_the_base_model_as_it_was(tmp_path):
    model = _adapted_bert()
    model.save_pretrained(tmp_path / "adapter")
    other = BertModel(
        BertConfig(**{**vars(SMALL_BERT), "hidden_size": 8, "intermediate_size": 16}), rngs=nnx.Rngs(0)
    )
    other.eval()
    before = _out(other)
    types = [type(m).__name__ for m in other.encoder.layer[0].attention.self.__dict__.values()]

    with pytest.raises(CheckpointError, match="mis-shaped"):
        AdaptedModel.from_pretrained(other, tmp_path / "adapter", rngs=nnx.Rngs(0))

    assert [type(m).__name__ for m in other.encoder.layer[0].attention.self.__dict__.values()] == types
    np.testing.assert_array_equal(_out(other), before)


def test_getattr_does_not_hand_save_or_load_attributes_to_the_wrapped_model():
    class WithSaving(nnx.Module):
        def __init__(self) -> None:
            self.fc = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
            self.vocab = 7

        def state_dict(self) -> dict:
            return {}

        def push_to_hub(self) -> None: ...

    model = AdaptedModel(WithSaving(), LoRA, target_layers="fc", rngs=nnx.Rngs(1))

    for name in ("state_dict", "push_to_hub"):
        assert not hasattr(model, name)
        with pytest.raises(AttributeError, match="adapted_model." + name):
            getattr(model, name)
    assert model.vocab == 7


def test_loader_refuses_a_file_recorded_with_another_alpha_and_names_both(tmp_path):
    model = _adapted_bert(adapter_kwargs={"rank": 4, "alpha": 16})
    model.saver(tmp_path / "a.safetensors")
    default_alpha = AdaptedModel(
        _bert(), LoRA, target_layers=QV, adapter_kwargs={"rank": 4}, rngs=nnx.Rngs(1)
    )

    with pytest.raises(
        CheckpointError,
        match=r"LoRA\(alpha=16, dropout=0.0, rank=4, .*\) but this model has LoRA\(alpha=1.0, dropout=0.0, rank=4, .*alpha differs \(file 16, model 1.0\)",
    ):
        default_alpha.loader(tmp_path / "a.safetensors")

    same = AdaptedModel(
        _bert(), LoRA, target_layers=QV, adapter_kwargs={"rank": 4, "alpha": 16.0}, rngs=nnx.Rngs(1)
    )
    same.loader(tmp_path / "a.safetensors")
    np.testing.assert_array_equal(_out(same), _out(model))


def test_saver_records_the_kind_of_every_layer_it_writes(tmp_path):
    model = _adapted_bert(unfrozen_layers=["embeddings.LayerNorm", "pooler.dense"])
    model.saver(tmp_path / "a.safetensors")
    from twinformat.format import layer_kinds_from_metadata, read_safetensors_header

    header, metadata = read_safetensors_header(tmp_path / "a.safetensors")
    kinds = layer_kinds_from_metadata(metadata)

    assert {name.rpartition(".")[0] for name in header} == set(kinds)
    assert kinds["adapted_model.embeddings.LayerNorm"] == "layer_norm"
    assert kinds["adapted_model.pooler.dense"] == "linear"
    assert kinds["adapted_model.encoder.layer.0.attention.self.query.adapter_down_proj"] == "linear"


def test_a_bare_linear_adapted_at_the_root_round_trips_in_our_format(tmp_path):
    model = AdaptedModel(
        nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
        LoRA,
        all_linear=True,
        adapter_kwargs={"rank": 2},
        rngs=nnx.Rngs(1),
    )
    _randomize(model)
    x = jnp.ones((2, 4))

    assert model.save_pretrained(tmp_path / "root") == "peft-twins"  # PEFT cannot target the root
    again = AdaptedModel.from_pretrained(
        nnx.Linear(4, 3, rngs=nnx.Rngs(0)), tmp_path / "root", rngs=nnx.Rngs(2)
    )

    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(model(x)))


def test_dora_rslora_dropout_and_embedding_adapters_are_written_in_peft_format_and_read_back(tmp_path):
    kwargs = {"rank": 4, "alpha": 6.0, "dropout": 0.1, "use_rslora": True}
    for use_dora, targets in ((True, QV), (False, [*QV, "embeddings.word_embeddings"])):
        model = _adapted_bert(
            adapter_kwargs={**kwargs, **({"use_dora": True} if use_dora else {})}, target_layers=targets
        )
        model.eval()
        expected = _out(model)
        folder = tmp_path / f"dora{use_dora}"

        assert model.save_pretrained(folder) == "peft"

        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["use_dora"], config["use_rslora"], config["lora_dropout"]) == (use_dora, True, 0.1)
        from safetensors import safe_open

        with safe_open(str(folder / "adapter_model.safetensors"), "np") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        query = "base_model.model.encoder.layer.0.attention.self.query"
        if use_dora:
            assert shapes[f"{query}.lora_magnitude_vector"] == [SMALL_BERT.hidden_size]
        else:
            words = "base_model.model.embeddings.word_embeddings"
            assert shapes[f"{words}.lora_embedding_A"] == [4, SMALL_BERT.vocab_size]  # PEFT's (r, num)
            assert shapes[f"{words}.lora_embedding_B"] == [SMALL_BERT.hidden_size, 4]
        again = AdaptedModel.from_pretrained(_bert(), folder, rngs=nnx.Rngs(5))
        assert again.adapter_kwargs == model.adapter_kwargs
        np.testing.assert_array_equal(_out(again), expected)  # in eval mode: dropout off


def test_a_peft_directory_on_a_dilated_conv_is_refused_before_the_base_changes(tmp_path):
    def base(dilation: int) -> nnx.Module:
        padding = [(dilation, dilation)]
        return nnx.Sequential(
            nnx.Conv(3, 4, (3,), kernel_dilation=dilation, padding=padding, rngs=nnx.Rngs(0))
        )

    model = AdaptedModel(base(1), LoRA, all_conv=True, adapter_kwargs={"rank": 2}, rngs=nnx.Rngs(1))
    assert model.save_pretrained(tmp_path / "conv") == "peft"
    dilated = base(2)

    with pytest.raises(PeftConversionError, match="layer 'layers.0' is an nnx.Conv .*kernel_dilation 2"):
        AdaptedModel.from_pretrained(dilated, tmp_path / "conv", rngs=nnx.Rngs(2))

    assert type(dilated.layers[0]) is nnx.Conv
