"""Moved to ``tests/zoo`` (models in ``torch_models``/``flax_models``, per-kind layers and inputs in
``layers``, numpy helpers in ``arrays``); kept only until test_cli, test_files, test_merge and
test_peft import the zoo."""

from tests.zoo.arrays import (
    flax_arrays,
    flax_output,
    randomize_flax,
    randomize_torch,
    same_bits,
    torch_arrays,
    torch_output,
)
from tests.zoo.flax_models import Conv1dNormNet as FlaxConvNet
from tests.zoo.layers import DTYPES, NUMPY_DTYPES, TORCH_DTYPES, conv_batch
from tests.zoo.torch_models import Conv1dNormNet as TorchConvNet
from tests.zoo.torch_models import TokenNet as TorchTokenNet

__all__ = [
    "DTYPES",
    "NUMPY_DTYPES",
    "TORCH_DTYPES",
    "FlaxConvNet",
    "TorchConvNet",
    "TorchTokenNet",
    "conv_batch",
    "flax_arrays",
    "flax_output",
    "randomize_flax",
    "randomize_torch",
    "same_bits",
    "torch_arrays",
    "torch_output",
]
