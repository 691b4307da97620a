"""Several named adapters on the Flax ``AdaptedModel`` (issue #23), the twin of
``tests/torch_impl/test_multi_adapter.py``: the active set and the per-sample choice are data, so a
jitted step is not traced again when they or the adapters' weights change (compilations counted);
``trainable`` follows ``set_adapter`` and ten AdamW steps leave the other adapters bit-identical;
a one-adapter model is what it was after adding and deleting one. (Outputs against PEFT's:
``tests/equivalence/test_multi_adapter.py``.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_impl import AdaptedModel, HoulsbyAdapterLinear, LoRA, MergeError, hotswap_adapter, merge_lora
from twinformat.errors import AdapterError, CheckpointError


class _Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(6, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(nnx.relu(self.fc1(x)))


def _perturb(model: AdaptedModel, seed: int, only: str = "adapter_") -> None:
    """Every adapter parameter (whose path holds ``only``) gets random values (a zero up factor
    hides bugs)."""
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for path, variable in nnx.to_flat_state(params):
        if only in ".".join(map(str, path)):
            variable.set_value(0.3 * jax.random.normal(next(keys), variable.get_value().shape))
    nnx.update(model, params)


def _three() -> AdaptedModel:
    model = AdaptedModel(
        _Net(nnx.Rngs(0)), LoRA, target_layers="fc1", adapter_kwargs={"rank": 2}, rngs=nnx.Rngs(1)
    )
    model.add_adapter("b", LoRA, ["fc1", "fc2"], adapter_kwargs={"rank": 3, "alpha": 2.0}, rngs=nnx.Rngs(2))
    model.add_adapter("c", LoRA, "fc2", adapter_kwargs={"rank": 1, "use_dora": True}, rngs=nnx.Rngs(3))
    _perturb(model, 4)
    return model


X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
# 8 rows a sample, at least the concatenated rank of fc1's adapters (2 + 3): the mixed path
# weights each sample's copy of the up factors in a batched GEMM instead of the activations.
X_ROWS = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 6)), jnp.float32)


def test_set_adapter_weights_and_mixed_batches_do_not_recompile_a_jitted_forward():
    model = _three()
    traces = []

    @nnx.jit
    def forward(model, x, mask):
        traces.append(1)
        return model(x, adapter_mask=mask)

    @nnx.jit
    def active(model, x):
        traces.append(1)
        return model(x)

    outputs = {}
    for name in ("default", "b", "c"):
        model.set_adapter(name)
        outputs[name] = active(model, X)
    model.set_adapter(["b", "c"])
    both = active(model, X)
    with model.disable_adapter():
        base = active(model, X)
    assert len(traces) == 1  # one trace for every active set, disable_adapter included
    # 'c' adapts fc2 only: with 'b' active too, fc2's output is b's plus c's term (same input).
    assert not np.allclose(both, outputs["b"]) and not np.allclose(both, outputs["c"])
    np.testing.assert_array_equal(
        base,
        model.adapted_model.fc2.pretrained_module(nnx.relu(model.adapted_model.fc1.pretrained_module(X))),
    )

    for names in (["default", "b", "__base__", "c"], ["c", "c", "b", "default"]):
        mixed = forward(model, X, model.adapter_mask(names))
        for i, name in enumerate(names):
            expected = base if name == "__base__" else outputs[name]
            np.testing.assert_allclose(mixed[i], expected[i], rtol=1e-6, atol=1e-6)
    _perturb(model, 9)  # new weights, same shapes: hot, no trace
    forward(model, X, model.adapter_mask(["b"] * 4))
    assert len(traces) == 2  # one more, for the mixed batch's (batch, adapters) switch


def test_trainable_follows_set_adapter_and_adamw_leaves_the_other_adapters_bit_identical():
    model = _three()
    model.set_adapter("b")
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, model.trainable))}
    assert paths and all(".named_adapters.b." in p for p in paths)
    before = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    trainable = model.trainable  # read outside the step: inside, the active set is data
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=trainable)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(X) ** 2), argnums=nnx.DiffState(0, trainable))(model)
        optimizer.update(model, grads)

    for _ in range(10):
        step(model, optimizer)
    after = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    changed = {".".join(map(str, p)) for p in before if not np.array_equal(before[p], after[p])}
    assert changed == paths
    model.set_adapter(["default", "c"])
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, model.trainable))}
    assert paths == {p for p in map(lambda q: ".".join(map(str, q)), before) if ".named_adapters.c." in p} | {
        "adapted_model.fc1.adapter_down_proj.kernel",
        "adapted_model.fc1.adapter_up_proj.kernel",
    }


def test_a_one_adapter_model_is_what_it_was_after_adding_and_deleting_an_adapter():
    model = AdaptedModel(
        _Net(nnx.Rngs(0)), LoRA, target_layers="fc1", adapter_kwargs={"rank": 2}, rngs=nnx.Rngs(1)
    )
    _perturb(model, 1)
    graph, state = nnx.split(model)
    expected = model(X)

    model.add_adapter("b", LoRA, ["fc1", "fc2"], adapter_kwargs={"rank": 3}, rngs=nnx.Rngs(2))
    _perturb(model, 5, only="named_adapters")
    np.testing.assert_allclose(model(X), expected, rtol=1e-6, atol=1e-6)  # added, inactive
    model.set_adapter("b")
    assert not np.allclose(model(X), expected)
    model.delete_adapter("b")

    again_graph, again_state = nnx.split(model)
    assert again_graph == graph
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state, again_state))
    np.testing.assert_array_equal(model(X), expected)
    assert sorted(model.trainable_state_dict()) == [
        "adapted_model.fc1.adapter_down_proj.weight",
        "adapted_model.fc1.adapter_up_proj.weight",
    ]


def test_unknown_names_are_refused_naming_the_adapters_there_are():
    model = _three()
    with pytest.raises(
        AdapterError, match=r"no adapter named 'zzz'; this model holds \['default', 'b', 'c'\]"
    ):
        model.set_adapter(["b", "zzz"])
    with pytest.raises(AdapterError, match="no adapter named 'zzz'"):
        model(X, adapter_names=["b", "zzz", "c", "c"])
    model.delete_adapter("b")
    with pytest.raises(AdapterError, match=r"no adapter named 'b'; this model holds \['default', 'c'\]"):
        model.set_adapter("b")
    with pytest.raises(AdapterError, match="cannot be deleted"):
        model.delete_adapter("default")
    with pytest.raises(MergeError, match="holds the adapters"):
        merge_lora(model)  # would merge the default alone, silently dropping the others
    assert not any(getattr(m, "merged", False) for _, m in nnx.iter_graph(model))


def test_hotswap_adapter_replaces_weights_in_place_and_a_jitted_forward_is_not_traced_again(tmp_path):
    for name, rank, alpha in (("r4", 4, 8.0), ("r2", 2, 5.0)):
        model = AdaptedModel(
            _Net(nnx.Rngs(0)),
            LoRA,
            target_layers=["fc1", "fc2"],
            adapter_kwargs={"rank": rank, "alpha": alpha},
            rngs=nnx.Rngs(rank),
        )
        _perturb(model, rank)
        model.save_pretrained(tmp_path / name)
    ours = AdaptedModel.from_pretrained(_Net(nnx.Rngs(0)), tmp_path / "r4", rngs=nnx.Rngs(1))
    expected = AdaptedModel.from_pretrained(_Net(nnx.Rngs(0)), tmp_path / "r2", rngs=nnx.Rngs(1))(X)
    traces = []

    @nnx.jit
    def forward(model, x):
        traces.append(1)
        return model(x)

    before = forward(ours, X)
    hotswap_adapter(ours, tmp_path / "r2", "default")
    after = forward(ours, X)

    assert len(traces) == 1 and not np.allclose(before, after)
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-6)
    small = AdaptedModel.from_pretrained(_Net(nnx.Rngs(0)), tmp_path / "r2", rngs=nnx.Rngs(1))
    with pytest.raises(CheckpointError, match="rank 4, more than adapter 'default'"):
        hotswap_adapter(small, tmp_path / "r4", "default")


def test_a_houlsby_default_beside_a_named_lora_switches_as_data_and_saves(tmp_path):
    model = AdaptedModel(
        _Net(nnx.Rngs(0)),
        HoulsbyAdapterLinear,
        target_layers="fc1",
        adapter_kwargs={"projection_size": 2},
        rngs=nnx.Rngs(1),
    )
    model.add_adapter("lora", LoRA, "fc2", adapter_kwargs={"rank": 2}, rngs=nnx.Rngs(2))
    _perturb(model, 3)
    houlsby, lora = model.adapted_model.fc1, model.adapted_model.fc2
    model.set_adapter("lora")
    np.testing.assert_allclose(model(X), lora(nnx.relu(houlsby.pretrained_linear(X))), rtol=1e-6, atol=1e-6)
    model.set_adapter("default")
    np.testing.assert_allclose(model(X), lora.pretrained_module(nnx.relu(houlsby(X))), rtol=1e-6, atol=1e-6)
    model.set_adapter(["default", "lora"])
    expected = model(X)

    assert model.save_pretrained(tmp_path / "both") == {"default": "peft-twins", "lora": "peft"}

    again = AdaptedModel.from_pretrained(_Net(nnx.Rngs(0)), tmp_path / "both", rngs=nnx.Rngs(5))
    again.load_adapter(tmp_path / "both" / "lora", "lora", rngs=nnx.Rngs(6))
    again.set_adapter(["default", "lora"])
    np.testing.assert_allclose(again(X), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("x", [X, X_ROWS], ids=["one-row", "rows"])
def test_a_mixed_batch_takes_one_gemm_pair_where_every_adapter_is_plain_lora(monkeypatch, x):
    """fc1 holds 'default' and 'b' (plain LoRA): one concatenated GEMM pair for every sample;
    fc2 holds the DoRA adapter 'c': the per-adapter loop. Both give the loop's numbers."""
    model = _three()
    model.eval()
    names = ["b", "__base__", "default", "c"]
    mask = model.adapter_mask(names)
    mixed = []
    original = LoRA._mixed_delta

    def counted(self, *args):
        mixed.append(self)
        return original(self, *args)

    monkeypatch.setattr(LoRA, "_mixed_delta", counted)
    fast = model(x, adapter_mask=mask)
    assert mixed == [model.adapted_model.fc1]
    monkeypatch.setattr(LoRA, "_can_mix", lambda self: False)
    loop = model(x, adapter_mask=mask)
    np.testing.assert_allclose(fast, loop, rtol=1e-6, atol=1e-6)
    assert not np.allclose(fast[0], fast[1])  # 'b' shows against the base sample


def _dot_generals(model: AdaptedModel, x: jax.Array) -> int:
    graph, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graph, s)(x))(state)
    return str(jaxpr).count("dot_general")


@pytest.mark.parametrize("x", [X, X_ROWS], ids=["one-row", "rows"])
@pytest.mark.parametrize("active", ["default", "b", ["default", "b"]])
def test_a_batch_wide_active_set_takes_one_gemm_pair_not_one_per_held_adapter(monkeypatch, active, x):
    """With 'default' and 'b' on fc1, the active set is data: the loop would run both adapters'
    GEMMs on every call, active or not. fc1 takes one concatenated pair instead (the DoRA layer
    fc2 loops), with the loop's numbers, and the base model's exactly when disabled."""
    model = _three()
    model.eval()
    model.set_adapter(active)
    fast, fast_dots = model(x), _dot_generals(model, x)
    with model.disable_adapter():
        base = model(x)
    with monkeypatch.context() as patch:
        patch.setattr(LoRA, "_can_mix", lambda self: False)
        loop, loop_dots = model(x), _dot_generals(model, x)
        with model.disable_adapter():
            np.testing.assert_array_equal(model(x), base)
    np.testing.assert_allclose(fast, loop, rtol=1e-6, atol=1e-6)
    assert fast_dots == loop_dots - 2  # fc1: one GEMM pair for its two adapters, not two
    assert not np.allclose(fast, base)
    fc1 = model.adapted_model.fc1
    np.testing.assert_array_equal(
        base, model.adapted_model.fc2.pretrained_module(nnx.relu(fc1.pretrained_module(x)))
    )
