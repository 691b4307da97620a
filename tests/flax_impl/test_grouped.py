"""Opt-in step options of ``flax_impl.fused`` (issue 24): the grouped down projection of LoRA
layers that read the same input (``group_shared_input``) and the factors' compute-dtype copies
carried by the step (``compute_dtype_factors`` / ``value_and_grad_with_factors``).

Each is compared with the model as it is without it, on the plain formula that both take
(``fused.disabled()``; the default fused path gives float32 factor gradients in bf16, which
these round as autodiff does): outputs, gradients and (for the jitted split-state step of the
README) the losses and parameters after a few AdamW steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_impl import AdaptedModel, LoRA, fused
from flax_impl.models.bert import BertConfig, BertModel
from tests.zoo.bert import SMALL_CONFIG
from tests.zoo.flax_models import SelfAttention

QKV = ("q_proj", "k_proj", "v_proj")


def adapted_attention(dtype=None, seed: int = 0, **lora_kwargs) -> AdaptedModel:
    """``SelfAttention`` with LoRA on q, k, v and out (random up factors: a fresh one is zero)."""
    model = SelfAttention(16, 4, rngs=nnx.Rngs(seed))
    for proj in (*QKV, "out_proj"):
        getattr(model, proj).dtype = dtype
    adapted = AdaptedModel(
        model,
        LoRA,
        target_layers=[*QKV, "out_proj"],
        adapter_kwargs={"rank": 3, "alpha": 2.0, **lora_kwargs},
        rngs=nnx.Rngs(seed + 1),
    )
    randomize_up_factors(adapted, seed + 2)
    return adapted


def randomize_up_factors(model: nnx.Module, seed: int) -> None:
    key = jax.random.key(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        if "adapter_up_proj" in path:
            key, sub = jax.random.split(key)
            value = variable.get_value()
            variable.set_value(jax.random.normal(sub, value.shape, value.dtype))


def gradients(model: AdaptedModel, x: jax.Array) -> tuple[jax.Array, dict]:
    """The gradients of a fixed scalar of the output w.r.t. ``x`` and the trainable factors."""

    def loss(m, x):
        y = m(x).astype(jnp.float32)
        return jnp.sum(y * jnp.cos(y))

    grads, grad_x = nnx.grad(loss, argnums=(nnx.DiffState(0, model.trainable), 1))(model, x)
    return grad_x, {p: v[...] for p, v in nnx.to_flat_state(grads)}


def outputs_and_grads(model: AdaptedModel, x: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    return (model(x), *gradients(model, x))


def dot_output_widths(fn, *args) -> list[int]:
    """The last dimension of every ``dot_general`` output in ``fn``'s jaxpr, sub-jaxprs included."""
    return [shape[-1] for shape in dot_output_shapes(fn, *args)]


def dot_output_shapes(fn, *args) -> list[tuple[int, ...]]:
    """The output shape of every ``dot_general`` in ``fn``'s jaxpr, sub-jaxprs included."""
    shapes = []

    def walk(value):
        if isinstance(value, (tuple, list)):
            for item in value:
                walk(item)
        elif hasattr(value, "eqns"):  # a Jaxpr
            for eqn in value.eqns:
                if eqn.primitive.name == "dot_general":
                    shapes.append(eqn.outvars[0].aval.shape)
                walk(list(eqn.params.values()))
        elif hasattr(value, "jaxpr"):  # a ClosedJaxpr
            walk(value.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


def assert_trees_close(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(
            np.asarray(a[key], np.float32), np.asarray(b[key], np.float32), err_msg=str(key), **tolerance
        )


def comparable(value: jax.Array) -> jax.Array:
    """``value``, or the bits of a typed PRNG key (which numpy cannot compare)."""
    return jax.random.key_data(value) if jnp.issubdtype(value.dtype, jax.dtypes.prng_key) else value


# --- group_shared_input -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_grouped_model_gives_the_ungrouped_outputs_and_gradients(dtype):
    model = adapted_attention(dtype)
    x = jax.random.normal(jax.random.key(5), (2, 7, 16))
    with jax.default_matmul_precision("highest"), fused.disabled():
        y_ref, gx_ref, grads_ref = outputs_and_grads(model, x)
        assert fused.group_shared_input(model, QKV) == 1
        y, gx, grads = outputs_and_grads(model, x)
    # The forward is LoRA's formula with down(x) taken as columns of one wider GEMM: the same
    # numbers on XLA:CPU; dx sums the three low-rank terms inside one GEMM (rounding apart).
    np.testing.assert_array_equal(y, y_ref)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype is None else {"rtol": 2e-2, "atol": 2e-2}
    np.testing.assert_allclose(np.asarray(gx, np.float32), np.asarray(gx_ref, np.float32), **tolerance)
    assert_trees_close(grads, grads_ref, **tolerance)


def test_the_first_member_called_computes_every_down_projection_in_one_gemm():
    model = adapted_attention()
    x = jnp.ones((2, 7, 16))

    def step_shapes():  # the dots of a forward and a backward (dx and the factors' gradients)
        graphdef, state = nnx.split(model)
        return dot_output_shapes(lambda state, x: gradients(nnx.merge(graphdef, state), x), state, x)

    with fused.disabled():  # the plain formula's GEMMs (grouping takes it; out too, here)
        widths, step_shapes_ref = dot_output_widths(lambda x: model(x), x), step_shapes()
        fused.group_shared_input(model, QKV)
        grouped, grouped_step = dot_output_widths(lambda x: model(x), x), step_shapes()
    assert widths.count(3) == 4 and 9 not in widths  # q, k, v, out: four rank-3 down projections
    assert grouped.count(3) == 1 and grouped.count(9) == 1  # out alone; q, k, v in one GEMM
    # Forward and backward: h = x @ [A_q|A_k|A_v] and dA = x.T @ [dh_q|dh_k|dh_v] are (., 9);
    # dx's low-rank part is one GEMM [dh_q|dh_k|dh_v] @ [A_q|A_k|A_v].T: 6 GEMMs fewer.
    assert sum(9 in shape for shape in grouped_step) == 2  # h (N, 9) and dA (9, 16)
    assert not any(9 in shape for shape in step_shapes_ref)
    assert len(step_shapes_ref) - len(grouped_step) == 6
    assert fused._call_stack() == []  # the trace-time scope ended with the parent's call


def test_grouping_survives_split_and_merge_in_the_readme_jitted_step():
    def train(group: bool, steps: int = 3):
        model = BertModel(BertConfig(**SMALL_CONFIG), rngs=nnx.Rngs(0))
        adapted = AdaptedModel(
            model,
            LoRA,
            target_layers=["*.query", "*.key", "*.value"],
            adapter_kwargs={"rank": 2},
            rngs=nnx.Rngs(1),
        )
        randomize_up_factors(adapted, 3)
        if group:
            assert fused.group_shared_input(adapted) == SMALL_CONFIG["num_hidden_layers"]
        optimizer = nnx.Optimizer(adapted, optax.adamw(1e-2), wrt=adapted.trainable)
        graphdef, state = nnx.split((adapted, optimizer))  # the README's split-state step

        @jax.jit
        def step(state, ids):
            model, optimizer = nnx.merge(graphdef, state)
            loss, grads = nnx.value_and_grad(
                lambda m: jnp.mean(jnp.square(m(ids))), argnums=nnx.DiffState(0, model.trainable)
            )(model)
            optimizer.update(model, grads)
            return loss, nnx.state((model, optimizer))

        ids = jax.random.randint(jax.random.key(4), (2, 8), 0, SMALL_CONFIG["vocab_size"])
        losses = []
        for _ in range(steps):
            loss, state = step(state, ids)
            losses.append(float(loss))
        merged, _ = nnx.merge(graphdef, state)
        widths = dot_output_widths(step, state, ids)
        return (
            losses,
            {p: v[...] for p, v in nnx.to_flat_state(nnx.state(merged, nnx.LoRAParam))},
            widths,
            merged,
        )

    with jax.default_matmul_precision("highest"):
        losses_ref, params_ref, widths_ref, _ = train(group=False)
        losses, params, widths, merged = train(group=True)
    assert type(merged.encoder.layer[0].attention.self.query).__name__ == "SharedInputLoRA"
    assert widths.count(6) > 0 and widths_ref.count(6) == 0  # the grouped GEMM is in the jitted step
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-6)
    assert_trees_close(params, params_ref, rtol=1e-5, atol=1e-6)
    assert fused._call_stack() == []


def test_a_member_called_on_another_input_computes_alone():
    class CrossAttention(SelfAttention):
        def __call__(self, x):  # k reads another array; q and v read x
            return self.q_proj(x) * self.k_proj(x + 1.0) + self.v_proj(x)

    base = CrossAttention(16, 4, rngs=nnx.Rngs(0))
    model = AdaptedModel(base, LoRA, target_layers=list(QKV), adapter_kwargs={"rank": 3}, rngs=nnx.Rngs(1))
    randomize_up_factors(model, 2)
    x = jax.random.normal(jax.random.key(5), (2, 7, 16))
    y_ref = model(x)
    assert fused.group_shared_input(model, QKV) == 1
    np.testing.assert_array_equal(model(x), y_ref)
    widths = dot_output_widths(lambda x: model(x), x)
    assert widths.count(9) == 1 and widths.count(3) == 1  # q's GEMM (v takes its columns), k alone
    # outside its parent's call a member computes alone too
    np.testing.assert_array_equal(
        model.q_proj(x),
        model.q_proj.pretrained_module(x)
        + model.q_proj.adapter_up_proj(model.q_proj.adapter_down_proj(x)) * model.q_proj.scaling,
    )


@pytest.mark.parametrize("option", [{"use_dora": True}, {"dropout": 0.1}, "merged"])
def test_dora_dropout_and_merged_layers_are_not_grouped(option):
    model = adapted_attention()
    odd = model.adapted_model.k_proj
    if option == "merged":
        odd.merge()
    else:  # rebuild k with the option
        layer = LoRA(odd.pretrained_module, 3, 2.0, **option, rngs=nnx.Rngs(9))
        model.adapted_model.k_proj = layer
        model.eval()  # the same dropout masks (none) in both calls below
    x = jax.random.normal(jax.random.key(5), (2, 7, 16))
    y_ref = model(x)
    assert fused.group_shared_input(model, QKV) == 1
    assert type(model.adapted_model.k_proj) is LoRA
    assert type(model.adapted_model.q_proj).__name__ == "SharedInputLoRA"
    np.testing.assert_array_equal(model(x), y_ref)
    assert dot_output_widths(lambda x: model(x), x).count(6) == 1  # q and v only
    assert fused.group_shared_input(model, ("q_proj", "k_proj")) == 0  # one plain layer is no group


def test_a_member_merged_after_grouping_computes_alone():
    model = adapted_attention()
    fused.group_shared_input(model, QKV)
    model.adapted_model.v_proj.merge()
    x = jax.random.normal(jax.random.key(5), (2, 7, 16))
    with jax.default_matmul_precision("highest"):
        y = model(x)
        fused.ungroup_shared_input(model)
        y_ref = model(x)
    np.testing.assert_array_equal(y, y_ref)


def test_ungroup_restores_the_classes_and_grouping_changes_no_state():
    model = adapted_attention()
    graphdef, state = nnx.split(model)
    fused.group_shared_input(model, QKV)
    grouped_graphdef, grouped_state = nnx.split(model)
    assert grouped_graphdef != graphdef
    assert jax.tree.structure(grouped_state) == jax.tree.structure(state)
    assert fused.group_shared_input(model, QKV) == 0  # already grouped
    assert fused.ungroup_shared_input(model) == 3
    assert nnx.split(model)[0] == graphdef
    assert type(model.adapted_model).__name__ == "SelfAttention"


# --- compute_dtype_factors / value_and_grad_with_factors -----------------------------------


def test_factor_copies_are_the_compute_dtype_factors_of_plain_lora_layers_only():
    model = adapted_attention(jnp.bfloat16)
    model.adapted_model.k_proj = LoRA(
        model.adapted_model.k_proj.pretrained_module, 3, use_dora=True, rngs=nnx.Rngs(9)
    )
    model.adapted_model.v_proj.merge()
    paths = {path[-3:] for path, _ in nnx.to_flat_state(fused.compute_dtype_factors(model))}
    assert paths == {
        (proj, factor, "kernel")
        for proj in ("q_proj", "out_proj")
        for factor in ("adapter_down_proj", "adapter_up_proj")
    }
    assert {v.dtype for _, v in nnx.to_flat_state(fused.compute_dtype_factors(model))} == {
        jnp.dtype(jnp.bfloat16)
    }
    assert len(nnx.to_flat_state(fused.compute_dtype_factors(adapted_attention()))) == 0  # float32 compute


def test_value_and_grad_with_factors_gives_the_plain_gradients_and_puts_the_parameters_back():
    model = adapted_attention(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(5), (2, 7, 16))

    def loss(m):
        return jnp.sum(jnp.square(m(x).astype(jnp.float32)))

    with fused.disabled():
        value_ref, grads_ref = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, model.trainable))(model)
    before = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(model))}
    value, grads = fused.value_and_grad_with_factors(
        loss, model, fused.compute_dtype_factors(model), wrt=model.trainable
    )
    assert float(value) == float(value_ref)
    flat, flat_ref = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(grads_ref))
    assert flat.keys() == flat_ref.keys()
    for path in flat:
        assert flat[path].dtype == flat_ref[path].dtype == jnp.float32
        np.testing.assert_array_equal(flat[path][...], flat_ref[path][...], err_msg=str(path))
    after = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(model))}
    assert all(after[p] is before[p] for p in before)  # every parameter is its float32 self again


def test_value_and_grad_with_factors_refuses_factors_of_another_model():
    small = adapted_attention(jnp.bfloat16)
    other = SelfAttention(8, 2, rngs=nnx.Rngs(0))
    with pytest.raises(KeyError, match="compute_dtype_factors"):
        fused.value_and_grad_with_factors(
            lambda m: jnp.sum(m(jnp.ones((1, 2, 8)))),
            other,
            fused.compute_dtype_factors(small),
            wrt=nnx.Param,
        )


def test_a_jitted_step_carrying_factor_copies_trains_as_the_plain_step():
    def train(copies: bool, steps: int = 3):
        model = BertModel(BertConfig(**SMALL_CONFIG), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        adapted = AdaptedModel(
            model,
            LoRA,
            target_layers=["*.query", "*.value", "*.attention.output.dense"],
            adapter_kwargs={"rank": 2},
            rngs=nnx.Rngs(1),
        )
        randomize_up_factors(adapted, 3)
        optimizer = nnx.Optimizer(adapted, optax.adamw(1e-2), wrt=adapted.trainable)
        graphdef, state = nnx.split((adapted, optimizer))
        factors = fused.compute_dtype_factors(adapted)
        assert len(nnx.to_flat_state(factors)) == 2 * 3 * SMALL_CONFIG["num_hidden_layers"]

        @jax.jit
        def step(state, factors, ids):
            model, optimizer = nnx.merge(graphdef, state)

            def loss(m):
                return jnp.mean(jnp.square(m(ids).astype(jnp.float32)))

            if copies:
                value, grads = fused.value_and_grad_with_factors(loss, model, factors, wrt=model.trainable)
            else:
                with fused.disabled():
                    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, model.trainable))(model)
            optimizer.update(model, grads)
            return value, nnx.state((model, optimizer)), fused.compute_dtype_factors(model)

        ids = jax.random.randint(jax.random.key(4), (2, 8), 0, SMALL_CONFIG["vocab_size"])
        losses = []
        for _ in range(steps):
            loss, state, factors = step(state, factors, ids)
            losses.append(float(loss))
        return losses, {p: comparable(v[...]) for p, v in nnx.to_flat_state(state)}

    losses_ref, state_ref = train(copies=False)
    losses, state = train(copies=True)
    assert losses == losses_ref
    assert state.keys() == state_ref.keys()
    for path in state:  # parameters (float32), AdamW moments, step counts, dropout RNG counters
        assert state[path].dtype == state_ref[path].dtype
        np.testing.assert_array_equal(state[path], state_ref[path], err_msg=str(path))
