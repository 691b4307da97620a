"""Hostile inputs for the readers: valid files mutated, random headers, odd JSON."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
from hypothesis import strategies as st

from twinformat.dtypes import DTYPES

NAMES = st.sampled_from(["fc.weight", "fc.bias", "enc.0.kernel", "a", "__metadata__", "x" * 40, "é.ü", ""])
SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=3)

# numbers that break naive readers: negative, huge, beyond 64 bits, floats, booleans
ODD_INTS = st.one_of(
    st.integers(-3, 64),
    st.sampled_from([-1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]),
)
ODD_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    ODD_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
ODD_JSON = st.recursive(
    ODD_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def tensors(draw) -> dict[str, np.ndarray]:
    """1 to 4 small tensors of any supported dtype, random bytes."""
    out = {}
    for name in draw(
        st.lists(
            st.sampled_from(["fc.weight", "fc.bias", "enc.0.kernel", "norm.scale"]),
            min_size=1,
            max_size=4,
            unique=True,
        )
    ):
        dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        shape = tuple(draw(SHAPES))
        raw = draw(
            st.binary(
                min_size=int(np.prod(shape)) * dtype.itemsize, max_size=int(np.prod(shape)) * dtype.itemsize
            )
        )
        out[name] = np.frombuffer(raw, dtype=dtype).reshape(shape) if raw else np.zeros(shape, dtype)
    return out


def safetensors_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """A valid safetensors file, as :func:`converters.files.write_safetensors` writes it."""
    from converters.files import _header

    specs = {name: (_dtype_name(a), tuple(a.shape)) for name, a in arrays.items()}
    header, _ = _header(specs, metadata or {})
    body = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    return len(header).to_bytes(8, "little") + header + body


def _dtype_name(array: np.ndarray) -> str:
    from twinformat.dtypes import dtype_name

    return dtype_name(array.dtype)


@st.composite
def mutated(draw, content: bytes) -> bytes:
    """``content`` with 1 to 4 edits: bit flips, bytes set, inserted, deleted, a cut, or an
    8-byte little-endian integer written anywhere (a length or an offset gone wrong)."""
    data = bytearray(content)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "int"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "int":
            value = draw(ODD_INTS) % 2**64
            data[pos : pos + 8] = value.to_bytes(8, "little")
    return bytes(data)


@st.composite
def header_entries(draw) -> dict:
    """A header object of plausible and implausible entries (offsets overlapping, out of order,
    negative, huge; wrong types everywhere)."""
    header: dict = {}
    position = 0
    for name in draw(st.lists(NAMES, min_size=0, max_size=4, unique=True)):
        dtype = draw(
            st.one_of(st.sampled_from(sorted(DTYPES)), st.sampled_from(["F4", "f32", "", "C64"]), ODD_SCALARS)
        )
        shape = draw(st.one_of(SHAPES, st.lists(ODD_INTS, max_size=3), ODD_JSON))
        size = int(np.prod(shape)) * DTYPES[dtype].itemsize if dtype in DTYPES and _counts(shape) else 4
        offsets = draw(
            st.one_of(
                st.just([position, position + size]),  # honest
                st.just([0, size]),  # overlapping the first tensor
                st.lists(ODD_INTS, min_size=0, max_size=3),
                ODD_JSON,
            )
        )
        if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
            position = max(position, offsets[1]) if all(isinstance(o, int) for o in offsets) else position
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.booleans()):  # sometimes a key missing, or one too many
            entry.pop(draw(st.sampled_from(sorted(entry))))
        if draw(st.integers(0, 9)) == 0:
            entry["extra"] = draw(ODD_JSON)
        header[name] = draw(st.one_of(st.just(entry), ODD_JSON)) if draw(st.integers(0, 9)) == 0 else entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.one_of(
                st.dictionaries(
                    st.sampled_from(["layout", "layer_kinds", "adapter_kwargs", "format"]),
                    st.text(max_size=12),
                ),
                st.just({"layer_kinds": '{"fc": "linear"}', "layout": "flax"}),
                st.just({"layout": "tpu"}),
                ODD_JSON,
            )
        )
    return header


def _counts(shape) -> bool:
    return isinstance(shape, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 64 for n in shape
    )


@st.composite
def random_safetensors(draw) -> bytes:
    """A file built around a random header: its length field honest or not, data of any length."""
    kind = draw(st.sampled_from(["header", "deep", "json"]))
    if kind == "header":
        text = json.dumps(draw(header_entries())).encode()
    elif kind == "deep":
        depth = draw(st.integers(1, 200_000))
        text = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    else:
        text = json.dumps(draw(ODD_JSON)).encode()
    length = draw(st.one_of(st.just(len(text)), ODD_INTS.map(lambda n: n % 2**64)))
    data = draw(st.binary(max_size=256))
    return length.to_bytes(8, "little") + text + data


def torch_zip_bytes(state: dict) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def torch_legacy_bytes(state: dict) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


@st.composite
def rezipped(draw, content: bytes) -> bytes:
    """A torch zip whose records are edited (the pickle mutated, a storage cut short or grown) and
    re-zipped with correct CRCs, so the edit reaches torch's unpickler and storage reader."""
    source = zipfile.ZipFile(io.BytesIO(content))
    records = {info.filename: source.read(info) for info in source.infolist()}
    victim = draw(st.sampled_from(sorted(records)))
    records[victim] = draw(mutated(records[victim]))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as target:
        for name, data in records.items():
            target.writestr(name, data)
    return out.getvalue()
