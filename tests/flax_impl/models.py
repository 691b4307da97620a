"""Moved to ``tests/zoo/flax_models.py``; kept only until tests/flax_impl/test_merge.py imports the zoo."""

from tests.zoo.flax_models import Conv2dBatchNormNet as ConvNet
from tests.zoo.flax_models import SeedMLP as Net

__all__ = ["ConvNet", "Net"]
