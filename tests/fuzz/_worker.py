"""The fuzzed readers, run in a worker process with a hard address-space limit.

Each call writes the given files into a fresh folder, runs one reader on them and classifies
the outcome: ``ok`` (it loaded, and what it loaded reads back consistently), ``ours`` (it
raised an :class:`twinformat.errors.AdapterError` or ``FileNotFoundError``), or ``other``
(anything else: a failure of the property). The peak of Python allocations during the call is
measured with ``tracemalloc``; allocations outside Python (torch, safetensors' Rust) are caught
by ``RLIMIT_AS``: the worker may grow by at most :data:`HEADROOM` bytes, so an allocation driven
by a size claimed in a file fails, and the failure says "allocate" or ``MemoryError``.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import traceback
import tracemalloc
from pathlib import Path
from typing import Any

HEADROOM = 1 << 30  # bytes the worker may grow by: far above any honest read of a fuzzed file


def init() -> None:
    """Import every reader once, then cap the address space."""
    import numpy  # noqa: F401
    import torch

    import converters.files  # noqa: F401
    import converters.peft  # noqa: F401
    import converters.sharded  # noqa: F401
    import torch_impl.checkpoint  # noqa: F401

    torch.set_num_threads(1)
    torch.zeros(4).clone()  # the intra-op machinery is set up before the cap
    size = _vm_size()
    resource.setrlimit(resource.RLIMIT_AS, (size + HEADROOM, resource.RLIM_INFINITY))
    tracemalloc.start()


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def run(reader: str, files: dict[str, bytes], target: str) -> tuple[str, str, int]:
    """Run ``reader`` on ``target`` (a path relative to a fresh folder holding ``files``);
    returns ``(outcome, message, peak bytes of Python allocations)``."""
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        for name, content in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(content)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            READERS[reader](folder / target)
            outcome, message = "ok", ""
        except BaseException as exc:  # classified below; the worker must survive anything
            from twinformat.errors import AdapterError

            if isinstance(exc, (AdapterError, FileNotFoundError)):
                outcome, message = "ours", str(exc)
            else:
                outcome, message = "other", "".join(traceback.format_exception(exc))[-4000:]
        peak = tracemalloc.get_traced_memory()[1] - base
        return outcome, message, peak
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _read_header(path: Path) -> None:
    from twinformat.format import read_safetensors_header

    read_safetensors_header(path)


def _read_all(checkpoint: Any) -> None:
    """Every tensor read whole and through the memory map, agreeing with its spec and each other."""

    with checkpoint:
        for name in checkpoint.names:
            dtype, shape = checkpoint.spec(name)
            whole, mapped = checkpoint.get(name), checkpoint.view(name)
            expected = checkpoint.dtype(name)
            assert whole.shape == shape == mapped.shape, (name, whole.shape, shape, mapped.shape)
            assert whole.dtype == expected and mapped.dtype.newbyteorder("=") == expected, name
            assert whole.tobytes() == mapped.tobytes(), name
            del mapped


def _tensor_file(path: Path) -> None:
    from converters.files import TensorFile

    _read_all(TensorFile(path))


def _sharded(path: Path) -> None:
    from converters.files import ShardedCheckpoint

    _read_all(ShardedCheckpoint(path))


def _pickle(path: Path) -> None:
    import torch

    from torch_impl.checkpoint import load_pickled_state_dict

    for name, tensor in load_pickled_state_dict(path).items():
        assert isinstance(name, str) and isinstance(tensor, torch.Tensor)
        tensor.clone()  # touch every byte the tensor claims


def _peft(path: Path) -> None:
    from converters.peft import read_peft_adapter

    read_peft_adapter(path)


READERS = {
    "header": _read_header,
    "tensor_file": _tensor_file,
    "sharded": _sharded,
    "pickle": _pickle,
    "peft": _peft,
}


def pid() -> int:
    return os.getpid()
