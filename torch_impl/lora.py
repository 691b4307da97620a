"""LoRA on an ``nn.Linear``, ``nn.Conv1d/2d/3d`` or ``nn.Embedding`` (SpeechBrain's ``LoRA``,
plus PEFT's options: dropout, rsLoRA, DoRA), with exact merging.

Plain LoRA (the SpeechBrain drop-in) keeps SpeechBrain's positional signature, defaults,
attribute order, parameter names and seed-for-seed initialisation; the options are keyword-only
and follow PEFT's ``peft.tuners.lora`` so the same weights give the same numbers:

- ``use_rslora``: ``scaling = alpha / sqrt(rank)`` instead of ``alpha / rank``;
- ``dropout``: on the input of the low-rank branch only, in training mode only
  (``up(down(dropout(x))) * scaling``); PEFT ignores it on embeddings, and so do we;
- ``use_dora``: a trainable magnitude ``adapter_magnitude`` (PEFT's ``lora_magnitude_vector``)
  per output feature, initialised to the norm of the pretrained weight's rows; output
  ``m / ||W + s up down|| * (W x + s up(down(x))) + b`` with the norm detached from the graph.

The wrapper exposes the wrapped layer's attributes read-only (``in_features``, ``stride``,
``padding``, ``bias``, ...), and ``weight`` is the *effective* weight ``W + scaling * up @ down``
(composed for convs, DoRA's too), differentiable, so code that computes with ``layer.weight``
(transformers' WavLM attention, ``F.multi_head_attention_forward``) keeps the adapter.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from twinformat.adapters import LORA, AdapterKind
from twinformat.errors import AdapterError, AdapterInsertionError, MergeError

from . import fused
from ._factors import check_size, factory_kwargs

__all__ = ["BASE_ADAPTER", "DEFAULT_ADAPTER", "LoRA", "LoRABranch"]

#: PEFT's names: the adapter the constructor builds, and "no adapter" in a mixed batch.
DEFAULT_ADAPTER = "default"
BASE_ADAPTER = "__base__"

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Never read from the wrapped layer: ``weight`` is the effective weight (a property that must
# not fall back silently to the base weight), the rest are the wrapper's own.
_NOT_FORWARDED = frozenset({"weight", "pretrained_module", "adapter_down_proj", "adapter_up_proj"})


class LoRA(nn.Module):
    """LoRA adapter: 'LoRA: Low-Rank Adaptation of Large Language Models'
    (https://arxiv.org/abs/2106.09685).

    Output: ``pretrained_module(x) + adapter_up_proj(adapter_down_proj(x)) * scaling`` with
    ``scaling = alpha / rank``. The up projection starts at zero, so a fresh adapter changes
    nothing. For ``nn.Conv1d/2d/3d`` the down projection copies the pretrained conv's geometry
    (kernel, stride, padding, dilation, padding_mode) and the up projection is pointwise. For
    ``nn.Embedding`` the down projection is an ``nn.Embedding(num, rank)`` looked up like the
    pretrained one (PEFT's ``lora_embedding_A`` transposed) and the up projection a
    ``Linear(rank, dim)`` (``lora_embedding_B``).

    Arguments
    ---------
    target_module: nn.Linear, nn.Conv1d/2d/3d or nn.Embedding
        The pretrained layer this adapter wraps; it is frozen.
    rank: int
        Rank of the update (at least 1).
    alpha: float
        Scaling numerator: ``scaling = alpha / rank``.
    dropout: float
        Keyword-only. Dropout probability on the low-rank branch's input, training only
        (PEFT's ``lora_dropout``). Default 0.
    use_rslora: bool
        Keyword-only. Rank-stabilised scaling ``alpha / sqrt(rank)`` (PEFT's ``use_rslora``).
    use_dora: bool
        Keyword-only. Weight-decomposed LoRA (PEFT's ``use_dora``), Linear and convs only.

    Example
    -------
    >>> x = torch.rand((8, 60, 64))
    >>> base_linear = nn.Linear(64, 64)
    >>> adapt = LoRA(base_linear, 64, 4)
    >>> output = adapt(x)
    >>> output.shape
    torch.Size([8, 60, 64])

    >>> x = torch.rand((8, 16, 100))
    >>> base_conv = nn.Conv1d(16, 32, kernel_size=3, stride=2)
    >>> adapt = LoRA(base_conv, rank=4)
    >>> adapt(x).shape == base_conv(x).shape
    True

    >>> dora = LoRA(nn.Linear(6, 5), rank=2, use_dora=True, use_rslora=True, dropout=0.1)
    >>> dora.adapter_magnitude.shape, dora.in_features, round(dora.scaling, 4)
    (torch.Size([5]), 6, 0.7071)
    >>> torch.equal(dora.weight, dora.pretrained_module.weight)  # a fresh adapter changes nothing
    True
    """

    adapter_kind: ClassVar[AdapterKind] = LORA
    pretrained_module: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Embedding
    adapter_down_proj: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Embedding
    adapter_up_proj: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d

    def __init__(
        self,
        target_module: nn.Module,
        rank: int = 16,
        alpha: float = 1.0,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(target_module, (nn.Linear, *_CONV_TYPES, nn.Embedding)):
            raise ValueError(
                "LoRA supports nn.Linear, nn.Conv1d/2d/3d and nn.Embedding layers, "
                f"but instead got {type(target_module)}."
            )
        check_size("rank", rank)
        _check_options(dropout, use_rslora, use_dora)
        if isinstance(target_module, _CONV_TYPES) and target_module.groups != 1:
            raise ValueError(
                "LoRA does not support convolutions with groups != 1, "
                f"got groups={target_module.groups} for {target_module}."
            )
        if isinstance(target_module, nn.Embedding):
            _check_embedding(target_module, use_dora)
        factory = factory_kwargs(target_module)

        self.pretrained_module = target_module
        for param in self.pretrained_module.parameters():
            param.requires_grad = False

        if isinstance(target_module, _CONV_TYPES):
            # (``Any``: torch types each class's kernel_size etc. per dimension, tuple[int, int], while
            # the conv's own attributes are tuple[int, ...]; the same conv class takes them back.)
            conv_cls: Any = type(target_module)
            self.adapter_down_proj = conv_cls(
                target_module.in_channels,
                rank,
                kernel_size=target_module.kernel_size,
                stride=target_module.stride,
                padding=target_module.padding,
                dilation=target_module.dilation,
                padding_mode=target_module.padding_mode,
                bias=False,
                **factory,
            )
            self.adapter_up_proj = conv_cls(
                rank, target_module.out_channels, kernel_size=1, bias=False, **factory
            )
        elif isinstance(target_module, nn.Embedding):
            # Normal init for the looked-up factor, zero for the up one (a fresh adapter changes
            # nothing); the padding row starts at zero and gets no gradient, as PEFT's does.
            self.adapter_down_proj = nn.Embedding(
                target_module.num_embeddings, rank, padding_idx=target_module.padding_idx, **factory
            )
            self.adapter_up_proj = nn.Linear(rank, target_module.embedding_dim, bias=False, **factory)
        else:
            output_size, input_size = target_module.weight.shape
            self.adapter_down_proj = nn.Linear(input_size, rank, bias=False, **factory)
            self.adapter_up_proj = nn.Linear(rank, output_size, bias=False, **factory)

        with torch.no_grad():
            self.adapter_up_proj.weight.zero_()
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.merged = False
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.use_dora = bool(use_dora)
        self._merged_norm: torch.Tensor | None = None
        if use_dora:
            with torch.no_grad():
                norm = _row_norm(target_module.weight.detach().float())
            self.adapter_magnitude = nn.Parameter(norm.to(**factory))

    # --- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the pretrained layer plus the scaled low-rank update (DoRA: rescaled rows).

        A frozen ``nn.Linear`` without DoRA takes the fused path
        (:func:`torch_impl.fused.lora_linear`): the same function with fewer passes over ``x`` and
        no weight gradient for the frozen layer (with active dropout, its low-rank branch reads
        ``F.dropout(x)``, the plain formula's mask). Convs, embeddings, hooked or unfrozen layers
        take the plain formula.
        """
        if self.merged:
            return self.pretrained_module(x)
        if self._is_multi():
            return self._multi_forward(x)
        pretrained, down, up = self.pretrained_module, self.adapter_down_proj, self.adapter_up_proj
        if isinstance(pretrained, nn.Embedding):
            return pretrained(x) + up(self._embed(x)) * self.scaling
        dropping = self.training and self.dropout > 0.0
        if self.use_dora:
            return self._dora_forward(x, dropping)
        if isinstance(pretrained, nn.Linear) and fused.can_fuse_linear(pretrained, down, up):
            # With active dropout the low-rank branch reads F.dropout(x), drawn as the plain
            # formula draws it (the same mask from the same generator state).
            x_low = F.dropout(x, self.dropout, training=True) if dropping else None
            return fused.lora_linear(
                x, pretrained.weight, pretrained.bias, down.weight, up.weight, self.scaling, x_low
            )
        x_pretrained = pretrained(x)
        x_lora = up(down(F.dropout(x, self.dropout, training=True) if dropping else x)) * self.scaling
        return x_pretrained + x_lora

    # --- named adapters (PEFT's multi-adapter layers) ---------------------------------------
    # The "default" adapter keeps its factors where a one-adapter LoRA has them (same keys, same
    # forward); further adapters are LoRABranch modules in ``named_adapters``, created only when
    # one is added. ``_active`` (names) and ``_sample_names`` (one name per sample) are plain
    # attributes set by AdaptedModel.set_adapter / forward(adapter_names=...).
    _active: tuple[str, ...]

    def adapter_names(self) -> list[str]:
        """The adapters this layer holds: ``'default'`` (unless the layer was wrapped for another
        adapter only) and the named ones, in the order they were added."""
        named = (
            list(cast(nn.ModuleDict, self._modules["named_adapters"]))
            if "named_adapters" in self._modules
            else []
        )
        return ([DEFAULT_ADAPTER] if self.__dict__.get("_has_default", True) else []) + named

    def add_named_adapter(self, name: str, branch: LoRABranch) -> None:
        """Hold ``branch`` as the adapter ``name`` (inactive until :meth:`set_active`)."""
        if name in self.adapter_names():
            raise AdapterInsertionError(f"this LoRA layer already holds an adapter named {name!r}")
        if "named_adapters" not in self._modules:
            self.named_adapters = nn.ModuleDict()
        self.named_adapters[name] = branch

    def remove_named_adapter(self, name: str) -> None:
        """Drop the adapter ``name`` (not the default, whose parameters are the layer's own)."""
        del self.named_adapters[name]
        if not len(self.named_adapters):  # back to a one-adapter LoRA: same repr and modules
            del self.named_adapters
        if self.__dict__.get("_active") is not None:
            self._active = tuple(n for n in self._active if n != name)

    def keep_only_named(self, name: str) -> None:
        """Turn this fresh LoRA's own factors into the named adapter ``name``: the layer is
        wrapped for that adapter only, so the default's keys (``adapter_down_proj``, ...) must not
        appear in its ``state_dict``."""
        branch = LoRABranch(self)
        for attribute in ("adapter_down_proj", "adapter_up_proj", "adapter_magnitude"):
            if attribute in self._modules or attribute in self._parameters:
                delattr(self, attribute)
        self._has_default = False
        self._active = ()
        self.add_named_adapter(name, branch)

    def set_active(self, names: tuple[str, ...]) -> None:
        """Activate the adapters ``names`` this layer holds (others it lacks are skipped: a layer
        that one of several adapters does not target computes the others)."""
        held = self.adapter_names()
        self._active = tuple(name for name in names if name in held)

    def set_sample_adapters(
        self,
        names: list[str] | None,
        *,
        mask: torch.Tensor | None = None,
        columns: dict[str, int] | None = None,
        shared: dict[Any, torch.Tensor] | None = None,
    ) -> None:
        """One adapter per sample of the next batches, as names (``'__base__'``: none) and/or as
        ``mask`` (``(batch, adapters)``, 0/1) with the column of each adapter (``columns``);
        ``shared`` caches what layers of the same adapters can share within one forward.
        ``names=None`` and ``mask=None``: stop."""
        self._sample_names = names
        self._sample_mask = (
            None if mask is None else (mask, dict(columns or {}), {} if shared is None else shared)
        )

    def branch(self, name: str) -> LoRA | LoRABranch:
        """The module holding the factors of adapter ``name`` (``self`` for the default)."""
        if name == DEFAULT_ADAPTER and self.__dict__.get("_has_default", True):
            return self
        return cast(LoRABranch, self.named_adapters[name])

    def _is_multi(self) -> bool:
        """Whether the forward differs from a one-adapter LoRA's: another active set than the
        default alone, or one adapter per sample. (The default alone takes the one-adapter path,
        fused kernels included, so its numbers are the same bits whatever else the layer holds.)"""
        d = self.__dict__
        return (
            d.get("_active", (DEFAULT_ADAPTER,)) != (DEFAULT_ADAPTER,)
            or d.get("_sample_names") is not None
            or d.get("_sample_mask") is not None
        )

    def _multi_forward(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's order: the base layer, then each active adapter's term added in turn; with one
        name per sample, each adapter's term added to its own samples (PEFT's mixed batch)."""
        result = self.pretrained_module(x)
        samples = self.__dict__.get("_sample_names")
        sample_mask = self.__dict__.get("_sample_mask")
        rows = None if sample_mask is None else sample_mask[0].shape[0]
        rows = len(samples) if rows is None and samples is not None else rows
        if rows is not None and x.shape[0] != rows:
            # generate() repeats each prompt for beams / returned sequences (repeat_interleave):
            # each copy keeps its prompt's adapter, as PEFT repeats the names.
            copies = x.shape[0] // rows
            if copies * rows != x.shape[0]:
                raise AdapterError(
                    f"{type(self).__name__}: a batch of {x.shape[0]} samples got {rows} per-sample adapter "
                    "choices: give one adapter name per sample (adapter_names) or per prompt of generate()"
                )
            if samples is not None:
                samples = [name for name in samples for _ in range(copies)]
            if sample_mask is not None:
                mask, columns, shared = sample_mask
                expanded = shared.get(("rows", x.shape[0]))  # once per call, not per layer
                if expanded is None:
                    expanded = shared[("rows", x.shape[0])] = mask.repeat_interleave(copies, dim=0)
                sample_mask = (expanded, columns, shared)
        if sample_mask is not None and self._can_mix(sample_mask[1]):
            return result + self._mixed_delta(x, *sample_mask).to(result.dtype)
        if samples is None:
            for name in self.__dict__.get("_active", (DEFAULT_ADAPTER,)):
                result = result + self._delta(self.branch(name), x)
            return result
        held = self.adapter_names()
        for name in dict.fromkeys(samples):
            if name not in held:
                continue
            index = [i for i, n in enumerate(samples) if n == name]
            result[index] += self._delta(self.branch(name), x[index]).to(result.dtype)
        return result

    def _can_mix(self, columns: dict[str, int]) -> bool:
        """Whether a mixed batch can take the one-GEMM-pair path: a linear layer, every adapter it
        holds plain LoRA (no DoRA, no active dropout) known to the mask."""
        if not isinstance(self.pretrained_module, nn.Linear) or self._is_conv:
            return False
        for name in self.adapter_names():
            branch = self.branch(name)
            if name not in columns or branch.use_dora or (self.training and branch.dropout > 0.0):
                return False
        return True

    def _mixed_delta(
        self, x: torch.Tensor, mask: torch.Tensor, columns: dict[str, int], shared: dict[Any, torch.Tensor]
    ) -> torch.Tensor:
        """Every sample's own adapter term in one adapter's kernels: the down factors of all the
        adapters this layer holds concatenated (``R`` = the sum of their ranks) in one GEMM, each
        sample's columns weighted by its mask entry times that adapter's scaling (0 for the
        others: an exact zero), then the up factors concatenated in a second GEMM. PEFT gathers
        each adapter's samples and runs two GEMMs per adapter instead; the sums are the same
        within rounding (the scaling multiplies the rank-R activations instead of the output).
        No host synchronisation and no tensor made from Python data, so it can be captured in a
        CUDA graph once and replayed for any mask."""
        names = self.adapter_names()
        branches = [self.branch(name) for name in names]
        entries = tuple(
            (columns[n], b.adapter_down_proj.weight.shape[0], float(b.scaling))
            for n, b in zip(names, branches, strict=True)
        )
        key = (mask.shape[0], entries)  # the rows too: an encoder's and its beams' decoder's differ
        weights = shared.get(key)
        if weights is None:  # (batch, R): one expand per adapter, shared by layers alike
            weights = torch.cat([(mask[:, c : c + 1] * s).expand(-1, r) for c, r, s in entries], dim=1)
            shared[key] = weights
        down = torch.cat([b.adapter_down_proj.weight for b in branches])
        up = torch.cat([b.adapter_up_proj.weight for b in branches], dim=1)
        h = F.linear(x, down)
        h = h * weights.view(weights.shape[0], *([1] * (h.dim() - 2)), weights.shape[1]).to(h.dtype)
        return F.linear(h, up)

    def _delta(self, branch: LoRA | LoRABranch, x: torch.Tensor) -> torch.Tensor:
        """What adapter ``branch`` adds to the base layer's output for ``x`` (PEFT's per-adapter
        term: ``up(down(dropout(x))) * scaling``; DoRA's ``(m/||W + s B A|| - 1) W x' + m/||.|| s B A x'``)."""
        pretrained = self.pretrained_module
        down, up = branch.adapter_down_proj, branch.adapter_up_proj
        if isinstance(pretrained, nn.Embedding):
            return up(self._embed(x, down.weight)) * branch.scaling
        dropping = self.training and branch.dropout > 0.0
        x = F.dropout(x, branch.dropout, training=True) if dropping else x
        lora = up(down(x))
        if not branch.use_dora:
            return lora * branch.scaling
        weight = pretrained.weight
        scale = branch.adapter_magnitude / self._dora_norm(weight, branch)
        base = self._base_without_bias(x, weight)
        scale = scale.view((-1,) + (1,) * (base.dim() - 2)) if self._is_conv else scale
        return (scale - 1) * base + scale * lora * branch.scaling

    def _embed(self, x: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """The down factor (``table``, by default the default adapter's) looked up as the
        pretrained embedding looks up its rows (PEFT's ``_embed``: same padding index, gradient
        scaling and sparsity)."""
        base = self.pretrained_module
        assert isinstance(base, nn.Embedding)  # only called for a wrapped embedding
        return F.embedding(
            x,
            self.adapter_down_proj.weight if table is None else table,
            padding_idx=base.padding_idx,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )

    def _dora_forward(self, x: torch.Tensor, dropping: bool) -> torch.Tensor:
        pretrained, down, up = self.pretrained_module, self.adapter_down_proj, self.adapter_up_proj
        assert not isinstance(pretrained, nn.Embedding)  # DoRA is refused on embeddings at construction
        weight, bias = pretrained.weight, pretrained.bias
        scale = self.adapter_magnitude / self._dora_norm(weight)  # (out,); the norm is detached
        if dropping:
            # PEFT's order with active dropout: the rescaling term sees the dropped input too.
            result = pretrained(x)
            x = F.dropout(x, self.dropout, training=True)
            base = self._base_without_bias(x, weight)
            lora = up(down(x))
            shape = (-1,) + (1,) * (base.dim() - 2) if self._is_conv else (-1,)
            scale = scale.view(shape)
            return result + (scale - 1) * base + scale * lora * self.scaling
        if self._is_conv:
            y = torch.add(self._base_without_bias(x, weight), up(down(x)), alpha=self.scaling)
            shape = (1, -1) + (1,) * (y.dim() - 2)
            scale = scale.to(y.dtype).view(shape)
            if bias is None:
                return y * scale
            return torch.addcmul(bias.to(y.dtype).view(shape), y, scale)
        # Linear: W x + s up(down(x)) in one GEMM epilogue, then one pass for m/||.|| and b.
        flat = x.reshape(-1, x.shape[-1])
        y = torch.addmm(F.linear(flat, weight), down(flat), up.weight.t(), alpha=self.scaling)
        scale = scale.to(y.dtype)
        out = y * scale if bias is None else torch.addcmul(bias.to(y.dtype), y, scale)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        pretrained = self.pretrained_module
        if isinstance(pretrained, _CONV_TYPES):  # self._is_conv, spelled out so that it narrows
            return pretrained._conv_forward(x, weight, None)
        return F.linear(x, weight)

    @property
    def _is_conv(self) -> bool:
        return isinstance(self.pretrained_module, _CONV_TYPES)

    def _dora_norm(self, weight: torch.Tensor, branch: LoRA | LoRABranch | None = None) -> torch.Tensor:
        """``||W + s up @ down||`` per output row, detached (DoRA section 4.3, as PEFT does), in the
        weight's dtype even under autocast: one GEMM with the add in its epilogue, then the norm.
        ``branch``: a named adapter's factors (default: this layer's own)."""
        branch = self if branch is None else branch
        up, down = branch.adapter_up_proj.weight, branch.adapter_down_proj.weight
        with torch.no_grad(), _without_autocast(weight.device.type):
            combined = torch.addmm(
                weight.detach().flatten(1),
                up.flatten(1).to(weight.dtype),
                down.flatten(1).to(weight.dtype),
                alpha=branch.scaling,
            )
            return torch.linalg.vector_norm(combined, dim=1)

    def _update(self, dtype: torch.dtype, branch: LoRA | LoRABranch | None = None) -> torch.Tensor:
        """``scaling * up @ down`` in the wrapped weight's layout, differentiable, in ``dtype``
        (``branch``: a named adapter's factors; default: this layer's own)."""
        branch = self if branch is None else branch
        up, down = branch.adapter_up_proj.weight, branch.adapter_down_proj.weight
        # The product in the wider of the factors' dtype and ``dtype``: a merge of bf16 factors
        # multiplies in float32, as the file merge does (a bf16 product was up to 2 ulps off).
        compute = torch.promote_types(up.dtype, dtype)
        up, down = up.to(compute), down.to(compute)
        if isinstance(self.pretrained_module, nn.Embedding):  # down (num, rank), up (dim, rank)
            return (down @ up.t()).to(dtype) * branch.scaling
        delta = up.flatten(1) @ down.flatten(1)  # (out, rank) @ (rank, in * prod(k))
        return delta.view(up.shape[0], *down.shape[1:]).to(dtype) * branch.scaling

    # --- the wrapped layer's attributes -----------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, in the wrapped layer's layout: ``W + scaling * up @ down``
        (DoRA: rows rescaled to ``m / ||W + scaling * up @ down||``, the norm detached); the
        wrapped weight itself once merged. Differentiable: gradients reach the factors."""
        base = self.pretrained_module.weight
        if self.merged:
            return base
        combined = base + self._update(base.dtype)
        if not self.use_dora:
            return combined
        scale = self.adapter_magnitude / self._dora_norm(base)
        return combined * scale.to(base.dtype).view(-1, *(1,) * (base.dim() - 1))

    def __getattr__(self, name: str) -> Any:
        """The wrapped layer's attributes (``in_features``, ``stride``, ``bias``, ...), read-only."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in _NOT_FORWARDED:
                raise
            modules = self.__dict__.get("_modules") or {}
            wrapped = modules.get("pretrained_module")
            if wrapped is None:
                raise
            return getattr(wrapped, name)

    def __setattr__(self, name: str, value: Any) -> None:
        modules = self.__dict__.get("_modules") or {}
        wrapped = modules.get("pretrained_module")
        if (
            wrapped is not None
            and not name.startswith("_")
            and not _has_own(self, name)
            and _has_own(wrapped, name)
        ):
            raise AttributeError(
                f"{name!r} is an attribute of the wrapped {type(wrapped).__name__}, read-only through "
                f"its LoRA wrapper; set it on .pretrained_module instead"
            )
        super().__setattr__(name, value)

    # --- merging ----------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """``scaling * up @ down`` in the wrapped layer's weight layout (``(out, in, *k)``,
        embeddings ``(num, dim)``), in float32."""
        return self._update(torch.float32).detach()

    def merged_weight(self) -> torch.Tensor:
        """The weight :meth:`merge` writes, in float32: ``W + delta`` (DoRA:
        ``m / ||W + delta|| * (W + delta)``)."""
        return self._merge_plan()[0]

    def merge(self) -> None:
        """Fold the update into the wrapped weight, so inference costs the base layer's time.

        Exact to float rounding, DoRA too (its magnitude and norm fold into the weight). A
        parametrized weight (``weight_norm``) is written through its parametrization's
        ``right_inverse`` and checked; one that has none is refused with :class:`MergeError`
        before anything changes.
        """
        if self.merged:
            raise AdapterInsertionError("this LoRA layer is already merged")
        if "named_adapters" in self._modules or not self.__dict__.get("_has_default", True):
            raise MergeError(
                f"this LoRA layer holds the adapters {self.adapter_names()}: merge the ones you want with "
                "AdaptedModel.merge_and_unload(adapter_names=[...])"
            )
        check_writable_weight(self.pretrained_module)
        new, norm = self._merge_plan()
        write_weight(self.pretrained_module, new)
        self._merged_norm = norm
        self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of the wrapped weight (inverse of :meth:`merge`)."""
        if not self.merged:
            raise AdapterInsertionError("this LoRA layer is not merged")
        check_writable_weight(self.pretrained_module)
        weight = self.pretrained_module.weight.detach().float()
        delta = self.delta_weight()
        if self.use_dora:
            assert self._merged_norm is not None  # merge() with DoRA recorded it
            scale = (self.adapter_magnitude.detach().float() / self._merged_norm).view(
                -1, *(1,) * (weight.dim() - 1)
            )
            weight = weight / scale
        write_weight(self.pretrained_module, weight - delta)
        self._merged_norm = None
        self.merged = False

    def merge_adapters(self, names: list[str]) -> None:
        """Fold the adapters ``names`` this layer holds into the wrapped weight, one after the
        other as PEFT's ``merge(adapter_names=...)`` does (DoRA rescales the weight merged so
        far); for ``merge_and_unload``, which then drops the wrapper."""
        check_writable_weight(self.pretrained_module)
        with torch.no_grad():
            weight = self.pretrained_module.weight.detach().float()
            for name in names:
                branch = self.branch(name)
                combined = weight + self._update(torch.float32, branch).detach()
                if branch.use_dora:
                    norm = _row_norm(combined)
                    scale = branch.adapter_magnitude.detach().float() / norm
                    combined = combined * scale.view(-1, *(1,) * (combined.dim() - 1))
                weight = combined
        write_weight(self.pretrained_module, weight)

    def _merge_plan(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(merged weight in float32, DoRA norm or None)``."""
        with torch.no_grad():
            combined = self.pretrained_module.weight.detach().float() + self.delta_weight()
            if not self.use_dora:
                return combined, None
            norm = _row_norm(combined)
            scale = (self.adapter_magnitude.detach().float() / norm).view(-1, *(1,) * (combined.dim() - 1))
            return combined * scale, norm


class LoRABranch(nn.Module):
    """One named adapter's factors in a :class:`LoRA` layer that holds several (PEFT's
    ``lora_A[name]``/``lora_B[name]``): ``adapter_down_proj``, ``adapter_up_proj`` and, for DoRA,
    ``adapter_magnitude``, laid out as the default adapter's, with its own ``scaling``,
    ``dropout``, ``use_rslora`` and ``use_dora``. Built from a fresh ``LoRA`` on the same layer,
    so a named adapter is initialised exactly as a default one of the same kwargs.

    Example
    -------
    >>> layer = LoRA(nn.Linear(4, 3), rank=2, alpha=4.0)
    >>> branch = LoRABranch(LoRA(layer.pretrained_module, rank=1, alpha=2.0))
    >>> layer.add_named_adapter("other", branch)
    >>> layer.adapter_names(), tuple(branch.adapter_down_proj.weight.shape), branch.scaling
    (['default', 'other'], (1, 4), 2.0)
    """

    def __init__(self, source: LoRA) -> None:
        super().__init__()
        self.adapter_down_proj = source.adapter_down_proj
        self.adapter_up_proj = source.adapter_up_proj
        if source.use_dora:
            self.adapter_magnitude = source.adapter_magnitude
        self.scaling = source.scaling
        self.dropout = source.dropout
        self.use_rslora = source.use_rslora
        self.use_dora = source.use_dora


def _check_options(dropout: object, use_rslora: object, use_dora: object) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise AdapterError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    for name, value in (("use_rslora", use_rslora), ("use_dora", use_dora)):
        if not isinstance(value, bool):
            raise AdapterError(f"{name} must be True or False, got {value!r}")


def _check_embedding(embedding: nn.Embedding, use_dora: bool) -> None:
    if use_dora:
        raise AdapterError(
            f"use_dora=True is not supported on embeddings ({embedding}); DoRA wraps nn.Linear and "
            "nn.Conv1d/2d/3d layers"
        )
    if embedding.max_norm is not None:
        raise AdapterError(
            f"LoRA does not support embeddings with max_norm (got max_norm={embedding.max_norm} for "
            f"{embedding}): the renormalisation rewrites the rows in place at every lookup"
        )


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output row of a ``(out, in, *k)`` weight, shape ``(out,)``."""
    return torch.linalg.vector_norm(weight.flatten(1), dim=1)


def _without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _has_own(module: nn.Module, name: str) -> bool:
    return (
        name in module.__dict__
        or name in module._parameters
        or name in module._buffers
        or name in module._modules
        or hasattr(type(module), name)
    )


def check_writable_weight(module: nn.Module, name: str = "") -> None:
    """Raise :class:`MergeError` (changing nothing) when ``module.weight`` cannot be written
    exactly: a parametrization without ``right_inverse`` recomputes it from other tensors."""
    if not parametrize.is_parametrized(module, "weight"):
        return
    # (``Any``: torch types a module attribute as Tensor | Module; this is the ModuleDict of
    # ParametrizationList that is_parametrized found.)
    parametrizations: Any = module.parametrizations
    missing = [type(p).__name__ for p in parametrizations.weight if not hasattr(p, "right_inverse")]
    if missing:
        where = f"layer {name!r}" if name else f"the {type(module).__name__}"
        raise MergeError(
            f"cannot merge into {where}: its weight is computed by the parametrization(s) {missing}, "
            "which have no right_inverse to write a merged weight back; keep the adapter unmerged, or "
            "remove the parametrization first (torch.nn.utils.parametrize.remove_parametrizations)"
        )


def write_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Write ``value`` (float32, the weight's layout) as ``module.weight`` in its dtype.

    A parametrized weight is written through ``right_inverse`` and read back: if the
    parametrization does not reproduce ``value`` (to float rounding), its tensors are restored
    and :class:`MergeError` is raised.
    """
    with torch.no_grad():
        if not parametrize.is_parametrized(module, "weight"):
            weight = cast(torch.Tensor, module.weight)  # torch types a module attribute Tensor | Module
            weight.copy_(value.to(device=weight.device, dtype=weight.dtype))
            return
        parametrizations: Any = module.parametrizations  # a ModuleDict (typed Tensor | Module)
        originals = list(parametrizations.weight.parameters())
        saved = [p.detach().clone() for p in originals]
        dtype = originals[0].dtype
        target = value.to(device=originals[0].device, dtype=dtype)
        module.weight = target
        got = module.weight.float()
        tolerance = 64 * torch.finfo(dtype).eps * max(float(target.float().abs().max()), 1.0)
        if float((got - target.float()).abs().max()) > tolerance:
            for param, old in zip(originals, saved, strict=True):
                param.copy_(old)
            raise MergeError(
                f"the parametrization of {type(module).__name__}.weight does not reproduce the merged "
                "weight (its right_inverse is not exact); nothing was changed"
            )
