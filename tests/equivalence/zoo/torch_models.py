"""The PyTorch halves of the twin zoo; ``flax_models.py`` holds the other halves, in the same order.

Each class here has a twin of the same name there with the same dotted module names, so a
``state_dict`` converts onto it key for key and one list of patterns targets the same layers.
Inputs and outputs are laid out as each framework expects: channels first for PyTorch convs,
channels last for Flax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    """Linear -> GELU -> LayerNorm -> residual Linear -> ReLU -> Linear head. ``(B, in) -> (B, out)``."""

    def __init__(self, in_features: int = 6, hidden: int = 16, out_features: int = 3) -> None:
        super().__init__()
        self.layer1 = nn.Linear(in_features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.layer2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.layer1(x)))
        h = F.relu(self.layer2(h)) + h
        return self.head(h)


class CNN(nn.Module):
    """Two Conv2d (strided, dilated, asymmetric padding), two Conv1d over width, a Linear head.

    ``(B, 3, H, W) -> (B, n_classes)``: the 2-D features are averaged over height, the 1-D
    features over time.
    """

    def __init__(self, in_channels: int = 3, n_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, 8, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)
        )
        self.conv2 = nn.Conv2d(8, 8, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(8, 12, kernel_size=5, stride=2, padding=2)
        self.conv4 = nn.Conv1d(12, 12, kernel_size=3, padding=2, dilation=2)
        self.head = nn.Linear(12, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = h.mean(dim=2)  # (B, C, W)
        h = F.gelu(self.conv4(F.relu(self.conv3(h))))
        return self.head(h.mean(dim=-1))


class ConvNet(nn.Module):
    """One ConvNd of a given geometry and a Linear head: the space the conv property tests walk.

    ``(B, in_channels, *spatial) -> (B, 2)``.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
    ) -> None:
        super().__init__()
        conv_class = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
        self.conv = conv_class(
            in_channels,
            out_channels,
            kernel_size=tuple(kernel_size),
            stride=tuple(stride),
            padding=tuple(padding),
            dilation=tuple(dilation),
        )
        self.head = nn.Linear(out_channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        # A fixed, position-dependent weighting so a spatial misalignment cannot average out.
        ramp = torch.linspace(0.5, 1.5, h[0, 0].numel(), dtype=h.dtype).reshape(h.shape[2:])
        return self.head((h * ramp).flatten(2).mean(-1))


class SelfAttention(nn.Module):
    """Multi-head self-attention written from four Linear layers (no fused kernel)."""

    def __init__(self, d_model: int, nhead: int) -> None:
        super().__init__()
        self.nhead = nhead
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, d_model = x.shape
        heads = (batch, time, self.nhead, d_model // self.nhead)
        q, k, v = (proj(x).reshape(heads).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        scores = q @ k.transpose(-2, -1) * (d_model // self.nhead) ** -0.5
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, time, d_model)
        return self.out_proj(context)


class PositionalwiseFeedForward(nn.Module):
    """SpeechBrain's feed-forward block: ``ffn = Sequential(Linear, GELU, Linear)``."""

    def __init__(self, d_model: int, d_ffn: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ffn), nn.GELU(), nn.Linear(d_ffn, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + att(norm1(x))``, then ``x + pos_ffn(norm2(x))``."""

    def __init__(self, d_model: int, nhead: int, d_ffn: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_att = SelfAttention(d_model, nhead)
        self.norm2 = nn.LayerNorm(d_model)
        self.pos_ffn = PositionalwiseFeedForward(d_model, d_ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_att(self.norm1(x))
        return x + self.pos_ffn(self.norm2(x))


class ConvFrontEnd(nn.Module):
    """Two strided Conv1d over time with GELU: ``(B, T, F) -> (B, T/4, d_model)``."""

    def __init__(self, n_feats: int, d_model: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_feats, d_model, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)  # SpeechBrain's (batch, time, features) -> torch conv's channels first
        h = F.gelu(self.conv2(F.gelu(self.conv1(h))))
        return h.transpose(1, 2)


class SpeechEncoder(nn.Module):
    """A SpeechBrain-style encoder: conv front end, transformer blocks, LayerNorm, Linear output.

    ``(B, T, n_feats) -> (B, T/4, n_out)``.
    """

    def __init__(
        self,
        n_feats: int = 20,
        d_model: int = 32,
        nhead: int = 4,
        d_ffn: int = 64,
        num_layers: int = 2,
        n_out: int = 10,
    ) -> None:
        super().__init__()
        self.frontend = ConvFrontEnd(n_feats, d_model)
        self.layers = nn.ModuleList([TransformerBlock(d_model, nhead, d_ffn) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)
        self.output = nn.Linear(d_model, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.frontend(x)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))
