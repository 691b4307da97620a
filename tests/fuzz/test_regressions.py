"""Inputs the fuzzers found (or that target a rule directly), kept as plain tests."""

from __future__ import annotations

import io
import json
import pickle
import tracemalloc

import numpy as np
import pytest
import torch

from converters.files import ShardedCheckpoint, TensorFile
from converters.sharded import write_sharded
from torch_impl.checkpoint import load_pickled_state_dict
from twinformat.errors import CheckpointError
from twinformat.format import read_safetensors_header

from .strategies import safetensors_bytes


def _file(tmp_path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    ("header", "data", "fragments"),
    [
        ({"a": _entry(), "b": _entry(offsets=(4, 12))}, bytes(12), ["'b'", "overlaps tensor 'a'"]),
        ({"a": _entry(offsets=(8, 16))}, bytes(16), ["'a'", "gap of 8 bytes"]),
        ({"a": _entry()}, bytes(12), ["4 bytes after the last tensor"]),
        ({"a": _entry(offsets=(0, 4))}, bytes(4), ["'a'", "hold 4 bytes", "needs 8"]),
        ({"a": _entry(shape=(-2,))}, bytes(8), ["'a'", "non-negative integers"]),
        ({"a": _entry(shape=(2**62, 2**62))}, bytes(8), ["'a'", "needs"]),  # no int64 overflow
        ({"a": _entry(dtype="F4")}, bytes(8), ["'a'", "unsupported dtype 'F4'"]),
        ({"a": _entry(offsets=(0, 2**70))}, bytes(8), ["'a'"]),
        ({"a": {**_entry(), "extra": 1}}, bytes(8), ["'a'", "malformed header entry"]),
        ({"__metadata__": {"layout": 3}, "a": _entry()}, bytes(8), ["'__metadata__'", "strings"]),
        (b'{"a": {}, "a": {}}', b"", ["duplicate key 'a'"]),
        (b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}", b"", ["nests too deeply"]),
        ({"a": _entry(shape=(4,), offsets=(0, 16))}, bytes(8), ["truncated", "'a'"]),
    ],
    ids=[
        "overlap",
        "gap",
        "trailing-bytes",
        "size-vs-shape",
        "negative-dim",
        "huge-shape",
        "unknown-dtype",
        "huge-offset",
        "extra-key",
        "metadata-not-strings",
        "duplicate-name",
        "deep-json",
        "truncated",
    ],
)
def test_a_malformed_header_is_refused_naming_the_file_and_the_tensor(tmp_path, header, data, fragments):
    path = _file(tmp_path, header, data)
    for read in (read_safetensors_header, TensorFile, ShardedCheckpoint):
        with pytest.raises(CheckpointError) as caught:
            read(path)
        for fragment in ("w.safetensors", *fragments):
            assert fragment in str(caught.value), (read, str(caught.value))


def test_a_claimed_header_length_beyond_the_file_is_never_read(tmp_path):
    path = _file(tmp_path, b"{}", length=2**63)
    tracemalloc.start()
    with pytest.raises(CheckpointError, match="does not fit a file of 10 bytes"):
        read_safetensors_header(path)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()


def test_zero_sized_tensors_and_an_empty_file_load(tmp_path):
    arrays = {"empty": np.zeros((0, 3), np.float32), "scalar": np.array(7, np.int64)}
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(arrays))
    with TensorFile(path) as f:
        assert f.get("empty").shape == (0, 3) and f.view("scalar").tolist() == 7
    (tmp_path / "none.safetensors").write_bytes(safetensors_bytes({}))
    assert TensorFile(tmp_path / "none.safetensors").names == []


def test_a_pickle_claiming_a_huge_string_is_refused_before_it_is_allocated(tmp_path):
    """Found by the fuzzer: pickle's BINBYTES opcode allocates its 4-byte claimed length (here
    67 MB, for a file of 105 bytes) before reading; the counted lengths are checked first."""
    path = tmp_path / "sd.ckpt"
    path.write_bytes(b"B\x00J\x03\x04" + bytes(100))
    tracemalloc.start()
    with pytest.raises(CheckpointError, match="sd.ckpt.*truncated"):
        load_pickled_state_dict(path)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()


def _legacy_file(path, numel: int) -> None:
    """A legacy (pre-zip) torch.save file whose one storage claims ``numel`` elements."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    buffer = io.BytesIO()
    for header in (
        MAGIC_NUMBER,
        PROTOCOL_VERSION,
        {
            "protocol_version": PROTOCOL_VERSION,
            "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4},
        },
    ):
        pickle.dump(header, buffer, protocol=2)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, (torch.UntypedStorage, torch.storage.TypedStorage)):
                return ("storage", torch.FloatStorage, "0", "cpu", numel, None)
            return None

    Pickler(buffer, protocol=2).dump({"w": torch.ones(4)})
    pickle.dump(["0"], buffer, protocol=2)
    buffer.write((4).to_bytes(8, "little") + np.ones(4, np.float32).tobytes())
    path.write_bytes(buffer.getvalue())


def test_a_legacy_pickle_whose_storage_claims_more_than_the_file_is_refused(tmp_path):
    _legacy_file(tmp_path / "ok.pt", 4)
    assert load_pickled_state_dict(tmp_path / "ok.pt")["w"].tolist() == [1.0] * 4
    _legacy_file(tmp_path / "big.pt", 10**11)  # torch would allocate 400 GB before reading
    with pytest.raises(CheckpointError, match="big.pt.*claim 100000000000 elements"):
        load_pickled_state_dict(tmp_path / "big.pt")


def test_an_index_naming_a_file_the_file_system_refuses_reads_as_missing(tmp_path):
    write_sharded(tmp_path, {"w": np.zeros(2, np.float32)})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["w"] = "é" * 300 + ".safetensors"  # longer than any file name may be
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="lacks the file"):
        ShardedCheckpoint(tmp_path)


@pytest.mark.parametrize(
    "index",
    [
        {"weight_map": {"w": "model-00001-of-00001.safetensors"}, "metadata": ["not", "an", "object"]},
        {"weight_map": {"w": "model-00001-of-00001.safetensors"}, "metadata": {"total_size": "12"}},
    ],
)
def test_odd_index_metadata_is_ignored_not_fatal(tmp_path, index):
    write_sharded(tmp_path, {"w": np.zeros(2, np.float32)})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    checkpoint = ShardedCheckpoint(tmp_path)
    assert checkpoint.names == ["w"] and checkpoint.index_total_size is None


def test_a_torch_archive_whose_record_claims_4_gb_is_refused_before_torch_allocates_it(tmp_path):
    """Found by the long fuzz run: a zip directory entry of 'archive/byteorder' grown to
    0xFFFFFFFF bytes made torch allocate 4 GB for a 1.8 kB file; the directory is checked first."""
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    content = bytearray(buffer.getvalue())
    central = content.rindex(b"PK\x01\x02")  # the last central-directory entry
    content[central + 20 : central + 28] = (0xFFFFFFFF).to_bytes(4, "little") * 2  # its two sizes
    (tmp_path / "sd.ckpt").write_bytes(bytes(content))
    with pytest.raises(CheckpointError, match="sd.ckpt.*claims 4294967295 bytes"):
        load_pickled_state_dict(tmp_path / "sd.ckpt")
