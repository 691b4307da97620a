"""Moved to ``tests/zoo/torch_models.py``; kept only until tests/torch_impl/test_merge.py imports the zoo."""

from tests.zoo.torch_models import MixedConvNet as conv_net
from tests.zoo.torch_models import SeedMLP as mlp
from tests.zoo.torch_models import mixed_conv_net_input as conv_net_input
from tests.zoo.torch_models import seed_mlp_input as mlp_input

__all__ = ["conv_net", "conv_net_input", "mlp", "mlp_input"]
