"""``from_pretrained`` at LLM size: abstract build, one tensor at a time, straight onto a mesh.

The BERT twin stands in for every twin (the loader knows no family); a small twin defined here has
tied weights. Mesh tests use the suite's 8 simulated CPU devices (tests/conftest.py sets
``XLA_FLAGS``) on a ('data', 'fsdp', 'model') = (2, 2, 2) mesh, and compare a LoRA train step on
each default partitioning with the same step on one device (SPEC tolerances, float32).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file

from flax_impl import AdaptedModel, LoRA
from flax_impl.checkpoint import torch_style_state_dict
from flax_impl.interchange import model_state
from flax_impl.models import BertModel
from flax_impl.models import pretrained as loader
from flax_impl.models.partitioning import (
    data_parallel_rules,
    fsdp_rules,
    make_mesh,
    partition_specs,
    tensor_parallel_rules,
)
from flax_impl.sharding import ShardingRuleError
from tests.zoo.bert import SMALL_CONFIG
from twinformat.errors import CheckpointError
from twinformat.names import dotted

P = PartitionSpec
ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"model_type": "bert", **SMALL_CONFIG}
TARGETS = ["*.query", "*.value", "*.intermediate.dense", "*.output.dense"]


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    """A BERT state dict in PyTorch names and layouts (the weights every test loads)."""
    return torch_style_state_dict(BertModel(CONFIG, rngs=nnx.Rngs(seed)))


def _write(
    directory: Path, tensors: dict[str, np.ndarray], *, shards: int = 1, config: dict | None = None
) -> Path:
    """A save_pretrained directory: config.json and one file, or ``shards`` files and an index."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or CONFIG))
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return directory
    # Balanced by bytes, as transformers' max_shard_size splits: the largest shard is ~1/shards.
    parts: list[dict[str, np.ndarray]] = [{} for _ in range(shards)]
    for name in sorted(tensors, key=lambda n: -tensors[n].nbytes):
        min(parts, key=lambda part: sum(a.nbytes for a in part.values()))[name] = tensors[name]
    weight_map = {}
    for i, part in enumerate(parts):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(directory / file))
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def _spec(array: jax.Array) -> tuple:
    spec = tuple(array.sharding.spec)
    return spec + (None,) * (array.ndim - len(spec))  # P('a') and P('a', None) are the same


def _params(model: nnx.Module) -> dict[str, jax.Array]:
    return {dotted(path): v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ----------------------------------------------------------------------------- files and dtypes
@pytest.mark.parametrize("shards", [1, 3])
def test_single_and_sharded_directories_load_every_tensor_bit_for_bit(tmp_path, shards):
    state = _state()
    model, report = BertModel.from_pretrained(
        _write(tmp_path, state, shards=shards), output_loading_info=True
    )

    assert report.ok and sorted(report.loaded) == sorted(state)
    loaded = torch_style_state_dict(model)
    for key, array in state.items():
        np.testing.assert_array_equal(loaded[key], array, err_msg=key)
    assert model.embeddings.dropout.deterministic  # eval mode


def test_transposed_blocks_read_in_slabs_and_tiles_are_bit_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "_SLAB_BYTES", 100)  # a few rows per slab, ragged last slab
    monkeypatch.setattr(loader, "_TILE", 3)  # tiles of 3 x 3, ragged at the edges
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in _state().items()}
    devices = jax.devices()[:2]
    mesh = make_mesh({"model": len(devices)}, devices=devices)

    model = BertModel.from_pretrained(_write(tmp_path, state), mesh=mesh, rules=tensor_parallel_rules("bert"))

    loaded = torch_style_state_dict(model)
    for key, array in state.items():  # bf16 in the file, float32 in the model: an exact widening
        np.testing.assert_array_equal(loaded[key], array.astype(np.float32), err_msg=key)


def test_the_twin_is_built_abstractly_without_running_an_initializer(tmp_path):
    built = []

    class Recording(BertModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.encoder.layer[0].attention.self.query.kernel.get_value())

    directory = _write(tmp_path, _state())
    Recording.from_pretrained(directory)
    assert len(built) == 1 and isinstance(built[0], jax.core.Tracer)  # traced by nnx.eval_shape
    Recording.from_pretrained(directory, strict=False)  # keeps random values for what is missing
    assert isinstance(built[1], jax.Array) and not isinstance(built[1], jax.core.Tracer)


@pytest.fixture
def opened(monkeypatch):
    """Every file the loader opens to read tensors (headers are read without safe_open)."""
    import safetensors

    files = []
    real = safetensors.safe_open

    def counting(file, *args, **kwargs):
        files.append(file)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    return files


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop", r"missing.*encoder\.layer\.1\.output\.dense\.weight"),
        ("extra", r"unexpected.*encoder\.layer\.9\.weight"),
        ("reshape", r"encoder\.layer\.0\.intermediate\.dense\.weight"),
    ],
)
def test_a_refused_load_reads_no_tensor(tmp_path, opened, change, message):
    state = _state()
    if change == "drop":
        del state["encoder.layer.1.output.dense.weight"]
    elif change == "extra":
        state["encoder.layer.9.weight"] = np.zeros((2, 2), np.float32)
    else:
        state["encoder.layer.0.intermediate.dense.weight"] = np.zeros((8, 16), np.float32)
    directory = _write(tmp_path, state, shards=2)

    with pytest.raises(CheckpointError, match=message):
        BertModel.from_pretrained(directory)
    assert opened == []
    BertModel.from_pretrained(_write(tmp_path / "good", _state(), shards=2))
    assert len(opened) == 2  # the counter sees reads: one open per shard


def test_a_rule_that_does_not_fit_the_mesh_is_refused_before_reading(tmp_path, opened):
    directory = _write(tmp_path, _state())
    mesh = make_mesh({"model": 1}, devices=jax.devices()[:1])
    with pytest.raises(ShardingRuleError, match=r"'tensor'"):
        BertModel.from_pretrained(directory, mesh=mesh, rules=[("*.query.kernel", P(None, "tensor"))])
    with pytest.raises(ValueError, match="pass mesh= too"):
        BertModel.from_pretrained(directory, rules=tensor_parallel_rules("bert"))
    assert opened == []


def test_param_dtype_casts_each_tensor_and_notes_it(tmp_path):
    state = _state()
    directory = _write(tmp_path, state)

    model, report = BertModel.from_pretrained(directory, param_dtype=jnp.bfloat16, output_loading_info=True)

    query = np.asarray(model.encoder.layer[0].attention.self.query.kernel[...])
    assert query.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        query, state["encoder.layer.0.attention.self.query.weight"].T.astype(ml_dtypes.bfloat16)
    )
    assert {np.dtype(v.dtype) for v in _params(model).values()} == {np.dtype(jnp.bfloat16)}
    assert any("cast from F32 to the target's BF16" in note for note in report.notes)


def test_a_bf16_file_loads_into_float32_exactly(tmp_path):
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in _state().items()}
    model = BertModel.from_pretrained(_write(tmp_path, state, shards=2))
    loaded = torch_style_state_dict(model)
    for key, array in state.items():
        assert loaded[key].dtype == np.float32
        np.testing.assert_array_equal(loaded[key], array.astype(np.float32), err_msg=key)


# ----------------------------------------------------------------------------- tied weights
class TiedLM(nnx.Module):
    """A language model whose output projection is its input embedding when tied (as Llama's
    ``tie_word_embeddings``): ``model.embed_tokens``, ``model.norm``, and ``lm_head`` if untied."""

    model_type = "tied_lm"

    def __init__(self, config, *, dtype=None, param_dtype=jnp.float32, precision=None, rngs):
        tie = config.get("tie_word_embeddings", True)
        self.model = nnx.Module()
        self.model.embed_tokens = nnx.Embed(12, 4, param_dtype=param_dtype, rngs=rngs)
        self.model.norm = nnx.RMSNorm(4, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if tie else nnx.Linear(4, 12, use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.tied_weights = {"lm_head.weight": "model.embed_tokens.weight"} if tie else {}

    def __call__(self, ids):
        hidden = self.model.norm(self.model.embed_tokens(ids))
        return self.model.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        return loader.from_pretrained(cls, path, **kwargs)


def _tied_files(tmp_path: Path, head: str, *, tie: bool = True) -> Path:
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((12, 4)).astype(np.float32)
    tensors = {"model.embed_tokens.weight": embed, "model.norm.weight": np.ones(4, np.float32)}
    if head == "equal":
        tensors["lm_head.weight"] = embed.copy()
    elif head == "different":
        tensors["lm_head.weight"] = embed + 1.0
    elif head == "alone":
        tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    config = {"model_type": "tied_lm", "tie_word_embeddings": tie}
    return _write(tmp_path / head, tensors, shards=2 if head != "absent" else 1, config=config)


@pytest.mark.parametrize(
    ("head", "note"),
    [
        ("absent", "lm_head.weight: tied alias of model.embed_tokens.weight, filled through it"),
        ("equal", "lm_head.weight: tied alias of model.embed_tokens.weight, checked equal to it"),
        ("alone", "lm_head.weight: tied alias of model.embed_tokens.weight, loaded through it"),
    ],
)
def test_a_tied_key_is_dropped_when_absent_or_equal_and_loads_its_source_when_alone(tmp_path, head, note):
    directory = _tied_files(tmp_path, head)
    model, report = TiedLM.from_pretrained(directory, output_loading_info=True)

    assert report.ok and note in report.notes
    expected = _tied_files(tmp_path / "reference", "equal")
    from safetensors.numpy import load_file

    embed = {}
    for file in expected.glob("*.safetensors"):
        embed.update(load_file(str(file)))
    np.testing.assert_array_equal(
        np.asarray(model.model.embed_tokens.embedding[...]), embed["lm_head.weight"]
    )


def test_tied_keys_holding_different_values_are_refused_naming_both(tmp_path):
    with pytest.raises(CheckpointError, match=r"lm_head\.weight.*model\.embed_tokens\.weight.*differ"):
        TiedLM.from_pretrained(_tied_files(tmp_path, "different"))
    # untied, the same file loads both tensors as they are
    untied = _tied_files(tmp_path / "untied", "different", tie=False)
    model = TiedLM.from_pretrained(untied)
    np.testing.assert_array_equal(
        np.asarray(model.lm_head.kernel[...]).T, np.asarray(model.model.embed_tokens.embedding[...]) + 1.0
    )


def test_a_tied_key_of_another_shape_is_refused_before_reading(tmp_path, opened):
    directory = tmp_path / "shape"
    tensors = {
        "model.embed_tokens.weight": np.zeros((12, 4), np.float32),
        "model.norm.weight": np.ones(4, np.float32),
        "lm_head.weight": np.zeros((12, 2), np.float32),
    }
    _write(directory, tensors, config={"model_type": "tied_lm"})
    with pytest.raises(CheckpointError, match=r"lm_head\.weight: tied to model\.embed_tokens\.weight"):
        TiedLM.from_pretrained(directory)
    assert opened == []


# ----------------------------------------------------------------------------- on a mesh
STRATEGIES = {
    "data_parallel": data_parallel_rules(),
    "fsdp": fsdp_rules,
    "tensor_parallel": tensor_parallel_rules("bert"),
    "2d": tensor_parallel_rules("bert", fsdp_axis="fsdp"),
}


# A train step compiles for ~4 s of CPU per partitioning: the split ones train here; replicated
# weights (data parallel) change nothing in the step, and the 2-D rules train on the Llama below.
TRAINED = ("fsdp", "tensor_parallel")


def _expected(strategy: str, path: str, shape: tuple[int, ...]) -> tuple:
    """Each strategy's placement, written out independently of the rule tables."""
    spec = [None] * len(shape)
    if strategy == "fsdp" and len(shape) >= 2:
        spec[int(np.argmax(shape))] = "fsdp"  # SMALL_CONFIG's dimensions are all even
    elif strategy in ("tensor_parallel", "2d"):
        other = "fsdp" if strategy == "2d" else None
        column = any(f".{n}." in path for n in ("query", "key", "value", "intermediate.dense"))
        row = ".output.dense." in path
        if column and path.endswith("kernel"):
            spec = [other, "model"]
        elif column and path.endswith("bias"):
            spec = ["model"]
        elif row and path.endswith("kernel") or path.endswith("word_embeddings.embedding"):
            spec = ["model", other]
    return tuple(spec)


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
    return make_mesh({"data": 2, "fsdp": 2, "model": 2}, devices=jax.devices()[:8])


MESH_CONFIG = {**CONFIG, "num_hidden_layers": 1}  # one layer: a fifth of the compile time


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    state = torch_style_state_dict(BertModel(MESH_CONFIG, rngs=nnx.Rngs(0)))
    return _write(tmp_path_factory.mktemp("bert"), state, shards=2, config=MESH_CONFIG)


def _adapted(base: nnx.Module, targets: list[str] = TARGETS) -> AdaptedModel:
    model = AdaptedModel(
        base, LoRA, target_layers=targets, adapter_kwargs={"rank": 4, "alpha": 8.0}, rngs=nnx.Rngs(1)
    )
    # Random up projections, so that every factor gets a gradient from the first step.
    for index, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(model, model.trainable))):
        value = variable[...]
        noise = 0.05 * np.random.default_rng(index).standard_normal(value.shape).astype(np.float32)
        variable.set_value(jax.device_put(noise.astype(value.dtype), value.sharding))
    return model


def _train(model: AdaptedModel, ids: jax.Array, target: jax.Array, steps: int = 2) -> tuple[list, dict]:
    """README's step: nnx.split, a pure function under jax.jit, AdamW on the trainable filter."""
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=model.trainable)
    graphdef, state = nnx.split((model, optimizer))
    trainable = model.trainable

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, ids, target):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean((m(ids) - target) ** 2), argnums=nnx.DiffState(0, trainable)
        )(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    losses = []
    for _ in range(steps):
        loss, state = step(state, ids, target)
        losses.append(float(loss))
    nnx.update((model, optimizer), state)
    return losses, {dotted(p): v[...] for p, v in nnx.to_flat_state(nnx.state(model, model.trainable))}


@pytest.fixture(scope="module")
def one_device_run(bert_dir):
    ids = jax.random.randint(jax.random.key(2), (8, 12), 0, CONFIG["vocab_size"])
    target = jax.random.normal(jax.random.key(3), (8, 12, CONFIG["hidden_size"]))
    return ids, target, _train(_adapted(BertModel.from_pretrained(bert_dir)), ids, target)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_default_rule_set_places_every_param_and_lora_steps_as_on_one_device(
    mesh, bert_dir, one_device_run, strategy
):
    base = BertModel.from_pretrained(bert_dir, mesh=mesh, rules=STRATEGIES[strategy])

    file = torch_style_state_dict(BertModel(MESH_CONFIG, rngs=nnx.Rngs(0)))
    for key, array in torch_style_state_dict(base).items():
        np.testing.assert_array_equal(array, file[key], err_msg=key)
    for path, value in _params(base).items():
        assert value.sharding.mesh.shape == mesh.shape, path
        assert _spec(value) == _expected(strategy, path, value.shape), path
    query = base.encoder.layer[0].attention.self.query
    if strategy == "tensor_parallel":
        assert query.kernel[...].addressable_shards[0].data.shape == (16, 8)  # really split in 2

    ids, target, (losses_one, trained_one) = one_device_run
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    model = _adapted(base)
    kernel = _spec(query.kernel[...])
    lora = model.adapted_model.encoder.layer[0].attention.self.query
    assert _spec(lora.adapter_down_proj.kernel[...]) == (kernel[0], None)  # like the kernel's input
    assert _spec(lora.adapter_up_proj.kernel[...]) == (None, kernel[1])  # like its output
    if strategy not in TRAINED:
        return
    losses, trained = _train(model, jax.device_put(ids, batch), jax.device_put(target, batch))

    np.testing.assert_allclose(losses, losses_one, rtol=1e-5, atol=1e-5)
    for path, value in trained.items():
        np.testing.assert_allclose(value, trained_one[path], rtol=1e-4, atol=1e-4, err_msg=path)


LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def test_a_tied_llama_on_a_2d_mesh_loads_and_trains_lora_as_on_one_device(mesh, tmp_path):
    from flax_impl.models.llama import LlamaForCausalLM

    state = torch_style_state_dict(LlamaForCausalLM(LLAMA, rngs=nnx.Rngs(0)))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()  # saved tied: equal, dropped
    directory = _write(tmp_path, state, shards=2, config=LLAMA)
    rules = tensor_parallel_rules("llm", fsdp_axis="fsdp")

    base, report = LlamaForCausalLM.from_pretrained(
        directory, mesh=mesh, rules=rules, output_loading_info=True
    )

    assert "lm_head.weight: tied alias of model.embed_tokens.weight, checked equal to it" in report.notes
    specs = {path: _spec(value) for path, value in _params(base).items()}
    assert specs["model.embed_tokens.embedding"] == ("model", "fsdp")  # vocab-parallel
    for name in ("q_proj", "k_proj", "v_proj"):
        assert specs[f"model.layers.0.self_attn.{name}.kernel"] == ("fsdp", "model")  # column
    assert specs["model.layers.0.self_attn.o_proj.kernel"] == ("model", "fsdp")  # row
    assert specs["model.layers.0.mlp.gate_proj.kernel"] == specs["model.layers.0.mlp.up_proj.kernel"]
    assert specs["model.layers.0.mlp.down_proj.kernel"] == ("model", "fsdp")
    assert specs["model.norm.scale"] == (None,)

    targets = ["*.q_proj", "*.v_proj", "*.o_proj", "*.down_proj"]
    ids = jax.random.randint(jax.random.key(2), (8, 12), 0, LLAMA["vocab_size"])
    target = jax.random.normal(jax.random.key(3), (8, 12, LLAMA["vocab_size"]))
    losses_one, trained_one = _train(
        _adapted(LlamaForCausalLM.from_pretrained(directory), targets), ids, target
    )
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    losses, trained = _train(
        _adapted(base, targets), jax.device_put(ids, batch), jax.device_put(target, batch)
    )

    np.testing.assert_allclose(losses, losses_one, rtol=1e-5, atol=1e-5)
    for path, value in trained.items():
        np.testing.assert_allclose(value, trained_one[path], rtol=1e-4, atol=1e-4, err_msg=path)


SPEECH = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "conv_dim": [8, 8],
    "conv_stride": [5, 2],
    "conv_kernel": [10, 3],
    "num_conv_pos_embeddings": 4,
    "num_conv_pos_embedding_groups": 2,
}
WHISPER = {
    "model_type": "whisper",
    "d_model": 16,
    "encoder_layers": 1,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "num_mel_bins": 8,
    "max_source_positions": 8,
}


@pytest.mark.parametrize(
    ("twin", "config", "family", "column", "row"),
    [
        (
            "Wav2Vec2Model",
            {"model_type": "wav2vec2", **SPEECH},
            "speech",
            "attention.q_proj",
            "attention.out_proj",
        ),
        (
            "WavLMModel",
            {"model_type": "wavlm", **SPEECH},
            "speech",
            "feed_forward.intermediate_dense",
            "feed_forward.output_dense",
        ),
        ("WhisperEncoder", WHISPER, "whisper", "fc1", "fc2"),
    ],
)
def test_speech_twins_load_onto_their_tensor_parallel_rules_bit_for_bit(
    mesh, tmp_path, twin, config, family, column, row
):
    import flax_impl.models as models

    cls = getattr(models, twin)
    state = torch_style_state_dict(cls(config, rngs=nnx.Rngs(0)))
    directory = _write(tmp_path, state, shards=2, config=config)

    model = cls.from_pretrained(directory, mesh=mesh, rules=tensor_parallel_rules(family, fsdp_axis="fsdp"))

    loaded = torch_style_state_dict(model)
    for key, array in state.items():
        np.testing.assert_array_equal(loaded[key], array, err_msg=key)
    specs = {path: _spec(value) for path, value in _params(model).items()}
    prefix = "layers.0" if twin == "WhisperEncoder" else "encoder.layers.0"
    assert specs[f"{prefix}.{column}.kernel"] == ("fsdp", "model")
    assert specs[f"{prefix}.{column}.bias"] == ("model",)
    assert specs[f"{prefix}.{row}.kernel"] == ("model", "fsdp")
    assert all(spec == (None,) for path, spec in specs.items() if "layer_norm" in path)
    for variable in jax.tree.leaves(nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        assert variable.get_value().sharding.mesh.shape == mesh.shape  # random-key streams too


def test_a_dimension_the_mesh_does_not_divide_is_refused_naming_the_variable(mesh):
    with pytest.raises(ShardingRuleError, match=r"'a\.kernel' \(6, 4\).*axis 0 of length 6"):
        partition_specs({"a.kernel": (6, 4)}, mesh, [("a.*", P(("data", "fsdp")))])
    # FSDP takes the next largest dimension the axis divides, or replicates
    specs, _ = partition_specs({"a.kernel": (7, 4), "b.kernel": (7, 3)}, mesh, fsdp_rules)
    assert specs == {"a.kernel": P(None, "fsdp"), "b.kernel": P()}


def test_make_mesh_fills_one_axis_and_refuses_a_wrong_count():
    devices = jax.devices()
    assert make_mesh({"data": -1, "model": 1}).shape["data"] == len(devices)
    with pytest.raises(ValueError, match="use -1"):
        make_mesh({"data": len(devices) + 1})


# ----------------------------------------------------------------------------- host memory
MEMORY_PROBE = r"""
import json, sys
import jax, jax.numpy as jnp
from flax_impl.models import BertModel

def status(field):  # kB -> bytes; VmHWM is this process's peak RSS (ru_maxrss also counts the
    for line in open("/proc/self/status"):  # parent's, inherited through fork and exec)
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

jnp.zeros(1).block_until_ready()  # start the runtime first: its ~150 MB are not the loader's
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
before = status("VmRSS")
model = BertModel.from_pretrained(sys.argv[1])
jax.block_until_ready(jax.tree.leaves(model))
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def test_peak_host_memory_is_the_weights_plus_one_shard_and_one_tensor(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads the peak RSS from /proc/self/status")
    config = {
        **CONFIG,
        "vocab_size": 8192,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 4,
    }
    rng = np.random.default_rng(0)
    specs = model_state(nnx.eval_shape(lambda: BertModel(config, rngs=nnx.Rngs(0)))).specs
    state = {k: rng.standard_normal(shape, dtype=np.float32) for k, (_, shape) in specs.items()}
    directory = _write(tmp_path, state, shards=4, config=config)
    weights = sum(a.nbytes for a in state.values())
    largest_shard = max(f.stat().st_size for f in directory.glob("*.safetensors"))
    largest_tensor = max(a.nbytes for a in state.values())
    del state

    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(directory)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["before"]
    # On CPU the device *is* host memory: the loaded weights count once. Reading everything first
    # (the loader before this one) costs about 3x the weights: bytes read, converted, placed.
    # 64 MiB of slack: the JAX runtime's own first-use allocations, measured at ~35 MiB.
    bound = weights + largest_shard + largest_tensor + 64 * 2**20
    assert growth <= bound, f"peak RSS grew {growth / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- the guide
GUIDE = ROOT / "docs" / "guides" / "large_models.md"


def test_the_large_models_guide_runs_as_pasted(tmp_path):
    from tests.test_docs import snippets

    blocks = snippets(GUIDE.read_text())
    assert blocks, f"{GUIDE} has no python block"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # a block that needs several devices says so in its setup
    printed = ""
    for block in blocks:
        done = subprocess.run(
            [sys.executable, "-c", block.setup + "\n" + block.code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{GUIDE.name} line {block.line}:\n{done.stderr[-3000:]}"
        printed += done.stdout
    assert "P('fsdp', 'model')" in printed and "checked equal to it" in printed, printed  # what it says
