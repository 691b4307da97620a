"""Small model factories shared by the torch_impl tests.

Each factory builds a fresh model whose parameters depend only on the torch seed at call time,
and has a matching ``*_input`` function, so the same (factory, input) pair can be handed to
SpeechBrain's ``AdaptedModel`` and to ours.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

# The printed example of SpeechBrain's AdaptedModel docstring (and of the seed page), byte for byte.
SEED_REPR = """AdaptedModel(
  (adapted_model): Sequential(
    (layer1): LoRA(
      (pretrained_module): Linear(in_features=10, out_features=20, bias=True)
      (adapter_down_proj): Linear(in_features=10, out_features=2, bias=False)
      (adapter_up_proj): Linear(in_features=2, out_features=20, bias=False)
    )
    (layer2): Linear(in_features=20, out_features=20, bias=True)
    (layer3): LoRA(
      (pretrained_module): Linear(in_features=20, out_features=10, bias=True)
      (adapter_down_proj): Linear(in_features=20, out_features=2, bias=False)
      (adapter_up_proj): Linear(in_features=2, out_features=10, bias=False)
    )
  )
)"""


def seed_model() -> nn.Module:
    """The seed example's model: three Linears named layer1..3."""
    return nn.Sequential(
        OrderedDict(
            [("layer1", nn.Linear(10, 20)), ("layer2", nn.Linear(20, 20)), ("layer3", nn.Linear(20, 10))]
        )
    )


def mlp() -> nn.Module:
    """The seed's three-layer Sequential (named layer1..3) with an activation in between."""
    return nn.Sequential(
        OrderedDict(
            [
                ("layer1", nn.Linear(10, 20)),
                ("act", nn.ReLU()),
                ("layer2", nn.Linear(20, 20)),
                ("layer3", nn.Linear(20, 10)),
            ]
        )
    )


def mlp_input() -> torch.Tensor:
    return torch.randn(4, 3, 10)


class ConvNet(nn.Module):
    """Conv1d, Conv2d (one with reflect padding and stride 2) and Conv3d, a BatchNorm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 5, kernel_size=3, dilation=2, padding="same")
        self.conv2d = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2d_strided = nn.Conv2d(6, 6, kernel_size=(3, 2), stride=2, padding=1, padding_mode="reflect")
        self.conv3d = nn.Conv3d(1, 2, kernel_size=2, stride=(1, 2, 1), padding_mode="circular", padding=1)
        self.head = nn.Linear(5 + 6 + 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1d(x.flatten(2)).mean(-1)  # (B, 5)
        b = self.conv2d_strided(torch.relu(self.bn(self.conv2d(x)))).mean((-2, -1))  # (B, 6)
        c = self.conv3d(x.unsqueeze(1)).mean((2, 3, 4))  # (B, 2)
        return self.head(torch.cat([a, b, c], dim=-1))


def conv_net() -> nn.Module:
    return ConvNet()


def conv_net_input() -> torch.Tensor:
    return torch.randn(2, 3, 7, 6)


class AttentionModel(nn.Module):
    """A native ``nn.MultiheadAttention`` between two linears (its ``out_proj`` is a Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, num_heads=2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.ffn = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.ffn(self.norm(a + h))


def attention_model() -> nn.Module:
    return AttentionModel()


def attention_input() -> torch.Tensor:
    return torch.randn(2, 5, 8)


def transformer() -> nn.Module:
    """A two-layer ``nn.TransformerEncoder`` (batch_first, dropout 0: deterministic in train mode)."""
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2)


def transformer_input() -> torch.Tensor:
    return torch.randn(2, 5, 8)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.ffn = nn.ModuleDict({"up": nn.Linear(width, 2 * width), "down": nn.Linear(2 * width, width)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn["down"](torch.tanh(self.ffn["up"](self.norm(x))))


class NestedModel(nn.Module):
    """Blocks in a ModuleList inside a submodule, a parameter held by the root, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))
        self.encoder = nn.Module()
        self.encoder.blocks = nn.ModuleList([Block(6), Block(6)])
        self.encoder.out = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.encoder.blocks:
            x = block(x)
        return self.head(self.encoder.out(x) * self.scale)


def nested_model() -> nn.Module:
    return NestedModel()


def nested_input() -> torch.Tensor:
    return torch.randn(3, 4, 6)
