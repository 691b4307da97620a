"""Property: every reader of outside bytes loads its input correctly or raises the library's own
error naming the file; never another exception, a hang, or an allocation larger than the file.

Readers: safetensors headers (``twinformat.format.read_safetensors_header``), whole files
(``converters.files.TensorFile``, every tensor read whole and memory-mapped), sharded
checkpoints (``converters.files.ShardedCheckpoint``: the index and its files), pickled state
dicts (``torch_impl.checkpoint.load_pickled_state_dict``, every tensor touched), PEFT adapter
directories (``converters.peft.read_peft_adapter``), and our metadata
(``twinformat.format.parse_metadata`` / ``layer_kinds_from_metadata``). Each runs in a worker
process (see :mod:`tests.fuzz._worker`: a hung call is a failure, and the address space is
capped so that a native allocation driven by a claimed size fails loudly). ``FUZZ_EXAMPLES``
sets the examples per reader (default 200; the long run used 10,000).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from twinformat.errors import AdapterError
from twinformat.format import layer_kinds_from_metadata, parse_metadata

from . import strategies as s

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Python allocations a reader may make beyond the file itself: decoding the header's JSON into
# objects costs a few times its bytes, reading each tensor once whole costs the data once more.
_FACTOR, _FIXED = 16, 2 << 20


def _check(worker, reader: str, files: dict[str, bytes], target: str, named: str) -> str:
    try:
        return _check_once(worker, reader, files, target, named)
    except AssertionError:
        _keep(reader, files)
        raise


def _keep(reader: str, files: dict[str, bytes]) -> None:
    """With ``FUZZ_KEEP=folder``, failing inputs are written there (one folder per input)."""
    keep = os.environ.get("FUZZ_KEEP")
    if keep:
        digest = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()[:12]
        for name, content in files.items():
            path = Path(keep) / f"{reader}-{digest}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)


def _check_once(worker, reader: str, files: dict[str, bytes], target: str, named: str) -> str:
    result = worker.run(reader, files, target)
    assert result is not None, f"{reader} hung or crashed the process on {files!r}"
    outcome, message, peak = result
    if currently_in_test_context():
        event(f"{reader}: {outcome}")  # --hypothesis-show-statistics shows both outcomes occur
    assert outcome != "other", f"{reader} raised a foreign error:\n{message}\nfiles: {files!r}"
    if outcome == "ours":
        assert named in message, f"{reader}'s error does not name {named!r}: {message}"
        assert "allocate" not in message and "MemoryError" not in message, message
    size = sum(len(content) for content in files.values())
    assert peak <= _FACTOR * size + _FIXED, f"{reader} allocated {peak} bytes for {size} bytes of input"
    return outcome


# ----------------------------------------------------------------------------- safetensors files
@st.composite
def safetensors_inputs(draw) -> bytes:
    how = draw(st.sampled_from(["mutated", "random", "valid"]))
    if how == "random":
        return draw(s.random_safetensors())
    metadata = draw(
        st.sampled_from([None, {"layout": "torch"}, {"layout": "flax", "layer_kinds": '{"fc": "linear"}'}])
    )
    content = s.safetensors_bytes(draw(s.tensors()), metadata)
    return content if how == "valid" else draw(s.mutated(content))


@settings(settings.get_profile("fuzz"))
@given(content=safetensors_inputs())
def test_safetensors_header_reader(worker, content):
    _check(worker, "header", {"w.safetensors": content}, "w.safetensors", "w.safetensors")


@settings(settings.get_profile("fuzz"))
@given(content=safetensors_inputs())
def test_tensor_file_reads_every_tensor_or_refuses(worker, content):
    _check(worker, "tensor_file", {"w.safetensors": content}, "w.safetensors", "w.safetensors")


def test_a_valid_file_loads(worker):
    """The property is not vacuous: honest files load."""
    arrays = {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc.bias": np.zeros(0, np.int8)}
    files = {"w.safetensors": s.safetensors_bytes(arrays, {"layout": "torch"})}
    for reader in ("header", "tensor_file", "sharded"):
        assert _check(worker, reader, files, "w.safetensors", "w.safetensors") == "ok"


# ----------------------------------------------------------------------------- sharded checkpoints
_INDEX = "model.safetensors.index.json"


def _sharded_files(arrays_per_file: list[dict[str, np.ndarray]]) -> tuple[dict[str, bytes], dict]:
    files, weight_map = {}, {}
    for i, arrays in enumerate(arrays_per_file):
        name = f"model-{i + 1:05d}-of-{len(arrays_per_file):05d}.safetensors"
        files[name] = s.safetensors_bytes(arrays, {"layout": "torch"})
        weight_map.update(dict.fromkeys(arrays, name))
    return files, {"metadata": {"total_size": 0}, "weight_map": weight_map}


@st.composite
def sharded_inputs(draw) -> dict[str, bytes]:
    first = draw(s.tensors())
    second = {f"second.{name}": array for name, array in draw(s.tensors()).items()}
    files, index = _sharded_files([first, second])
    how = draw(st.sampled_from(["index-json", "index-bytes", "shard-bytes", "odd-names", "valid"]))
    text = json.dumps(index).encode()
    if how == "index-json":
        edit = draw(st.sampled_from(["weight_map", "metadata", "whole", "entry"]))
        if edit == "whole":
            index = draw(s.ODD_JSON)
        elif edit == "entry":
            index["weight_map"][draw(s.NAMES)] = draw(s.ODD_JSON)
        else:
            index[edit] = draw(s.ODD_JSON)
        text = json.dumps(index).encode()
    elif how == "index-bytes":
        text = draw(s.mutated(text))
    elif how == "shard-bytes":
        victim = draw(st.sampled_from(sorted(files)))
        files[victim] = draw(s.mutated(files[victim]))
    elif how == "odd-names":
        name = draw(
            st.sampled_from(
                [
                    "../outside.safetensors",
                    "/etc/passwd",
                    "sub/x.safetensors",
                    "a\\b",
                    ".",
                    "..",
                    "",
                    "x\x00y",
                    "é" * 300,
                ]
            )
        )
        index["weight_map"][draw(st.sampled_from(sorted(index["weight_map"])))] = name
        text = json.dumps(index).encode()
    if draw(st.integers(0, 19)) == 0:
        depth = draw(st.integers(1, 100_000))
        text = b'{"weight_map":' + b"[" * depth + b"]" * depth + b"}"
    files[_INDEX] = text
    return files


@settings(settings.get_profile("fuzz"))
@given(files=sharded_inputs(), through_index=st.booleans())
def test_sharded_checkpoint_reads_every_tensor_or_refuses(worker, files, through_index):
    # errors name the index, the folder or the file at fault: all carry the folder's name "ckpt"
    files = {f"ckpt/{name}": content for name, content in files.items()}
    target = f"ckpt/{_INDEX}" if through_index else "ckpt"
    _check(worker, "sharded", files, target, "ckpt")


# ----------------------------------------------------------------------------- pickled state dicts
def _state(draw) -> dict:
    import torch

    arrays = draw(s.tensors())
    return {
        name: torch.from_numpy(np.ascontiguousarray(a).copy().view(np.uint8)) for name, a in arrays.items()
    }


@st.composite
def pickle_inputs(draw) -> bytes:
    state = _state(draw)
    how = draw(st.sampled_from(["zip-bytes", "zip-records", "legacy-bytes", "random", "valid"]))
    if how == "random":
        return draw(st.binary(max_size=512))
    if how.startswith("legacy"):
        return draw(s.mutated(s.torch_legacy_bytes(state)))
    content = s.torch_zip_bytes(state)
    if how == "zip-bytes":
        return draw(s.mutated(content))
    if how == "zip-records":
        return draw(s.rezipped(content))
    return content


@settings(settings.get_profile("fuzz"))
@given(content=pickle_inputs())
def test_pickled_state_dict_reader(worker, content):
    _check(worker, "pickle", {"sd.ckpt": content}, "sd.ckpt", "sd.ckpt")


# ----------------------------------------------------------------------------- PEFT adapter directories
_GOOD_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["head"], "bias": "none"}


@st.composite
def peft_inputs(draw) -> dict[str, bytes]:
    a = np.ones((2, 8), np.float32)
    b = np.ones((4, 2), np.float32)
    weights = s.safetensors_bytes(
        {"base_model.model.head.lora_A.weight": a, "base_model.model.head.lora_B.weight": b}, {"format": "pt"}
    )
    config = dict(_GOOD_CONFIG)
    how = draw(st.sampled_from(["field", "whole", "bytes", "weights", "valid"]))
    text = json.dumps(config).encode()
    if how == "field":
        key = draw(
            st.sampled_from(
                [
                    "r",
                    "lora_alpha",
                    "target_modules",
                    "rank_pattern",
                    "alpha_pattern",
                    "use_dora",
                    "use_rslora",
                    "bias",
                    "peft_type",
                    "modules_to_save",
                    "fan_in_fan_out",
                ]
            )
        )
        config[key] = draw(s.ODD_JSON)
        text = json.dumps(config).encode()
    elif how == "whole":
        text = json.dumps(draw(s.ODD_JSON)).encode()
    elif how == "bytes":
        text = draw(s.mutated(text))
    elif how == "weights":
        weights = draw(s.mutated(weights))
    if draw(st.integers(0, 19)) == 0:
        depth = draw(st.integers(1, 100_000))
        text = b'{"r":' + b"[" * depth + b"]" * depth + b"}"
    return {"adapter_config.json": text, "adapter_model.safetensors": weights}


@settings(settings.get_profile("fuzz"))
@given(files=peft_inputs())
def test_peft_adapter_reader(worker, files):
    files = {f"peft/{name}": content for name, content in files.items()}
    _check(worker, "peft", files, "peft", "peft")


# ----------------------------------------------------------------------------- our metadata
@st.composite
def metadata_values(draw) -> dict[str, str]:
    def value(draw_json: bool) -> str:
        if draw_json:
            return json.dumps(draw(s.ODD_JSON))
        return draw(st.one_of(st.text(max_size=20), st.just("[" * 100_000), st.just('{"a":' * 50_000)))

    keys = ["adapter_kwargs", "target_layers", "unfrozen_layers", "layer_kinds", "layout", "other"]
    return {key: value(draw(st.booleans())) for key in draw(st.lists(st.sampled_from(keys), unique=True))}


@settings(settings.get_profile("fuzz"))
@given(metadata=metadata_values())
def test_metadata_parsing(metadata):
    assert set(parse_metadata(metadata)) == set(metadata)  # never raises: foreign values pass through
    try:
        kinds = layer_kinds_from_metadata(metadata, where="'m.safetensors'")
    except AdapterError as exc:
        assert "'m.safetensors'" in str(exc)
    else:
        assert isinstance(kinds, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in kinds.items()
        )
