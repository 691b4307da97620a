"""Training flax_impl adapters: nnx.jit, optax, bfloat16, and sharding on 8 simulated devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flax_impl import AdaptedModel, HoulsbyAdapterLinear, LoRA
from tests.zoo.flax_models import Conv2dBatchNormNet, PartitionedMLP, SeedMLP


@nnx.jit
def train_step(model: AdaptedModel, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    """The README's training step: gradients and updates for ``model.trainable`` only."""

    def loss_fn(model):
        return jnp.mean((model(x).astype(jnp.float32) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))(model)
    optimizer.update(model, grads)
    return loss


def _frozen(model: AdaptedModel) -> dict:
    return {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(model.trainable)))}


def _data(shape_in, shape_out, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, shape_in), jax.random.normal(ky, shape_out)


def test_lora_trains_under_jit_loss_falls_and_frozen_params_stay_bit_identical():
    model = AdaptedModel(
        SeedMLP(nnx.Rngs(0)),
        LoRA,
        all_linear=True,
        adapter_kwargs={"rank": 4, "alpha": 8.0},
        rngs=nnx.Rngs(1),
    )
    frozen = _frozen(model)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=model.trainable)
    x, y = _data((16, 10), (16, 10))
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]
    after = _frozen(model)
    assert after.keys() == frozen.keys()
    for path in frozen:
        np.testing.assert_array_equal(after[path], frozen[path], err_msg=str(path))
    assert jnp.any(model.adapted_model.layer1.adapter_up_proj.kernel[...])


def test_conv_lora_with_unfrozen_head_trains_under_jit():
    model = AdaptedModel(
        Conv2dBatchNormNet(nnx.Rngs(0)), LoRA, all_conv=True, unfrozen_layers="head", rngs=nnx.Rngs(1)
    )
    frozen = _frozen(model)
    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=model.trainable)
    x, y = _data((4, 6, 6, 3), (4, 4))
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(10)]
    assert losses[-1] < losses[0]
    for path, value in _frozen(model).items():
        np.testing.assert_array_equal(value, frozen[path], err_msg=str(path))


def test_jitted_forward_matches_eager_forward():
    model = AdaptedModel(
        SeedMLP(nnx.Rngs(0)),
        HoulsbyAdapterLinear,
        target_layers="layer2",
        adapter_kwargs={"projection_size": 3},
        rngs=nnx.Rngs(1),
    )
    x = jnp.ones((2, 10))
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), model(x), rtol=1e-6, atol=1e-6)


def test_bfloat16_model_trains_with_bfloat16_adapters():
    model = AdaptedModel(
        SeedMLP(nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16),
        LoRA,
        all_linear=True,
        adapter_kwargs={"rank": 4},
        rngs=nnx.Rngs(1),
    )
    dtypes = {v[...].dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert model(jnp.ones((2, 10), jnp.bfloat16)).dtype == jnp.bfloat16
    frozen = _frozen(model)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=model.trainable)
    x, y = _data((16, 10), (16, 10))
    losses = [float(train_step(model, optimizer, x.astype(jnp.bfloat16), y)) for _ in range(10)]
    assert losses[-1] < losses[0]
    assert model.adapted_model.layer1.adapter_up_proj.kernel[...].dtype == jnp.bfloat16
    for path, value in _frozen(model).items():
        np.testing.assert_array_equal(value.view(np.uint16), frozen[path].view(np.uint16))


# ---------------------------------------------------------------------------------------------
# Sharding


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_adapter_factors_follow_the_kernel_partitioning(mesh):
    with jax.set_mesh(mesh):
        base = PartitionedMLP(nnx.Rngs(0))
    model = AdaptedModel(base, LoRA, all_linear=True, adapter_kwargs={"rank": 2}, rngs=nnx.Rngs(1))
    layer1, layer2 = model.adapted_model.layer1, model.adapted_model.layer2
    expected = {
        (layer1, "adapter_down_proj"): (None, None),
        (layer1, "adapter_up_proj"): (None, "model"),
        (layer2, "adapter_down_proj"): ("model", None),
        (layer2, "adapter_up_proj"): (None, None),
    }
    for (layer, name), spec in expected.items():
        kernel = getattr(layer, name).kernel
        assert tuple(kernel.get_metadata()["out_sharding"]) == spec
        assert kernel[...].sharding.spec == PartitionSpec(*spec)
        assert kernel[...].sharding.mesh.shape == mesh.shape
    # What NNX's sharding utilities read back (e.g. for jax.lax.with_sharding_constraint).
    specs = nnx.get_partition_spec(nnx.state(model, model.trainable))
    assert specs["adapted_model"]["layer1"]["adapter_up_proj"]["kernel"].get_value() == PartitionSpec(
        None, "model"
    )


def test_houlsby_factors_follow_the_kernel_output_partitioning(mesh):
    with jax.set_mesh(mesh):
        adapter = HoulsbyAdapterLinear(PartitionedMLP(nnx.Rngs(0)).layer1, 4, rngs=nnx.Rngs(1))
    assert adapter.adapter_down_proj.kernel[...].sharding.spec == PartitionSpec("model", None)
    assert adapter.adapter_up_proj.kernel[...].sharding.spec == PartitionSpec(None, "model")
    assert adapter.adapter_up_proj.bias[...].sharding.spec == PartitionSpec("model")


def test_adapter_factors_follow_a_kernel_placed_by_device_put(mesh):
    base = nnx.Conv(4, 8, kernel_size=(3,), rngs=nnx.Rngs(0))
    base.kernel.set_value(
        jax.device_put(base.kernel[...], NamedSharding(mesh, PartitionSpec(None, None, "model")))
    )
    lora = LoRA(base, rank=2, rngs=nnx.Rngs(1))
    assert lora.adapter_down_proj.kernel[...].sharding.spec == PartitionSpec(None, None, None)
    assert lora.adapter_up_proj.kernel[...].sharding.spec == PartitionSpec(None, None, "model")


def test_sharded_jitted_train_step_matches_the_unsharded_step(mesh):
    x, y = _data((8, 8), (8, 8))

    def build(sharded: bool) -> tuple[AdaptedModel, nnx.Optimizer]:
        if sharded:
            with jax.set_mesh(mesh):
                base = PartitionedMLP(nnx.Rngs(0))
        else:  # the same draws, no partitioning
            base = PartitionedMLP(nnx.Rngs(0), partitioned=False)
        model = AdaptedModel(base, LoRA, all_linear=True, adapter_kwargs={"rank": 2}, rngs=nnx.Rngs(1))
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=model.trainable)

    sharded, sharded_opt = build(True)
    plain, plain_opt = build(False)
    assert sharded.adapted_model.layer1.pretrained_module.kernel[...].sharding.spec == PartitionSpec(
        None, "model"
    )
    assert isinstance(
        plain.adapted_model.layer1.pretrained_module.kernel[...].sharding, jax.sharding.SingleDeviceSharding
    )
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", None)))
    for _ in range(3):
        loss_sharded = train_step(sharded, sharded_opt, x_sharded, y)
        loss_plain = train_step(plain, plain_opt, x, y)
        np.testing.assert_allclose(loss_sharded, loss_plain, rtol=1e-5, atol=1e-5)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(sharded, nnx.Param)),
        nnx.to_flat_state(nnx.state(plain, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_allclose(
            np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5, atol=1e-5, err_msg=str(path)
        )
    up = sharded.adapted_model.layer1.adapter_up_proj.kernel[...]
    assert up.sharding.spec == PartitionSpec(None, "model")  # the update kept the sharding
