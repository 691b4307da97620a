"""Sharded checkpoints: multi-file safetensors with an index, and Flax loading slice by slice.

The memory test starts a real 4-process JAX program on CPU (2 simulated devices each, one
('data', 'model') mesh over all 8) and measures each process's peak RSS while it loads a
checkpoint of 4 files into an abstract model: about the shards it owns plus one tensor, far
below the checkpoint; reading the same checkpoint whole in the same process shows the
measurement sees it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec

from converters import convert_sharded, load_flax_sharded, save_sharded
from converters.files import INDEX_NAME, ShardedCheckpoint, TensorFile
from converters.sharded import parse_size, write_sharded
from converters.views import ConversionError
from flax_impl.sharding import shard_model
from tests.zoo import flax_models, torch_models
from tests.zoo.flax_models import MixedDtypeLayers
from twinformat import kinds as layout
from twinformat.errors import CheckpointError

REPO = Path(__file__).resolve().parents[2]


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((8, 4, 3), dtype=np.float32),  # (out, in, k)
        "conv.bias": rng.standard_normal(8, dtype=np.float32),
        "fc.weight": rng.standard_normal((6, 8), dtype=np.float32),  # (out, in)
        "fc.bias": rng.standard_normal(6, dtype=np.float32),
        "half.weight": rng.standard_normal((4, 4)).astype(ml_dtypes.bfloat16),
    }


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX_NAME).read_text())


# ----------------------------------------------------------------------------- files and index
def test_write_sharded_splits_by_size_and_writes_the_index_format(tmp_path):
    tensors = _tensors()
    write_sharded(tmp_path, tensors, {"layout": "torch"}, max_shard_bytes=200)
    index = _index(tmp_path)
    assert index["metadata"] == {"total_size": sum(a.nbytes for a in tensors.values())}
    assert set(index["weight_map"]) == set(tensors)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in tmp_path.glob("*.safetensors"))
    for file in files:  # each file within the limit, unless it holds one bigger tensor
        names = [k for k, v in index["weight_map"].items() if v == file]
        size = sum(tensors[k].nbytes for k in names)
        assert size <= 200 or len(names) == 1, (file, names)
    assert max(os.path.getsize(tmp_path / f) for f in files) < sum(a.nbytes for a in tensors.values())


def test_sharded_checkpoint_reads_tensors_and_slices_bit_exactly_in_any_dtype(tmp_path):
    tensors = _tensors()
    write_sharded(tmp_path, tensors, {"layout": "torch"}, max_shard_bytes=200)
    with ShardedCheckpoint(tmp_path) as checkpoint:
        assert sorted(checkpoint.names) == sorted(tensors)
        for name, array in tensors.items():
            read = checkpoint.get(name)
            assert read.dtype == array.dtype and checkpoint.spec(name)[1] == array.shape
            np.testing.assert_array_equal(read.view(np.uint8), array.view(np.uint8))
        block = checkpoint.read_slice("conv.weight", (slice(2, 5), slice(None), slice(1, 3)))
        np.testing.assert_array_equal(block, tensors["conv.weight"][2:5, :, 1:3])
        assert checkpoint.total_bytes == sum(a.nbytes for a in tensors.values())
    # the index file itself opens the same checkpoint
    assert ShardedCheckpoint(tmp_path / INDEX_NAME).names == ShardedCheckpoint(tmp_path).names


def test_a_failed_write_leaves_no_index_and_no_partial_file(tmp_path):
    tensors = _tensors()
    write_sharded(tmp_path, tensors, max_shard_bytes=200)

    def produce(name: str) -> np.ndarray:
        if name == "fc.bias":
            raise RuntimeError("disk full")
        return tensors[name]

    specs = {
        name: ("BF16" if a.dtype == ml_dtypes.bfloat16 else "F32", a.shape) for name, a in tensors.items()
    }
    with pytest.raises(RuntimeError, match="disk full"):
        write_sharded(tmp_path, None, specs=specs, produce=produce, max_shard_bytes=200)
    assert not (tmp_path / INDEX_NAME).exists()  # no index: no reader sees a mix of old and new
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(FileNotFoundError, match=INDEX_NAME):
        ShardedCheckpoint(tmp_path)


def test_rewriting_with_fewer_files_removes_the_old_files(tmp_path):
    write_sharded(tmp_path, _tensors(), max_shard_bytes=100)
    many = {p.name for p in tmp_path.glob("*.safetensors")}
    write_sharded(tmp_path, _tensors(1), max_shard_bytes=10**6)
    assert {p.name for p in tmp_path.glob("*.safetensors")} == {"model-00001-of-00001.safetensors"}
    assert len(many) > 1
    np.testing.assert_array_equal(ShardedCheckpoint(tmp_path).get("fc.bias"), _tensors(1)["fc.bias"])


def _broken(tmp_path: Path, edit) -> Path:
    write_sharded(tmp_path, _tensors(), max_shard_bytes=200)
    index = _index(tmp_path)
    edit(index)
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    return tmp_path


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (
            lambda i: i["weight_map"].update({"fc.bias": "model-00009-of-00009.safetensors"}),
            FileNotFoundError,
            "model-00009-of-00009.safetensors",
        ),
        (
            lambda i: i["weight_map"].update({"ghost.weight": i["weight_map"]["fc.bias"]}),
            CheckpointError,
            "ghost",
        ),
        (lambda i: i["weight_map"].pop("fc.bias"), CheckpointError, "fc.bias"),
        (
            lambda i: i["weight_map"].update({"fc.bias": "../elsewhere.safetensors"}),
            CheckpointError,
            "elsewhere",
        ),
        (lambda i: i.update({"weight_map": ["fc.bias"]}), CheckpointError, "weight_map"),
    ],
    ids=["missing-file", "key-not-in-its-file", "tensor-not-in-index", "file-outside-folder", "malformed"],
)
def test_a_bad_index_is_refused_naming_the_key_or_file(tmp_path, edit, error, match):
    with pytest.raises(error, match=match):
        ShardedCheckpoint(_broken(tmp_path, edit))


def test_a_truncated_shard_is_refused_naming_the_file(tmp_path):
    write_sharded(tmp_path, _tensors(), max_shard_bytes=200)
    victim = tmp_path / "model-00002-of-00004.safetensors"
    victim.write_bytes(victim.read_bytes()[:-16])
    with pytest.raises(CheckpointError, match="model-00002-of-00004.safetensors"):
        ShardedCheckpoint(tmp_path)


def test_parse_size_reads_units_and_refuses_nonsense():
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("4KiB") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("five gigs")


# ----------------------------------------------------------------------------- conversion
def test_convert_sharded_round_trips_torch_to_flax_layout_bit_exactly(tmp_path):
    tensors = _tensors()
    torch_path = tmp_path / "one.safetensors"
    from converters.files import write_safetensors

    write_safetensors(torch_path, tensors, {"layout": "torch"})
    kinds = {"conv": "conv", "fc": "linear", "half": "linear"}
    report = convert_sharded(
        torch_path, tmp_path / "flax", layout="flax", layer_kinds=kinds, max_shard_bytes=150
    )
    assert sorted(report.loaded) == ["conv.bias", "conv.kernel", "fc.bias", "fc.kernel", "half.kernel"]
    flax = ShardedCheckpoint(tmp_path / "flax")
    assert flax.layout == "flax" and len(flax.files) > 1
    assert flax.shape("conv.kernel") == (3, 4, 8)  # (k, in, out)
    convert_sharded(tmp_path / "flax", tmp_path / "back", layout="torch", max_shard_bytes=10**6)
    back = ShardedCheckpoint(tmp_path / "back")
    for name, array in tensors.items():
        np.testing.assert_array_equal(back.get(name).view(np.uint8), array.view(np.uint8), err_msg=name)


def test_save_sharded_of_a_torch_model_equals_its_state_dict(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    save_sharded(model, tmp_path, max_shard_bytes=256)
    checkpoint = ShardedCheckpoint(tmp_path)
    assert len(checkpoint.files) > 1 and checkpoint.layer_kinds["1"] == "batch_norm"
    for key, tensor in model.state_dict().items():
        np.testing.assert_array_equal(checkpoint.get(key), tensor.numpy(), err_msg=key)


def test_the_removed_sharded_command_refuses_and_names_its_replacement(tmp_path):
    """0.2 removed ``python -m converters.sharded`` (a deprecated alias since 0.1): running it
    converts nothing, exits non-zero and names the command that replaced it."""
    torch.save({"fc.weight": torch.ones(4, 3)}, tmp_path / "w.pt")
    result = subprocess.run(
        [sys.executable, "-m", "converters.sharded", str(tmp_path / "w.pt"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode != 0
    assert "removed in 0.2" in result.stderr and "python -m converters convert" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_sharded_functions_are_public_names_of_converters_and_storage_needs_no_framework():
    import converters
    from converters.file_convert import convert_sharded as home
    from converters.sharded_flax import load_flax_sharded as flax_home
    from converters.sharded_save import save_sharded as save_home

    assert converters.convert_sharded is home and converters.load_flax_sharded is flax_home
    assert converters.save_sharded is save_home
    assert {"convert_sharded", "load_flax_sharded", "save_sharded"} <= set(converters.__all__)
    code = (
        "import sys, converters.sharded, converters.files; "
        "assert 'torch' not in sys.modules and 'jax' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ----------------------------------------------------------------------------- Flax, slice by slice
@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


RULES = [
    {"conv": (None, "data", "model"), "fc": ("model", None), "half": ("data", "model")},
    {"conv": (None, None, ("data", "model")), "fc": (("data", "model"), None), "half": ("model", "data")},
    {},  # everything replicated: one read serves all eight devices
]


@pytest.mark.parametrize("rules", RULES, ids=["megatron", "mixed", "replicated"])
@pytest.mark.parametrize("source_layout", ["torch", "flax"])
def test_each_device_gets_its_slice_of_the_converted_tensor(tmp_path, mesh, rules, source_layout):
    tensors = _tensors()
    write_sharded(tmp_path / "torch", tensors, {"layout": "torch"}, max_shard_bytes=200)
    source = tmp_path / "torch"
    if source_layout == "flax":
        kinds = {"conv": "conv", "fc": "linear", "half": "linear"}
        convert_sharded(source, tmp_path / "flax", layout="flax", layer_kinds=kinds, max_shard_bytes=200)
        source = tmp_path / "flax"
    model = nnx.eval_shape(lambda: MixedDtypeLayers(nnx.Rngs(0)))
    specs = shard_model(model, mesh, rules)
    report = load_flax_sharded(model, source, mesh=mesh)
    assert sorted(report.loaded) == sorted(
        tensors
        if source_layout == "torch"
        else ["conv.bias", "conv.kernel", "fc.bias", "fc.kernel", "half.kernel"]
    )
    for key, array in tensors.items():
        module, _, leaf = key.rpartition(".")
        kind = "conv" if module == "conv" else "linear"
        flax_leaf, expected = layout.torch_to_flax(kind, leaf, array)
        value = getattr(getattr(model, module), flax_leaf)[...]
        assert value.sharding.spec == specs[f"{module}.{flax_leaf}"]
        assert value.dtype == array.dtype
        for shard in value.addressable_shards:
            np.testing.assert_array_equal(
                np.asarray(shard.data).view(np.uint8), expected[shard.index].view(np.uint8), err_msg=key
            )


def test_a_torch_model_saved_sharded_loads_onto_a_mesh_and_computes_the_same(tmp_path, mesh):
    torch.manual_seed(0)
    torch_model = torch_models.MLP(in_features=8, hidden=16, out_features=4)
    save_sharded(torch_model, tmp_path, max_shard_bytes=300)
    assert len(ShardedCheckpoint(tmp_path).files) > 1
    twin = nnx.eval_shape(lambda: flax_models.MLP(8, 16, 4, rngs=nnx.Rngs(0)))  # no memory until loaded
    shard_model(twin, mesh, {"layer1": (None, "model"), "head": ("model", None)})
    load_flax_sharded(twin, tmp_path)
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 8)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(twin(jax.numpy.asarray(x)), expected, rtol=1e-5, atol=1e-5)
    assert twin.layer1.kernel[...].sharding.spec == PartitionSpec(None, "model")


def test_a_refused_flax_load_names_the_keys_and_leaves_the_model_unchanged(tmp_path, mesh):
    tensors = _tensors()
    tensors["fc.weight"] = tensors["fc.weight"][:, :7]  # mis-shaped
    del tensors["conv.bias"]  # missing
    tensors["extra.weight"] = np.zeros(2, np.float32)  # unexpected
    write_sharded(tmp_path, tensors, {"layout": "torch"}, max_shard_bytes=200)
    model = MixedDtypeLayers(nnx.Rngs(0))
    before = np.asarray(model.conv.kernel[...]).copy()
    with pytest.raises(ConversionError) as refused:
        load_flax_sharded(model, tmp_path)
    report = refused.value.report
    assert report.missing == ["conv.bias"] and report.unexpected == ["extra.weight"]
    assert report.mismatched == ["fc.weight: file (6, 7) vs model (6, 8)"]
    np.testing.assert_array_equal(np.asarray(model.conv.kernel[...]), before)


def test_dtype_differences_are_refused_when_strict_and_cast_otherwise(tmp_path):
    tensors = {k: v.astype(np.float32) for k, v in _tensors().items()}  # 'half' is bf16 in the model
    write_sharded(tmp_path, tensors, {"layout": "torch"})
    model = MixedDtypeLayers(nnx.Rngs(0))
    with pytest.raises(ConversionError, match="half.weight: dtype F32 in the source vs BF16 in the target"):
        load_flax_sharded(model, tmp_path)
    report = load_flax_sharded(model, tmp_path, strict=False)
    assert any("half.weight: cast" in note for note in report.notes)
    assert model.half.kernel[...].dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(
        np.asarray(model.half.kernel[...]), tensors["half.weight"].T.astype(ml_dtypes.bfloat16)
    )


def test_an_abstract_mesh_without_a_concrete_one_is_refused_clearly(tmp_path, mesh):
    fc = _tensors()
    write_sharded(tmp_path, {"weight": fc["fc.weight"], "bias": fc["fc.bias"]}, {"layout": "torch"})
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(
            lambda: nnx.Linear(
                8,
                6,
                kernel_init=nnx.with_partitioning(nnx.initializers.zeros, ("model", None)),
                rngs=nnx.Rngs(0),
            )
        )
    with pytest.raises(ValueError, match="pass mesh="):
        load_flax_sharded(model, tmp_path)
    assert isinstance(model.kernel.get_value(), jax.ShapeDtypeStruct)  # refused before any read
    assert load_flax_sharded(model, tmp_path, mesh=mesh).loaded == ["weight", "bias"]
    assert model.kernel[...].sharding.spec == PartitionSpec("model", None)
    np.testing.assert_array_equal(np.asarray(model.kernel[...]), fc["fc.weight"].T)


# ----------------------------------------------------------------------------- memory, 4 processes
_WORKER = textwrap.dedent(
    """
    import gc, json, os, re, sys

    process_id, processes, port, folder, layers, rows, cols = sys.argv[1:8]
    process_id, processes, layers, rows, cols = int(process_id), int(processes), int(layers), int(rows), int(cols)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // processes}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from flax import nnx

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=processes, process_id=process_id)
    from converters import load_flax_sharded
    from converters.files import ShardedCheckpoint
    from flax_impl.sharding import shard_model


    class Stack(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(cols, rows, rngs=rngs) for _ in range(layers)])


    def kib(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))


    def reset_peak():
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return kib("VmRSS")


    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = nnx.eval_shape(lambda: Stack(nnx.Rngs(0)))
    shard_model(model, mesh, {"layers.*": ("data", "model")})
    before = reset_peak()
    report = load_flax_sharded(model, folder)
    peak = (kib("VmHWM") - before) * 1024
    owned = sum(
        shard.data.nbytes
        for layer in model.layers
        for variable in (layer.kernel, layer.bias)
        for shard in variable[...].addressable_shards
    )

    checkpoint = ShardedCheckpoint(folder)
    before = reset_peak()
    whole = [checkpoint.get(name) for name in checkpoint.names]
    naive = (kib("VmHWM") - before) * 1024
    del whole

    values_ok = True
    for i, layer in enumerate(model.layers):
        expected = np.random.default_rng(i).standard_normal((rows, cols), dtype=np.float32).T
        for shard in layer.kernel[...].addressable_shards:
            values_ok &= bool(np.array_equal(np.asarray(shard.data), expected[shard.index]))
    print(json.dumps({"peak": peak, "owned": owned, "naive": naive, "values_ok": values_ok,
                      "loaded": len(report.loaded), "local_devices": jax.local_device_count()}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_each_process_loads_only_its_shards_peak_memory_far_below_the_checkpoint(tmp_path):
    layers, rows, cols, processes = 8, 2048, 1024, 4
    tensor_bytes = rows * cols * 4
    tensors = {}
    for i in range(layers):
        tensors[f"layers.{i}.weight"] = np.random.default_rng(i).standard_normal(
            (rows, cols), dtype=np.float32
        )
        tensors[f"layers.{i}.bias"] = np.zeros(rows, np.float32)
    folder = tmp_path / "checkpoint"
    write_sharded(folder, tensors, {"layout": "torch"}, max_shard_bytes=2 * tensor_bytes + 2 * rows * 4)
    whole = sum(a.nbytes for a in tensors.values())
    del tensors
    checkpoint = ShardedCheckpoint(folder)
    largest_file = max(f.stat().st_size for f in checkpoint.files)
    assert len(checkpoint.files) == 4 and largest_file < whole / 2

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    args = [str(port), str(folder), str(layers), str(rows), str(cols)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(p), str(processes), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for p in range(processes)
    ]
    results = []
    try:
        for worker in workers:
            out, err = worker.communicate(timeout=240)
            assert worker.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    slack = 8 * 2**20  # allocator and runtime noise
    for rank, result in enumerate(results):
        assert result["local_devices"] == 2 and result["loaded"] == 2 * layers
        assert result["values_ok"], f"process {rank} holds wrong values"
        # a quarter of every weight (split over 'data' and 'model'), half of every bias ('model')
        assert result["owned"] == layers * (tensor_bytes // 4 + rows * 4 // 2)
        assert result["peak"] <= result["owned"] + tensor_bytes + slack, (rank, result)
        assert result["peak"] < 0.6 * whole, (rank, result)
        # reading the same checkpoint whole costs all of it: the measurement sees memory
        assert result["naive"] >= 0.9 * whole, (rank, result)


def test_tensor_file_and_sharded_checkpoint_agree_on_a_single_file(tmp_path):
    from converters.files import write_safetensors

    write_safetensors(tmp_path / "one.safetensors", _tensors(), {"layout": "torch"})
    single, sharded = (
        TensorFile(tmp_path / "one.safetensors"),
        ShardedCheckpoint(tmp_path / "one.safetensors"),
    )
    assert single.names == sharded.names and single.metadata == sharded.metadata
    for name in single.names:
        assert single.spec(name) == sharded.spec(name)


def test_a_hugging_face_buffer_in_the_checkpoint_is_named_and_not_loaded(tmp_path):
    """transformers files hold buffers such as embeddings.position_ids that no Flax variable
    mirrors: the strict load names them and loads every parameter."""

    class Embedder(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.embeddings = nnx.Embed(6, 4, rngs=rngs)

    weight = np.arange(24, dtype=np.float32).reshape(6, 4)
    write_sharded(
        tmp_path,
        {
            "embeddings.weight": weight,
            "embeddings.position_ids": np.arange(6)[None],
            "extra.position_ids": np.arange(3),
        },
        {"layout": "torch"},
        max_shard_bytes=64,
    )
    model = Embedder(nnx.Rngs(0))
    report = load_flax_sharded(model, tmp_path)
    assert report.loaded == ["embeddings.weight"] and report.ok
    assert report.notes == [
        "embeddings.position_ids: buffer (I64) the target does not hold, not converted",
        "extra.position_ids: buffer (I64) the target does not hold, not converted",
    ]
    np.testing.assert_array_equal(np.asarray(model.embeddings.embedding[...]), weight)


def test_a_save_pretrained_folder_of_one_file_reads_as_a_checkpoint_in_every_subcommand(tmp_path):
    """transformers' save_pretrained writes a model under its shard size as one model.safetensors
    and no index: every subcommand opens the folder as the checkpoint, as a sharded one (inspect
    and merge shown)."""
    import transformers

    from tests.converters.test_cli import run_main
    from torch_impl import AdaptedModel, LoRA

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    model = transformers.BertModel(config)
    model.save_pretrained(tmp_path / "bert")
    assert sorted(os.listdir(tmp_path / "bert")) == ["config.json", "model.safetensors"]
    with (
        ShardedCheckpoint(tmp_path / "bert") as folder,
        TensorFile(tmp_path / "bert" / "model.safetensors") as f,
    ):
        assert folder.names == f.names and not folder.has_index
        assert all(np.array_equal(folder.get(n), f.get(n)) for n in f.names)
    inspected = run_main("inspect", tmp_path / "bert")
    assert inspected.returncode == 0 and "one file, no index" in inspected.stdout, inspected.stderr

    adapted = AdaptedModel(model, LoRA, target_layers="*.query", adapter_kwargs={"rank": 2})
    with torch.no_grad():
        for param in adapted.parameters():
            if param.requires_grad:
                param.add_(0.1)
    adapted.saver(str(tmp_path / "adapter.safetensors"))
    merged = run_main(
        "merge", tmp_path / "bert", tmp_path / "adapter.safetensors", tmp_path / "merged.safetensors"
    )
    assert merged.returncode == 0, merged.stderr
    key = "encoder.layer.0.attention.self.query.weight"
    with TensorFile(tmp_path / "merged.safetensors") as f:
        np.testing.assert_allclose(
            f.get(key),
            adapted.adapted_model.get_submodule(key[: -len(".weight")]).merged_weight().numpy(),
            atol=1e-6,
        )
