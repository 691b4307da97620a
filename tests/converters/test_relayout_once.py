"""Each tensor is re-laid out once on its way: planning reads shapes, and a kernel that is already
in the layout being written is never copied."""

from __future__ import annotations

import tracemalloc

import numpy as np
import torch
from flax import nnx

import converters
from converters.files import TensorFile

KERNEL_BYTES = 2048 * 2048 * 4  # a 2048 x 2048 float32 kernel: 16 MiB (the fixed overhead is ~2 MiB)


def _peak_bytes(save, model, path) -> int:
    tracemalloc.start()
    try:
        save(model, path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_flax_model_saved_in_flax_layout_copies_no_kernel(tmp_path):
    layer = nnx.Linear(2048, 2048, rngs=nnx.Rngs(0))
    peak = _peak_bytes(converters.save_flax_layout, layer, tmp_path / "f.safetensors")
    assert peak < KERNEL_BYTES // 4, f"{peak} bytes traced: the kernel was copied (or transposed) on its way"
    with TensorFile(tmp_path / "f.safetensors") as f:
        np.testing.assert_array_equal(f.get("kernel"), np.asarray(layer.kernel[...]))


def test_a_torch_model_saved_in_flax_layout_transposes_each_weight_once(tmp_path):
    layer = torch.nn.Linear(2048, 2048)
    peak = _peak_bytes(converters.save_flax_layout, layer, tmp_path / "t.safetensors")
    assert KERNEL_BYTES <= peak < 2 * KERNEL_BYTES, f"{peak} bytes traced for one 16 MiB transpose"
    with TensorFile(tmp_path / "t.safetensors") as f:
        np.testing.assert_array_equal(f.get("kernel"), layer.weight.detach().numpy().T)


def test_planning_a_conversion_reads_no_tensor_of_the_target(tmp_path):
    source, target = torch.nn.Linear(2048, 2048), nnx.Linear(2048, 2048, rngs=nnx.Rngs(0))
    tracemalloc.start()
    try:
        converters.torch_to_flax(source, target)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # one transposed copy of the source weight on its way in; the target is described by shapes
    assert peak < 2 * KERNEL_BYTES + KERNEL_BYTES // 2, peak
