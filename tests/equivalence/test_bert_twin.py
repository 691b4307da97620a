"""``flax_impl.models.BertModel`` is declared like ``transformers.BertModel``: names, keys, layers, errors."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_impl.graph import named_modules
from flax_impl.models import BertConfig, BertModel
from tests.zoo import bert
from tests.zoo.pairs import BERT

from . import harness


@pytest.fixture(scope="module")
def hf_config():
    return bert.transformers_module().BertConfig(**bert.SMALL_CONFIG)


def _flax_bert(config, **kwargs):
    return harness.placeholder(lambda: BertModel(config, rngs=nnx.Rngs(0), **kwargs))


@pytest.mark.parametrize("add_pooling_layer", [True, False])
def test_state_dict_keys_and_shapes_map_one_to_one_onto_transformers(hf_config, add_pooling_layer):
    torch_model = bert.transformers_module().BertModel(hf_config, add_pooling_layer=add_pooling_layer)
    flax_model = _flax_bert(hf_config, add_pooling_layer=add_pooling_layer)

    torch_shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    flax_shapes = {k: v.shape for k, v in harness.flax_in_torch_layout(flax_model).items()}

    assert flax_shapes == torch_shapes


def test_every_layer_is_declared_with_pytorch_semantics(hf_config):
    model = _flax_bert(hf_config)
    norms = [m for _, m in named_modules(model) if isinstance(m, nnx.LayerNorm)]

    assert len(norms) == 1 + 2 * hf_config.num_hidden_layers
    assert all(n.epsilon == hf_config.layer_norm_eps and not n.use_fast_variance for n in norms)
    x = np.linspace(-4.0, 4.0, 9)
    exact_gelu = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x]  # torch's nn.GELU()
    act = model.encoder.layer[0].intermediate.intermediate_act_fn
    assert np.abs(np.asarray(act(jnp.asarray(x, jnp.float32))) - exact_gelu).max() < 1e-6


def test_config_is_read_from_a_transformers_config_by_attribute(hf_config):
    config = BertConfig.from_config(hf_config)

    assert config == BertConfig(
        **bert.SMALL_CONFIG, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
    )
    assert config.head_size == bert.SMALL_CONFIG["hidden_size"] // bert.SMALL_CONFIG["num_attention_heads"]


def test_padded_positions_get_the_same_hidden_states_as_transformers():
    twins = harness.build_twins(BERT, None)
    batch = BERT.make_batch(np.random.default_rng(3))
    batch["attention_mask"][1, 1:] = 0  # a row with a single real token

    torch_hidden, _ = harness.torch_outputs(twins, batch)
    flax_hidden, _ = harness.flax_outputs(twins, batch)

    harness.assert_close([torch_hidden], [flax_hidden], atol=1e-5, rtol=1e-5, what="last_hidden_state")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 10, "num_attention_heads": 4}, "multiple of num_attention_heads"),
        ({"hidden_act": "mish"}, "hidden_act 'mish' is not supported"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    ],
)
def test_an_impossible_config_is_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        BertConfig(**{**bert.SMALL_CONFIG, **overrides})


def test_relative_position_embeddings_are_refused(hf_config):
    hf_config = type(hf_config)(**bert.SMALL_CONFIG, position_embedding_type="relative_key")

    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        BertConfig.from_config(hf_config)


@pytest.mark.parametrize(
    ("ids", "mask", "message"),
    [
        (np.ones((2, 30), np.int32), None, "longer than max_position_embeddings"),
        (np.ones((2, 5), np.int32), np.ones((2, 4), np.int32), "attention_mask has shape"),
        (np.ones((5,), np.int32), None, r"input_ids must be \(batch, seq\)"),
    ],
)
def test_bad_inputs_are_refused_with_the_expected_shape(ids, mask, message):
    model = _flax_bert(BertConfig(**bert.SMALL_CONFIG))
    model.eval()

    with pytest.raises(ValueError, match=message):
        model(ids, attention_mask=mask)
