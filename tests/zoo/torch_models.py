"""The PyTorch models of the test zoo; ``flax_models.py`` holds the Flax twins, in the same order.

A class here with a namesake in ``flax_models.py`` is one half of a twin pair: same dotted
module names, so a ``state_dict`` converts onto the twin key for key and one list of patterns
targets the same layers; same function once the weights are converted. PyTorch convs take
channels first, Flax convs channels last. Each model's parameters depend only on the torch seed
at construction; an ``*_input()`` function beside a model draws a batch from the torch seed.

Twins (a namesake in ``flax_models.py``):

- :class:`SeedMLP`: SpeechBrain's seed example, ``layer1`` .. ``layer3`` (10 -> 20 -> 20 -> 10).
- :class:`MLP`: Linear, LayerNorm, residual Linear, Linear ``head`` (the equivalence MLP).
- :class:`CNN`: two Conv2d and two Conv1d of varied geometry and a head.
- :class:`ConvGeometryNet`: one ConvNd of any geometry and a head (the conv property space).
- :class:`SpeechEncoder` and its parts (:class:`SelfAttention`, :class:`PositionalwiseFeedForward`,
  :class:`TransformerBlock`, :class:`ConvFrontEnd`): a SpeechBrain-style encoder.
- :class:`TokenNet`: Embedding, Linear, LayerNorm, RMSNorm, Linear on token ids.
- :class:`Conv1dNormNet`: Conv1d, GroupNorm, BatchNorm1d, Conv1d, head on ``(B, C, L)``.

PyTorch only (no Flax twin: torch-only layers, or models built for ``torch_impl`` against SpeechBrain):

- :func:`seed_model`, :data:`SEED_REPR`: the seed's three plain Linears and their printed form.
- :class:`MixedConvNet`: Conv1d/2d/3d with ``same``, reflect and circular padding, a BatchNorm2d.
- :class:`AttentionModel`: a native ``nn.MultiheadAttention`` between Linears.
- :func:`transformer`: a two-layer ``nn.TransformerEncoder``.
- :class:`NestedModel` (of :class:`Block`): ModuleList inside a submodule, a root parameter.
- :class:`ChannelsLastConvBlock`: a Conv1d and a BatchNorm1d on ``(B, T, C)``.

BERT's PyTorch half is ``transformers.BertModel`` itself (``bert.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

# ============================================================================= twins


class SeedMLP(nn.Sequential):
    """SpeechBrain's seed example with a ReLU after ``layer1``: ``layer1``, ``act``, ``layer2``, ``layer3``.

    ``(..., 10) -> (..., 10)``. Twin of ``flax_models.SeedMLP``.
    """

    def __init__(self) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("layer1", nn.Linear(10, 20)),
                    ("act", nn.ReLU()),
                    ("layer2", nn.Linear(20, 20)),
                    ("layer3", nn.Linear(20, 10)),
                ]
            )
        )


def seed_mlp_input() -> torch.Tensor:
    return torch.randn(4, 3, 10)


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


class ConvGeometryNet(nn.Module):
    """One ConvNd (``conv``) of a given geometry and a Linear ``head``: the space conv tests walk.

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


class TokenNet(nn.Module):
    """Embedding -> Linear -> LayerNorm -> RMSNorm -> Linear, on token ids ``(B, T)`` below 11."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.rms = nn.RMSNorm(16, eps=1e-6)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.emb(tokens)))
        return self.fc2(self.rms(self.norm(h)))


class Conv1dNormNet(nn.Module):
    """Conv1d -> GroupNorm -> BatchNorm1d -> Conv1d -> mean -> Linear, on ``(B, 3, L)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.bn = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.gn(self.conv1(x))))
        return self.head(torch.relu(self.conv2(h)).mean(dim=2))


# ============================================================================= PyTorch only

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
    """The seed example's model as SpeechBrain prints it: a plain ``Sequential``, ``layer1`` .. ``layer3``."""
    return nn.Sequential(
        OrderedDict(
            [("layer1", nn.Linear(10, 20)), ("layer2", nn.Linear(20, 20)), ("layer3", nn.Linear(20, 10))]
        )
    )


class MixedConvNet(nn.Module):
    """Conv1d, Conv2d (one with reflect padding and stride 2) and Conv3d, a BatchNorm, a head.

    ``(B, 3, H, W) -> (B, 4)``; ``padding="same"``, reflect and circular padding have no Flax twin.
    """

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


def mixed_conv_net_input() -> torch.Tensor:
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


def attention_input() -> torch.Tensor:
    return torch.randn(2, 5, 8)


def transformer() -> nn.Module:
    """A two-layer ``nn.TransformerEncoder`` (batch_first, dropout 0: deterministic in train mode)."""
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2)


def transformer_input() -> torch.Tensor:
    return torch.randn(2, 5, 8)


class Block(nn.Module):
    """Pre-norm residual feed-forward whose Linears sit in a ``ModuleDict`` (``ffn.up``, ``ffn.down``)."""

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


def nested_input() -> torch.Tensor:
    return torch.randn(3, 4, 6)


class ChannelsLastConvBlock(nn.Module):
    """A channels-last wrapper around a Conv1d and a BatchNorm1d (nests the conv one level)."""

    def __init__(
        self, channels: int, out_channels: int, kernel: int, dilation: int, padding_mode: str
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(
            channels, out_channels, kernel, dilation=dilation, padding="same", padding_mode=padding_mode
        )
        self.norm = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.transpose(1, 2))).transpose(1, 2)
