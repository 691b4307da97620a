"""Files: both layouts, file-level conversion, pickles, streaming memory, bad files."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import converters
from converters.files import TensorFile, write_safetensors
from converters.views import ConversionError, UnknownLayerError
from tests.zoo import flax_models, torch_models
from tests.zoo.arrays import flax_arrays, randomize_flax, randomize_torch, same_bits, torch_arrays
from tests.zoo.layers import DTYPES, NUMPY_DTYPES, TORCH_DTYPES
from twinformat.errors import CheckpointError, LayoutError, NoMatchError


def _file_bits(path) -> dict[str, np.ndarray]:
    with TensorFile(path) as f:
        return {name: f.get(name) for name in f.names}


def _torch_net(dtype: str = "float32") -> torch_models.Conv1dNormNet:
    model = randomize_torch(torch_models.Conv1dNormNet())
    for param in model.parameters():
        param.data = param.data.to(TORCH_DTYPES[dtype])
    return model


def _no_leftovers(folder, expected: set[str]) -> bool:
    return {p.name for p in folder.iterdir()} == expected


def test_write_safetensors_stores_non_contiguous_views_correctly(tmp_path):
    kernel = np.arange(12, dtype=np.float32).reshape(3, 4).T  # a transposed view
    strided = np.arange(10, dtype=np.float16)[::2]
    write_safetensors(tmp_path / "w.safetensors", {"kernel": kernel, "strided": strided})
    loaded = load_file(str(tmp_path / "w.safetensors"))  # the reference reader
    np.testing.assert_array_equal(loaded["kernel"], kernel)
    np.testing.assert_array_equal(loaded["strided"], strided)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_layout_file_from_either_framework_loads_bit_exact_into_the_other(tmp_path, dtype):
    source = _torch_net(dtype)
    path = tmp_path / "torch.safetensors"
    converters.save_torch_layout(source, path, {"run": "7"})
    with TensorFile(path) as f:
        assert f.layout == "torch" and f.metadata["run"] == "7" and f.metadata["content"] == "base"
        assert json.loads(f.metadata["layer_kinds"])["gn"] == "group_norm"
        assert f.dtype("conv1.weight").name == dtype
    assert not same_bits(_file_bits(path), {k: v for k, v in _np_state(source).items()})

    flax_model = _flax_net(dtype)
    converters.torch_to_flax(path, flax_model)
    converters.save_torch_layout(flax_model, tmp_path / "from_flax.safetensors")
    back = _torch_net(dtype)
    randomize_torch(back, seed=9)
    converters.flax_to_torch(tmp_path / "from_flax.safetensors", back)
    assert not same_bits(torch_arrays(source), torch_arrays(back), skip=("num_batches_tracked",))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flax_layout_file_holds_flax_names_and_layouts_and_loads_into_either_twin(tmp_path, dtype):
    flax_model = randomize_flax(_flax_net(dtype), seed=3)
    path = tmp_path / "flax.safetensors"
    converters.save_flax_layout(flax_model, path)
    with TensorFile(path) as f:
        assert (
            f.layout == "flax" and f.shape("head.kernel") == (8, 4) and f.shape("conv1.kernel") == (3, 3, 8)
        )
        assert "bn.mean" in f.names and not any("num_batches" in n for n in f.names)
    assert not same_bits(_file_bits(path), flax_arrays(flax_model))

    torch_model = _torch_net(dtype)
    report = converters.load_flax_layout(torch_model, path)
    assert report.ok and "bn.running_var" in report.loaded
    again = _flax_net(dtype)
    converters.load_flax_layout(again, path)
    assert not same_bits(flax_arrays(flax_model), flax_arrays(again))

    converters.save_flax_layout(torch_model, tmp_path / "from_torch.safetensors")
    assert not same_bits(_file_bits(path), _file_bits(tmp_path / "from_torch.safetensors"))


def test_load_flax_layout_refuses_a_torch_layout_file(tmp_path):
    converters.save_torch_layout(_torch_net(), tmp_path / "t.safetensors")
    with pytest.raises(ConversionError, match="torch-layout file, not a Flax-layout one"):
        converters.load_flax_layout(torch_models.Conv1dNormNet(), tmp_path / "t.safetensors")


@pytest.mark.parametrize("dtype", DTYPES)
def test_convert_file_torch_to_flax_to_torch_is_bit_exact(tmp_path, dtype):
    source = _torch_net(dtype)
    converters.save_torch_layout(source, tmp_path / "t.safetensors")
    report = converters.convert_file(tmp_path / "t.safetensors", tmp_path / "f.safetensors", layout="flax")
    assert any("num_batches_tracked" in note for note in report.notes)
    converters.save_flax_layout(source, tmp_path / "direct.safetensors")
    assert not same_bits(_file_bits(tmp_path / "f.safetensors"), _file_bits(tmp_path / "direct.safetensors"))

    converters.convert_file(tmp_path / "f.safetensors", tmp_path / "back.safetensors", layout="torch")
    original = _file_bits(tmp_path / "t.safetensors")
    del original["bn.num_batches_tracked"]
    assert not same_bits(original, _file_bits(tmp_path / "back.safetensors"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_pickled_checkpoint_converts_to_safetensors_bit_exact(tmp_path, dtype):
    state = {
        "fc.weight": torch.randn(5, 3).to(TORCH_DTYPES[dtype]),
        "fc.bias": torch.randn(5).to(TORCH_DTYPES[dtype]),
    }
    torch.save(state, tmp_path / "model.ckpt")
    converters.convert_file(tmp_path / "model.ckpt", tmp_path / "model.safetensors", layout="torch")
    with TensorFile(tmp_path / "model.safetensors") as f:
        assert f.dtype("fc.weight").name == dtype
        assert not same_bits(
            {k: f.get(k).view(np.uint16) for k in f.names},
            {k: v.view(torch.uint16).numpy() for k, v in state.items()},
        )
    report = converters.convert_file(
        tmp_path / "model.ckpt", tmp_path / "flax.safetensors", layout="flax", layer_kinds={"fc": "linear"}
    )
    assert report.loaded == ["fc.kernel", "fc.bias"]
    kernel = TensorFile(tmp_path / "flax.safetensors").get("fc.kernel")
    assert kernel.dtype == NUMPY_DTYPES[dtype] and np.array_equal(
        kernel.view(np.uint16), state["fc.weight"].view(torch.uint16).numpy().T
    )


def test_convert_file_needs_layer_kinds_and_never_guesses_them_from_shapes(tmp_path):
    write_safetensors(tmp_path / "foreign.safetensors", {"fc.weight": np.ones((4, 4), np.float32)})
    with pytest.raises(UnknownLayerError, match="no layer kind is known for module.*'fc'"):
        converters.convert_file(tmp_path / "foreign.safetensors", tmp_path / "out.safetensors")
    assert _no_leftovers(tmp_path, {"foreign.safetensors"})
    with pytest.raises(ValueError, match="not one of"):
        converters.convert_file(
            tmp_path / "foreign.safetensors", tmp_path / "o.safetensors", layer_kinds={"fc": "dense"}
        )


def test_convert_file_renames_and_records_the_renamed_kinds(tmp_path):
    converters.save_torch_layout(_torch_net(), tmp_path / "t.safetensors")
    report = converters.convert_file(
        tmp_path / "t.safetensors", tmp_path / "f.safetensors", rename=[("conv*.*", "convs.*.*")]
    )
    assert "renamed conv1.weight -> convs.1.weight" in report.notes
    with TensorFile(tmp_path / "f.safetensors") as f:
        assert json.loads(f.metadata["layer_kinds"])["convs.1"] == "conv" and f.shape("convs.2.kernel") == (
            3,
            8,
            8,
        )


def test_convert_file_streams_one_tensor_at_a_time(tmp_path):
    # 8 tensors of 2 MiB: converting holds about one tensor and its transposed copy, not all 16 MiB.
    arrays = {f"layers.{i}.weight": np.full((512, 1024), i, np.float32) for i in range(8)}
    kinds = {f"layers.{i}": "linear" for i in range(8)}
    write_safetensors(tmp_path / "big.safetensors", arrays, {"layer_kinds": json.dumps(kinds)})
    tracemalloc.start()
    try:
        converters.convert_file(tmp_path / "big.safetensors", tmp_path / "flax.safetensors")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_tensor = 512 * 1024 * 4
    assert peak < 3 * one_tensor, f"peak {peak / 2**20:.1f} MiB"
    np.testing.assert_array_equal(
        TensorFile(tmp_path / "flax.safetensors").get("layers.5.kernel"), arrays["layers.5.weight"].T
    )


@pytest.mark.parametrize(
    ("content", "name", "error"),
    [
        (b"this is not a safetensors file at all", "model.safetensors", CheckpointError),
        (b"\x00\x01garbage", "model.ckpt", CheckpointError),
        (b"", "empty.safetensors", CheckpointError),
    ],
)
def test_bad_files_raise_errors_naming_the_file_and_leave_no_output(tmp_path, content, name, error):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=name):
        converters.convert_file(tmp_path / name, tmp_path / "out.safetensors")
    with pytest.raises(error, match=name):
        converters.torch_to_flax(tmp_path / name, nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    assert _no_leftovers(tmp_path, {name})


def test_truncated_file_is_refused_before_anything_is_written(tmp_path):
    source = _torch_net()
    converters.save_torch_layout(source, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated"):
        converters.convert_file(tmp_path / "cut.safetensors", tmp_path / "out.safetensors")
    target = _flax_net("float32")
    before = flax_arrays(target)
    with pytest.raises(CheckpointError, match="truncated"):
        converters.torch_to_flax(tmp_path / "cut.safetensors", target)
    assert not same_bits(before, flax_arrays(target))
    assert _no_leftovers(tmp_path, {"full.safetensors", "cut.safetensors"})


def test_failure_while_writing_keeps_the_previous_output_intact(tmp_path):
    write_safetensors(tmp_path / "out.safetensors", {"old": np.ones(3, np.float32)})

    def explode(name):
        raise RuntimeError(f"disk full while writing {name}")

    with pytest.raises(RuntimeError, match="disk full"):
        write_safetensors(tmp_path / "out.safetensors", None, specs={"new": ("F32", (2,))}, produce=explode)
    assert _file_bits(tmp_path / "out.safetensors")["old"].tolist() == [1.0, 1.0, 1.0]
    assert _no_leftovers(tmp_path, {"out.safetensors"})


def test_missing_source_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        converters.flax_to_torch(tmp_path / "nope.safetensors", torch_models.Conv1dNormNet())


def _flax_net(dtype: str) -> flax_models.Conv1dNormNet:
    model = flax_models.Conv1dNormNet(nnx.Rngs(0))
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        variable.set_value(variable.get_value().astype(NUMPY_DTYPES[dtype]))
    return model


def _np_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    from torch_impl.interchange import tensor_to_numpy

    return {k: tensor_to_numpy(v) for k, v in model.state_dict().items()}


def test_tensor_file_opens_a_sharded_folder_or_index_as_a_sharded_checkpoint(tmp_path):
    from converters.files import INDEX_NAME, ShardedCheckpoint
    from converters.sharded import write_sharded

    tensors = {f"l{i}.weight": np.full((2, 2), i, np.float32) for i in range(3)}
    write_sharded(tmp_path, tensors, max_shard_bytes=16)
    for path in (tmp_path, tmp_path / INDEX_NAME):
        with TensorFile(path) as f:
            assert isinstance(f, ShardedCheckpoint) and isinstance(f, TensorFile) and len(f.files) == 3
            assert f.view("l2.weight").tolist() == tensors["l2.weight"].tolist()


def test_convert_file_writes_shards_and_kinds_may_be_globs_that_must_match(tmp_path):
    from converters.files import ShardedCheckpoint

    src = tmp_path / "t.safetensors"
    write_safetensors(
        src, {"a.fc.weight": np.ones((2, 3), np.float32), "b.fc.weight": np.ones((4, 2), np.float32)}
    )
    report = converters.convert_file(
        src, tmp_path / "out", layer_kinds={"*.fc": "linear"}, max_shard_bytes=24
    )
    assert (
        report.loaded == ["a.fc.kernel", "b.fc.kernel"]
        and len(ShardedCheckpoint(tmp_path / "out").files) == 2
    )
    with pytest.raises(ValueError, match="folder"):
        converters.convert_file(
            src, tmp_path / "x.safetensors", layer_kinds={"*": "linear"}, max_shard_bytes=24
        )
    with pytest.raises(ValueError, match="max_shard_bytes"):
        converters.convert_file(src, tmp_path / "folder", layer_kinds={"*": "linear"})
    with pytest.raises(NoMatchError, match=r"'\*\.conv' matches no module"):
        converters.convert_file(src, tmp_path / "y.safetensors", layer_kinds={"*.conv": "conv"})
    with pytest.raises(LayoutError, match="'lineer' given for module 'a.fc'"):
        converters.convert_file(
            src, tmp_path / "y.safetensors", layer_kinds={"a.fc": "lineer", "*": "linear"}
        )
    # a glob never overrides what a file records: a disagreement is refused
    converters.convert_file(src, tmp_path / "f.safetensors", layer_kinds={"*": "linear"})
    with pytest.raises(ValueError, match="recorded as a linear layer"):
        converters.convert_file(
            tmp_path / "f.safetensors",
            tmp_path / "z.safetensors",
            layout="torch",
            layer_kinds={"*.fc": "conv"},
        )
