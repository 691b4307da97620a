"""Adapters on a ('data', 'model') mesh of 8 simulated CPU devices, against one device.

The BERT twin is partitioned Megatron-style with :func:`flax_impl.sharding.shard_model` (query,
key, value and the intermediate dense split on their output axis; the two output denses on their
input axis), then adapted; a batch split over 'data' runs one jitted train step that is data- and
tensor-parallel at once. The same model on one device is the reference: forward to 1e-5, a few
Adam steps to 1e-4 (SPEC tolerances).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flax_impl import AdaptedModel, HoulsbyAdapterLinear, LoRA, fused
from flax_impl.models import BertConfig, BertModel
from flax_impl.sharding import ShardingRuleError, shard_model
from twinformat.errors import NoMatchError

P = PartitionSpec
STEPS = 3
CONFIG = BertConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
)
MEGATRON = {
    "encoder.layer.*.attention.self.query": (None, "model"),
    "encoder.layer.*.attention.self.key": (None, "model"),
    "encoder.layer.*.attention.self.value": (None, "model"),
    "encoder.layer.*.attention.output.dense": ("model", None),
    "encoder.layer.*.intermediate.dense": (None, "model"),
    "encoder.layer.*.output.dense": ("model", None),
}
# Column-parallel (query, intermediate.dense) and row-parallel (the output denses) layers.
TARGETS = ["*.query", "*.value", "*.intermediate.dense", "*.output.dense"]
ADAPTERS = {
    "lora": (LoRA, {"rank": 4, "alpha": 8.0}),
    "houlsby": (HoulsbyAdapterLinear, {"projection_size": 4}),
}


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _adapted(adapter: str, mesh: jax.sharding.Mesh | None) -> AdaptedModel:
    """The same weights whatever ``mesh``: the base is built, then placed, then adapted."""
    base = BertModel(CONFIG, rngs=nnx.Rngs(0))
    base.eval()  # no dropout: both runs compute the same function
    if mesh is not None:
        shard_model(base, mesh, MEGATRON)
    adapter_class, kwargs = ADAPTERS[adapter]
    model = AdaptedModel(base, adapter_class, target_layers=TARGETS, adapter_kwargs=kwargs, rngs=nnx.Rngs(1))
    # Random up projections, so that every factor gets a gradient from the first step.
    for index, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(model, model.trainable))):
        value = variable[...]
        noise = 0.05 * np.random.default_rng(index).standard_normal(value.shape, dtype=np.float32)
        variable.set_value(jax.device_put(noise.astype(value.dtype), value.sharding))
    return model


def _batch() -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.key(2))
    ids = jax.random.randint(kx, (8, 12), 0, CONFIG.vocab_size)
    target = jax.random.normal(ky, (8, 12, CONFIG.hidden_size))
    return ids, target


@nnx.jit
def _train_step(
    model: AdaptedModel, optimizer: nnx.Optimizer, ids: jax.Array, target: jax.Array
) -> jax.Array:
    def loss_fn(model):
        return jnp.mean((model(ids) - target) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))(model)
    optimizer.update(model, grads)
    return loss


def _trainable(model: AdaptedModel) -> dict:
    return {p: v[...] for p, v in nnx.to_flat_state(nnx.state(model, model.trainable))}


def _frozen(model: AdaptedModel) -> dict:
    return {
        p: np.array(v[...])
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(model.trainable))))
    }


def _spec(array: jax.Array) -> PartitionSpec:
    spec = tuple(array.sharding.spec)
    return P(*spec, *(None,) * (array.ndim - len(spec)))  # P('a') and P('a', None) are the same


def test_adapter_factors_on_megatron_layers_follow_the_kernel_they_adapt(mesh):
    lora = _adapted("lora", mesh).adapted_model.encoder.layer[0]
    column, row = lora.attention.self.query, lora.attention.output.dense
    assert _spec(column.pretrained_module.kernel[...]) == P(None, "model")
    assert _spec(column.adapter_down_proj.kernel[...]) == P(None, None)  # input axis: replicated
    assert _spec(column.adapter_up_proj.kernel[...]) == P(None, "model")  # output axis: split
    assert _spec(row.pretrained_module.kernel[...]) == P("model", None)
    assert _spec(row.adapter_down_proj.kernel[...]) == P("model", None)  # input axis: split
    assert _spec(row.adapter_up_proj.kernel[...]) == P(None, None)
    houlsby = _adapted("houlsby", mesh).adapted_model.encoder.layer[0].intermediate.dense
    assert _spec(houlsby.adapter_down_proj.kernel[...]) == P("model", None)  # reads the split output
    assert _spec(houlsby.adapter_up_proj.kernel[...]) == P(None, "model")
    assert _spec(houlsby.adapter_up_proj.bias[...]) == P("model")
    for array in (column.adapter_up_proj.kernel[...], row.adapter_down_proj.kernel[...]):
        assert len({shard.data.shape for shard in array.addressable_shards}) == 1
        assert array.addressable_shards[0].data.size * 4 == array.size  # really split 4 ways


@nnx.jit
def _forward(model: AdaptedModel, ids: jax.Array) -> jax.Array:
    return model(ids)


def test_data_and_tensor_parallel_lora_training_matches_one_device(mesh):
    sharded, single = _adapted("lora", mesh), _adapted("lora", None)
    ids, target = _batch()
    ids_sharded = jax.device_put(ids, NamedSharding(mesh, P("data", None)))
    target_sharded = jax.device_put(target, NamedSharding(mesh, P("data", None, None)))

    np.testing.assert_allclose(_forward(sharded, ids_sharded), _forward(single, ids), rtol=1e-5, atol=1e-5)

    specs = {path: _spec(value) for path, value in _trainable(sharded).items()}
    frozen = _frozen(sharded)
    opt_sharded = nnx.Optimizer(sharded, optax.adam(1e-2), wrt=sharded.trainable)
    opt_single = nnx.Optimizer(single, optax.adam(1e-2), wrt=single.trainable)
    for step in range(STEPS):
        loss_sharded = _train_step(sharded, opt_sharded, ids_sharded, target_sharded)
        loss_single = _train_step(single, opt_single, ids, target)
        np.testing.assert_allclose(loss_sharded, loss_single, rtol=1e-5, atol=1e-5, err_msg=f"step {step}")

    after_single = _trainable(single)
    for path, value in _trainable(sharded).items():
        np.testing.assert_allclose(value, after_single[path], rtol=1e-4, atol=1e-4, err_msg=str(path))
        assert _spec(value) == specs[path], f"{path}: the update moved the parameter's sharding"
    mu = opt_sharded.opt_state[0].mu
    for path, value in nnx.to_flat_state(mu):
        assert _spec(value[...]) == specs[path], f"Adam's first moment of {path} is not sharded like it"
    for path, value in _frozen(sharded).items():
        np.testing.assert_array_equal(value, frozen[path], err_msg=f"frozen {path} changed")


def test_adapter_checkpoint_of_a_sharded_model_loads_on_one_device_and_back(mesh, tmp_path):
    sharded = _adapted("lora", mesh)
    single = _adapted("houlsby", None)  # wrong class first: the file must not fit it
    sharded.saver(str(tmp_path / "sharded.safetensors"))
    with pytest.raises(ValueError, match="does not fit"):
        single.loader(str(tmp_path / "sharded.safetensors"))

    single = _adapted("lora", None)
    for variable in jax.tree.leaves(nnx.state(single, single.trainable), is_leaf=_is_variable):
        variable.set_value(jnp.zeros_like(variable[...]))
    single.loader(str(tmp_path / "sharded.safetensors"))
    for path, value in _trainable(sharded).items():
        np.testing.assert_array_equal(
            np.asarray(value), np.asarray(_trainable(single)[path]), err_msg=str(path)
        )

    # and back: a single-device file loads into the sharded model, which keeps its partitioning
    specs = {path: _spec(value) for path, value in _trainable(sharded).items()}
    single.saver(str(tmp_path / "single.safetensors"))
    fresh = _adapted("lora", mesh)
    fresh.loader(str(tmp_path / "single.safetensors"))
    for path, value in _trainable(fresh).items():
        assert _spec(value) == specs[path], path
        np.testing.assert_array_equal(
            np.asarray(value), np.asarray(_trainable(single)[path]), err_msg=str(path)
        )


def _is_variable(x: object) -> bool:
    return isinstance(x, nnx.Variable)


# ----------------------------------------------------------------------------- shard_model's errors
def test_shard_model_refuses_a_pattern_that_matches_no_layer(mesh):
    with pytest.raises(NoMatchError, match="encoder.layer.9"):
        shard_model(BertModel(CONFIG, rngs=nnx.Rngs(0)), mesh, {"encoder.layer.9.*": (None, "model")})


def test_shard_model_refuses_an_axis_the_mesh_lacks(mesh):
    with pytest.raises(ShardingRuleError, match="'tensor'"):
        shard_model(BertModel(CONFIG, rngs=nnx.Rngs(0)), mesh, {"*.query": (None, "tensor")})


def test_shard_model_refuses_a_spec_of_the_wrong_rank_naming_the_variable(mesh):
    with pytest.raises(ShardingRuleError, match=r"pooler\.dense\.kernel"):
        shard_model(BertModel(CONFIG, rngs=nnx.Rngs(0)), mesh, {"pooler.dense": (None, None, "model")})


def test_shard_model_refuses_a_model_that_already_holds_adapters(mesh):
    model = AdaptedModel(BertModel(CONFIG, rngs=nnx.Rngs(0)), LoRA, target_layers="*.query", rngs=nnx.Rngs(1))
    with pytest.raises(ShardingRuleError, match="shard the base model first"):
        shard_model(model, mesh, {})


def test_shard_model_replicates_every_unmatched_variable_on_the_mesh(mesh):
    model = BertModel(CONFIG, rngs=nnx.Rngs(0))
    specs = shard_model(model, mesh, MEGATRON)
    assert specs["encoder.layer.0.intermediate.dense.bias"] == P("model")
    assert specs["encoder.layer.0.output.dense.bias"] == P(None)
    word = model.embeddings.word_embeddings.embedding[...]
    assert specs["embeddings.word_embeddings.embedding"] == P()
    assert word.sharding.mesh.shape == mesh.shape and word.sharding.is_fully_replicated


@pytest.mark.parametrize("layout", ["data-parallel", "column-parallel"])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_lora_gradients_over_explicit_mesh_axes_equal_one_devices(layout, dtype):
    """``jax.make_mesh``'s default axes are ``Explicit``: a contraction over a sharded axis must
    name its output's sharding. The fused path's backward (the default) contracts the tokens
    (split over 'data') for the factor and bias gradients and the output axis (split over
    'model' in a column-parallel layer) for ``dx`` and ``dh``: over the mesh it gives its own
    one-device gradients, with the parameters' shardings, and in float32 the plain formula's."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    split = P(None, "model") if layout == "column-parallel" else P()
    layer = LoRA(nnx.Linear(16, 8, dtype=dtype, rngs=nnx.Rngs(0)), 4, 8.0, rngs=nnx.Rngs(1))
    up = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    layer.adapter_up_proj.kernel.set_value(jnp.asarray(up))
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(3), (8, 6, 16))
    specs = {
        "pretrained_module.kernel": split,
        "pretrained_module.bias": P(*split[1:]),
        "adapter_up_proj.kernel": split,
    }

    def placed(state: nnx.State) -> nnx.State:
        def put(path, value):
            return jax.device_put(value, NamedSharding(mesh, specs.get(".".join(map(str, path)), P())))

        return nnx.from_flat_state(
            [(p, v.replace(put(p, v.get_value()))) for p, v in nnx.to_flat_state(state)]
        )

    def loss(params, x):
        y = nnx.merge(graphdef, params)(x).astype(jnp.float32)
        return jnp.sum(y * jnp.cos(y))

    def gradients(fused_path: bool, on_mesh: bool) -> dict:
        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        with fused.enabled() if fused_path else fused.disabled():
            if on_mesh:
                with jax.set_mesh(mesh):
                    grads, gx = step(placed(params), jax.device_put(x, NamedSharding(mesh, P("data"))))
            else:
                grads, gx = step(params, x)
        out = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads)}
        return {**out, "x": gx}

    on_mesh, one_device = gradients(True, True), gradients(True, False)
    assert set(on_mesh) == {*specs, "adapter_down_proj.kernel", "x"}
    for name, value in on_mesh.items():
        if name != "x":  # each gradient has its parameter's sharding
            expected = specs.get(name, P())
            assert _spec(value) == P(*expected, *(None,) * (value.ndim - len(expected))), name
        # Summation order apart (the shards' partial sums): float32 rounding, or bf16's where the
        # step computes in bf16.
        assert_close(value, one_device[name], 1e-5 if dtype is None else 1e-2, name)
    if dtype is None:
        plain = gradients(False, True)
        for name, value in on_mesh.items():
            assert_close(value, plain[name], 1e-5, name)


def assert_close(actual: jax.Array, desired: jax.Array, rtol: float, name: str) -> None:
    """Within ``rtol`` of each value, or of the largest one (a gradient's sums cancel)."""
    actual, desired = np.asarray(actual, np.float32), np.asarray(desired, np.float32)
    atol = rtol * float(np.max(np.abs(desired)))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, err_msg=name)


LLAMA = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
}  # fmt: skip


@pytest.mark.parametrize("family", ["bert", "llama", "llama+embed_tokens"])
def test_twins_train_data_parallel_over_explicit_mesh_axes_as_on_one_device(family):
    """``jax.make_mesh``'s default axes are ``Explicit``, where a gather of a replicated table
    by batch-sharded token ids must name its output sharding: the twins' token lookups give the
    rows the ids' sharding, so a LoRA step data-parallel over such a mesh (ids split over
    'data', parameters replicated; LoRA on the embedding too) gives one device's gradients."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
    from flax_impl.models import LlamaForCausalLM

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    if family == "bert":
        base, targets = BertModel(CONFIG, rngs=nnx.Rngs(0)), ["*.query", "*.value"]
        base.eval()
    else:
        base, targets = LlamaForCausalLM(LLAMA, rngs=nnx.Rngs(0)), ["*_proj"]
        targets += ["model.embed_tokens"] if family.endswith("embed_tokens") else []
    model = AdaptedModel(base, LoRA, target_layers=targets, adapter_kwargs={"rank": 4}, rngs=nnx.Rngs(1))
    for index, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(model, model.trainable))):
        noise = 0.05 * np.random.default_rng(index).standard_normal(variable.shape, dtype=np.float32)
        variable.set_value(jnp.asarray(noise, variable.get_value().dtype))
    graphdef, trainable, rest = nnx.split(model, model.trainable, ...)
    ids = jax.random.randint(jax.random.key(2), (8, 12), 0, 64)

    def loss(trainable, rest, ids):
        out = nnx.merge(graphdef, trainable, rest)(ids).astype(jnp.float32)
        return jnp.mean(jnp.sin(3.0 * out))  # (BERT's normed output: mean(out**2) is flat)

    step = jax.jit(jax.grad(loss))
    reference = step(trainable, rest, ids)
    replicated = NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        grads = step(
            jax.device_put(trainable, replicated),
            jax.device_put(rest, replicated),
            jax.device_put(ids, NamedSharding(mesh, P("data"))),
        )
    flat, flat_ref = nnx.to_flat_state(grads), nnx.to_flat_state(reference)
    assert len(flat) == len(flat_ref) >= 2 * len(targets)
    for (path, value), (_, value_ref) in zip(flat, flat_ref, strict=True):
        assert_close(np.asarray(value[...]), np.asarray(value_ref[...]), 1e-5, str(path))
