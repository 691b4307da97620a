"""The fast path of :class:`~torch_impl.adapters.LoRA` on an ``nn.Linear``.

``lora_linear`` computes the same function as SpeechBrain's formula
``pretrained(x) + up(down(x)) * scaling`` with fewer passes over the activations:

- forward: ``h = x @ down.T`` (``(N, rank)``), then one small GEMM writes
  ``bias + scaling * h @ up.T`` and the base GEMM accumulates ``x @ weight.T`` into it in place
  (``scaling`` rides in the GEMM's ``alpha``: no separate multiply, no separate add);
- backward: a custom ``autograd.Function`` that saves only ``x``, ``h`` and the three weights,
  never computes a gradient for the frozen ``weight``/``bias``, and accumulates the low-rank
  part of ``dx`` into the base GEMM's output in place.

Under autocast, ``x`` and the weights are cast once to the autocast dtype before the function
(so the three GEMMs share one cast of ``x``, and autograd casts the gradients back), which is
what autocast does for ``F.linear`` too.

Under ``torch.compile`` (``torch.compiler.is_compiling()``) LoRA takes the plain formula, and
Inductor writes the fused kernels itself: traced, this autograd function made the compiled step
slower than PEFT's (one H100, torch 2.11.0+cu130, BERT-base 32 x 128, bf16, q,k,v,o:
1.398x the compiled floor against PEFT's 1.216x), and its bf16 backward did not trace at all
before that (torch 2.11 decomposes ``addmm(..., out_dtype=)`` with ``out_dtype`` landing on
``beta``: "addmm() got multiple values for argument 'beta'"). PEFT's formula is the plain one;
our compiled step on it has not been timed yet (device time), only checked to train
(``tests/torch_impl/test_train_paths_cuda.py``).

The float32 factors (the usual case under autocast) are cast to the compute dtype inside the
function, and on CUDA their gradients come out of the bf16/fp16 GEMMs directly in float32
(``out_dtype``): no cast kernels and no cast nodes in the backward, gradients that are not rounded
to bf16 first.

``torch.func`` (``vmap``, ``grad``, ``jvp``, ``jacrev``, ``functional_call`` under a transform) and
forward-mode AD (``torch.autograd.forward_ad``) take the plain formula by themselves: the fused
function is a classic ``autograd.Function`` (its Python overhead is about half the
``setup_context`` form's, and eager LoRA training is bound by exactly that overhead), which those
transforms do not accept. ``set_enabled(False)``, the context manager ``disabled()`` or the
environment variable ``TORCH_IMPL_FUSED=0`` (read at import) select the plain path everywhere.

Opt-in, model level: ``group_shared_input(model)`` computes the LoRA ``query``, ``key`` and
``value`` of each attention block together (``lora_linear_group``: one down-projection GEMM over
the concatenated factors, one low-rank ``dx`` GEMM, one factor-gradient GEMM, the three base
``dx`` GEMMs accumulated into one buffer instead of summed by autograd). On one H200 (BERT-base,
32 x 128 tokens, rank 16, bf16, q,k,v,o) it took the CUDA-graph step from 1.155x to 1.075x the
frozen floor and the eager step from 1.87x to 1.68x.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad as _forward_ad
from torch.nn.modules import module as _module

from twinformat.adapters import LORA

__all__ = [
    "can_fuse_linear",
    "disabled",
    "group_shared_input",
    "is_enabled",
    "lora_linear",
    "lora_linear_group",
    "set_enabled",
    "ungroup_shared_input",
]

_ENABLED = os.environ.get("TORCH_IMPL_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def set_enabled(enabled: bool) -> bool:
    """Switch the fused path on or off for every :class:`~torch_impl.adapters.LoRA`.

    Off, every LoRA layer computes SpeechBrain's plain formula
    ``pretrained(x) + up(down(x)) * scaling`` through its submodules (the same function; the
    fused path is faster and saves less for the backward). The environment variable
    ``TORCH_IMPL_FUSED=0`` sets the initial state to off.

    Arguments
    ---------
    enabled: bool
        Whether :func:`can_fuse_linear` may say yes.

    Returns
    -------
    bool
        The previous setting.

    Example
    -------
    >>> previous = set_enabled(False)
    >>> is_enabled()
    False
    >>> _ = set_enabled(previous)
    """
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


def is_enabled() -> bool:
    """Whether the fused path is switched on (see :func:`set_enabled`).

    Example
    -------
    >>> with disabled():
    ...     is_enabled()
    False
    """
    return _ENABLED


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, every LoRA layer takes the plain formula (see :func:`set_enabled`).

    Example
    -------
    >>> layer = nn.Linear(4, 3).requires_grad_(False)
    >>> down, up = nn.Linear(4, 2, bias=False), nn.Linear(2, 3, bias=False)
    >>> with disabled():
    ...     can_fuse_linear(layer, down, up)
    False
    >>> can_fuse_linear(layer, down, up)
    True
    """
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def _transformed() -> bool:
    """Whether a ``torch.func`` transform or a forward-mode AD level is active, or
    ``torch.compile`` is tracing: each takes the plain formula (see the module doc)."""
    return (
        torch._C._are_functorch_transforms_active()
        or _forward_ad._current_level >= 0
        or torch.compiler.is_compiling()
    )


# Dtypes autocast would cast (it leaves float64 and integer tensors alone).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def can_fuse_linear(pretrained: nn.Module, down: nn.Module, up: nn.Module) -> bool:
    """Whether ``lora_linear`` computes exactly what the three modules' ``forward`` would.

    True when the fused path is switched on (:func:`set_enabled`), all three are plain
    ``nn.Linear`` (their ``forward`` not overridden), no forward hook is registered on them (the
    fused path does not call the modules, so it would skip hooks), and the pretrained weight and
    bias are frozen (the fused backward never computes their gradients). Otherwise
    :class:`~torch_impl.adapters.LoRA` takes the plain formula.

    Arguments
    ---------
    pretrained: nn.Module
        The wrapped layer, ``(out, in)`` weight.
    down: nn.Module
        The down projection, ``(rank, in)`` weight, no bias.
    up: nn.Module
        The up projection, ``(out, rank)`` weight, no bias.

    Returns
    -------
    bool
        Whether the fused path applies.

    Example
    -------
    >>> base = nn.Linear(4, 3).requires_grad_(False)
    >>> can_fuse_linear(base, nn.Linear(4, 2, bias=False), nn.Linear(2, 3, bias=False))
    True
    >>> can_fuse_linear(base.requires_grad_(True), nn.Linear(4, 2, bias=False), nn.Linear(2, 3, bias=False))
    False
    """
    if not _ENABLED or _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    for layer in (pretrained, down, up):
        if type(layer).forward is not nn.Linear.forward or layer._forward_hooks or layer._forward_pre_hooks:
            return False
    bias = pretrained.bias
    return not pretrained.weight.requires_grad and (bias is None or not bias.requires_grad)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scaling: float,
    x_low: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + F.linear(F.linear(x_low, down), up) * scaling``, fused
    (``x_low`` defaults to ``x``).

    ``weight`` and ``bias`` get no gradient (they are the frozen pretrained layer); ``x``,
    ``x_low``, ``down`` and ``up`` get theirs, in their own dtypes. Under autocast the computation
    runs in the autocast dtype, as ``F.linear`` would.

    Arguments
    ---------
    x: torch.Tensor
        Input of shape ``[..., in]``.
    weight: torch.Tensor
        Frozen pretrained weight, ``(out, in)``.
    bias: torch.Tensor or None
        Frozen pretrained bias, ``(out,)``.
    down: torch.Tensor
        LoRA down-projection weight, ``(rank, in)``.
    up: torch.Tensor
        LoRA up-projection weight, ``(out, rank)``.
    scaling: float
        ``alpha / rank``.
    x_low: torch.Tensor, optional
        The low-rank branch's input where it is not ``x``: LoRA's dropout,
        ``F.dropout(x, p, training=True)`` (computed by the caller; autograd takes its gradient
        back through the mask). Same shape as ``x``.

    Returns
    -------
    torch.Tensor
        Output of shape ``[..., out]``.

    Example
    -------
    >>> import torch.nn.functional as F
    >>> x, weight, bias = torch.randn(2, 5, 4), torch.randn(3, 4), torch.randn(3)
    >>> down, up = torch.randn(2, 4, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    >>> y = lora_linear(x, weight, bias, down, up, 0.5)
    >>> plain = F.linear(x, weight, bias) + F.linear(F.linear(x, down), up) * 0.5
    >>> torch.allclose(y, plain, atol=1e-5)
    True
    """
    if _transformed():
        # torch.func transforms and forward-mode AD do not take a classic autograd.Function;
        # torch.compile fuses the plain formula better than it traces this one.
        return _plain(x, weight, bias, down, up, scaling, x_low)
    if x_low is not None and x_low.shape != x.shape:
        raise ValueError(
            f"lora_linear: x_low has shape {tuple(x_low.shape)}, x {tuple(x.shape)}; they must be equal"
        )
    device_type = x.device.type
    compute = None
    if torch.is_autocast_enabled(device_type):
        compute = torch.get_autocast_dtype(device_type)
        x, weight = _autocast(x, compute), _autocast(weight, compute)
        bias = None if bias is None else _autocast(bias, compute)
        x_low = None if x_low is None else _autocast(x_low, compute)
        if x.dtype != compute:  # float64 input: autocast leaves the layer alone, so do we
            compute = None
    if torch.is_grad_enabled() and (
        x.requires_grad
        or down.requires_grad
        or up.requires_grad
        or (x_low is not None and x_low.requires_grad)
    ):
        return _LoRALinearFunction.apply(x, weight, bias, down, up, scaling, compute, x_low)
    down, up = _to(down, compute), _to(up, compute)
    return _forward(x, weight, bias, down, up, scaling, x_low)[0]


def _plain(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scaling: float,
    x_low: torch.Tensor | None = None,
) -> torch.Tensor:
    """SpeechBrain's formula, op for op what the three ``nn.Linear`` modules compute."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x if x_low is None else x_low, down), up) * scaling


def _autocast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast like autocast's ``cached_cast``: only float32/16 and bfloat16 tensors move."""
    return tensor.to(dtype) if tensor.dtype in _AUTOCAST_ELIGIBLE else tensor


def _to(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A factor in the compute dtype (``None``: its own), cast like autocast would."""
    if dtype is None or tensor.dtype == dtype or tensor.dtype not in _AUTOCAST_ELIGIBLE:
        return tensor
    return tensor.to(dtype)


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scaling: float,
    x_low: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y, h)``: the layer's output and the ``(N, rank)`` down projection (of ``x_low``
    where given)."""
    x2d = x.reshape(-1, x.shape[-1])
    h = torch.mm(x2d if x_low is None else x_low.reshape(-1, x_low.shape[-1]), down.t())
    if bias is not None:
        # bias + scaling * h @ up.T in one GEMM (bias epilogue), then the base GEMM adds into it
        # (beta=1, in place: no copy of the accumulator, no separate add).
        y = torch.addmm(bias, h, up.t(), alpha=scaling)
        y.addmm_(x2d, weight.t())
    else:
        y = torch.mm(x2d, weight.t())
        y.addmm_(h, up.t(), alpha=scaling)
    return y.view(*x.shape[:-1], y.shape[-1]), h


def _widening(low: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a GEMM of ``low``-dtype operands can write the wider ``dtype`` directly
    (``out_dtype``: CUDA, bf16/fp16 operands, float32 output, float32 accumulation either way)."""
    return dtype == torch.float32 and low.dtype in (torch.bfloat16, torch.float16) and low.is_cuda


class _LoRALinearFunction(torch.autograd.Function):
    """Autograd for :func:`lora_linear`; ``x``, ``weight`` and ``bias`` already in the compute
    dtype, the factors in their own (cast here, so that no cast node sits in the graph).

    The classic ``forward(ctx, ...)`` form: it costs about half the Python overhead of the
    ``setup_context`` form with a second (non-differentiable) output, and eager LoRA training
    is often bound by exactly that overhead. ``lora_linear`` sends ``torch.func`` elsewhere.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        down: torch.Tensor,
        up: torch.Tensor,
        scaling: float,
        compute: torch.dtype | None,
        x_low: torch.Tensor | None,
    ) -> torch.Tensor:
        down_c, up_c = _to(down, compute), _to(up, compute)
        y, h = _forward(x, weight, bias, down_c, up_c, scaling, x_low)
        ctx.save_for_backward(x, weight, down_c, up_c, h, *(() if x_low is None else (x_low,)))
        ctx.scaling = scaling
        ctx.factor_dtypes = (down.dtype, up.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple:
        x, weight, down, up, h, *rest = ctx.saved_tensors
        x_low = rest[0] if rest else None
        scaling = ctx.scaling
        down_dtype, up_dtype = ctx.factor_dtypes
        need_x, _, _, need_down, need_up, _, _, need_x_low = ctx.needs_input_grad
        g = grad_y.reshape(-1, grad_y.shape[-1])
        if g.dtype != h.dtype:
            g = g.to(h.dtype)
        grad_x = grad_down = grad_up = grad_x_low = None
        if x_low is not None and need_x:  # the low-rank branch read x_low: x gets the base part only
            grad_x = torch.mm(g, weight).view(x.shape)
        if (need_x and x_low is None) or need_down or need_x_low:
            # scaling * g @ up; beta=0 means ``h`` only lends its shape and is never read.
            grad_h = torch.addmm(h, g, up, beta=0, alpha=scaling)
            if need_x_low and x_low is not None:  # (needs_input_grad says False for a None)
                grad_x_low = torch.mm(grad_h, down).view(x_low.shape)
            if need_x and x_low is None:
                # The low-rank part first, then the base GEMM accumulates into it in place.
                grad_x = torch.mm(grad_h, down)
                grad_x.addmm_(g, weight)
                grad_x = grad_x.view(x.shape)
            if need_down:
                source = x if x_low is None else x_low
                x2d = source.reshape(-1, source.shape[-1])
                if _widening(grad_h, down_dtype):
                    grad_down = torch.mm(grad_h.t(), x2d, out_dtype=down_dtype)
                else:
                    grad_down = torch.mm(grad_h.t(), x2d).to(down_dtype)
        if need_up:
            if _widening(g, up_dtype):
                # ``alpha`` carries the scaling (``up`` only lends its shape): one GEMM, where
                # ``mm`` + ``mul_`` launched two kernels a layer.
                grad_up = torch.addmm(up, g.t(), h, beta=0, alpha=scaling, out_dtype=up_dtype)
            else:
                grad_up = torch.addmm(up, g.t(), h, beta=0, alpha=scaling).to(up_dtype)
        return grad_x, None, None, grad_down, grad_up, None, None, grad_x_low


# ---------------------------------------------------------------------------------------------
# Opt-in grouping of LoRA layers that read the same input (q, k and v of an attention block).


class _SharedInputGroup:
    """LoRA layers of one parent that the model calls one after the other on the same tensor.

    The first member called computes every member's output in one autograd function (one
    down-projection GEMM over the concatenated factors, one low-rank ``dx`` GEMM, one factor
    gradient GEMM, the base ``dx`` GEMMs accumulated into one buffer); the others then return
    their output from ``pending``, but only for the very same input tensor (same object, same
    version), the same factor and weight versions and the same grad/autocast state: anything
    else recomputes, so the group never changes what the model computes.
    """

    # Members are LORA-declared adapters wrapping an nn.Linear, read by duck typing (``Any``):
    # this module cannot import the LoRA class (lora.py imports it).
    def __init__(self, members: list[Any]) -> None:
        self.members = members
        # index -> (input, its state, output); holding the input keeps its id from being reused
        self.pending: dict[int, tuple[torch.Tensor, tuple, torch.Tensor]] = {}

    def state(self, x: torch.Tensor) -> tuple:
        versions = tuple(
            p._version
            for m in self.members
            for p in (m.pretrained_module.weight, m.adapter_down_proj.weight, m.adapter_up_proj.weight)
        )
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
        return (x._version, x.requires_grad, versions, torch.is_grad_enabled(), autocast)

    def fusable(self) -> bool:
        return all(
            not m.merged
            and _plain_lora(m)
            and isinstance(m.pretrained_module, nn.Linear)
            and m.pretrained_module.in_features == self.members[0].pretrained_module.in_features
            and can_fuse_linear(m.pretrained_module, m.adapter_down_proj, m.adapter_up_proj)
            for m in self.members
        )

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s output, or None where the member must compute it itself."""
        if _transformed():
            self.pending.clear()
            return None
        state = self.state(x)
        hit = self.pending.pop(index, None)
        if hit is not None and hit[0] is x and hit[1] == state and self.fusable():
            return hit[2]
        self.pending.clear()
        if not self.fusable():  # a hook, a merge, an unfrozen layer since: each computes alone
            return None
        outputs = lora_linear_group(
            x,
            [
                (
                    m.pretrained_module.weight,
                    m.pretrained_module.bias,
                    m.adapter_down_proj.weight,
                    m.adapter_up_proj.weight,
                    m.scaling,
                )
                for m in self.members
            ],
        )
        self.pending = {i: (x, state, y) for i, y in enumerate(outputs) if i != index}
        return outputs[index]


_PLAIN_LORA_MODULES = {"pretrained_module", "adapter_down_proj", "adapter_up_proj"}


def _plain_lora(layer: nn.Module) -> bool:
    """A LoRA layer whose output is exactly ``pretrained(x) + up(down(x)) * scaling``: no
    dropout, no magnitude vector (DoRA) or other parameter or submodule of its own."""
    return (
        set(layer._modules) == _PLAIN_LORA_MODULES
        and not layer._parameters
        and not getattr(layer, "use_dora", False)
        and not any(
            value
            for name, value in vars(layer).items()
            if "dropout" in name and isinstance(value, (int, float))
        )
    )


def group_shared_input(model: nn.Module, names: tuple[str, ...] = ("query", "key", "value")) -> int:
    """Opt-in: compute the LoRA layers ``names`` of each parent module together (see below).

    For every module with at least two LoRA children among ``names`` (transformers' self-attention
    ``query``, ``key``, ``value`` by default), the first of them that the model calls computes all
    of their outputs in one fused autograd function, and the others hand theirs out, provided the
    model calls them on the same tensor. The numbers are those of the separate fused layers within
    rounding (the same products in fewer, larger GEMMs, which round differently: float32 outputs
    ~1e-6 apart on a small BERT; not bit-exact, hence opt-in); a member called on another tensor,
    or after its weights changed, computes alone, and so does a group with a layer that is merged,
    unfrozen, hooked or not plain LoRA (dropout, DoRA). ``torch.compile`` and ``torch.func``
    always take the separate layers. The parameters, ``state_dict`` and checkpoints do not change;
    :func:`ungroup_shared_input` undoes it.

    Arguments
    ---------
    model: nn.Module
        A model holding LoRA layers (an ``AdaptedModel`` or its wrapped model).
    names: tuple of str
        Child names to group under each parent.

    Returns
    -------
    int
        The number of groups formed.

    Example
    -------
    >>> from torch_impl import LoRA
    >>> class Attention(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.query, self.key, self.value = (LoRA(nn.Linear(8, 8), 2) for _ in range(3))
    ...     def forward(self, x):
    ...         return self.query(x) * self.key(x) + self.value(x)
    >>> attention = Attention()
    >>> x = torch.randn(4, 8)
    >>> before = attention(x)
    >>> group_shared_input(attention)
    1
    >>> torch.allclose(attention(x), before, atol=1e-6)
    True
    >>> ungroup_shared_input(attention)
    3
    """
    count = 0
    for parent in model.modules():
        members = [
            child
            for name, child in parent.named_children()
            if name in names
            and getattr(child, "adapter_kind", None) is LORA
            and isinstance(getattr(child, "pretrained_module", None), nn.Linear)
        ]
        if len(members) < 2 or any("_shared_input_group" in m.__dict__ for m in members):
            continue
        group = _SharedInputGroup(members)
        for index, member in enumerate(members):
            member.__dict__["_shared_input_group"] = group
            member.forward = _grouped_forward(member, group, index)
        count += 1
    return count


def ungroup_shared_input(model: nn.Module) -> int:
    """Undo :func:`group_shared_input`; return the number of layers released.

    Example
    -------
    >>> ungroup_shared_input(nn.Linear(2, 2))
    0
    """
    count = 0
    for module in model.modules():
        if "_shared_input_group" in module.__dict__:
            del module.__dict__["_shared_input_group"]
            del module.forward
            count += 1
    return count


def _grouped_forward(member: nn.Module, group: _SharedInputGroup, index: int):
    plain_forward = type(member).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = group.forward(index, x)
        return plain_forward(member, x) if y is None else y

    return forward


def lora_linear_group(
    x: torch.Tensor,
    layers: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, float]],
) -> list[torch.Tensor]:
    """:func:`lora_linear` of several layers on one input, in one autograd function.

    Arguments
    ---------
    x: torch.Tensor
        The shared input, ``[..., in]``.
    layers: list of (weight, bias, down, up, scaling)
        One tuple a layer, as :func:`lora_linear` takes them.

    Returns
    -------
    list of torch.Tensor
        Each layer's output.

    Example
    -------
    >>> x = torch.randn(3, 4)
    >>> layers = [(torch.randn(5, 4), torch.randn(5), torch.randn(2, 4), torch.randn(5, 2), 0.5)] * 2
    >>> ys = lora_linear_group(x, layers)
    >>> all(torch.allclose(y, lora_linear(x, *layer), atol=1e-5) for y, layer in zip(ys, layers))
    True
    """
    if _transformed():
        return [_plain(x, *layer) for layer in layers]
    device_type = x.device.type
    compute = None
    if torch.is_autocast_enabled(device_type):
        compute = torch.get_autocast_dtype(device_type)
        x = _autocast(x, compute)
        layers = [
            (_autocast(w, compute), None if b is None else _autocast(b, compute), d, u, s)
            for w, b, d, u, s in layers
        ]
        if x.dtype != compute:
            compute = None
    scalings = tuple(float(layer[4]) for layer in layers)
    flat = [t for w, b, d, u, _ in layers for t in (w, b, d, u)]
    needs = torch.is_grad_enabled() and (
        x.requires_grad or any(t.requires_grad for w, b, d, u, _ in layers for t in (d, u))
    )
    if needs:
        return list(_LoRAGroupFunction.apply(x, compute, scalings, *flat))
    return list(_group_forward(x, compute, scalings, flat)[0])


def _group_forward(x: torch.Tensor, compute: torch.dtype | None, scalings: tuple, flat: list):
    weights, biases, downs, ups = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
    x2d = x.reshape(-1, x.shape[-1])
    down_cat = torch.cat(downs)
    down_cat = _to(down_cat, compute)
    ups = [_to(u, compute) for u in ups]
    h = torch.mm(x2d, down_cat.t())  # (N, sum of ranks)
    outputs, start = [], 0
    for weight, bias, up, scaling in zip(weights, biases, ups, scalings, strict=True):
        h_i = h[:, start : start + up.shape[1]]
        start += up.shape[1]
        if bias is not None:
            y = torch.addmm(bias, h_i, up.t(), alpha=scaling)
            y.addmm_(x2d, weight.t())
        else:
            y = torch.mm(x2d, weight.t())
            y.addmm_(h_i, up.t(), alpha=scaling)
        outputs.append(y.view(*x.shape[:-1], y.shape[-1]))
    return tuple(outputs), (x, weights, down_cat, ups, h)


class _LoRAGroupFunction(torch.autograd.Function):
    """Autograd for :func:`lora_linear_group` (classic form; see :class:`_LoRALinearFunction`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, compute: torch.dtype | None, scalings: tuple, *flat: torch.Tensor):
        outputs, (x, weights, down_cat, ups, h) = _group_forward(x, compute, scalings, list(flat))
        ctx.save_for_backward(x, down_cat, h, *weights, *ups)
        ctx.scalings = scalings
        ctx.factor_dtypes = [t.dtype for t in flat[2::4]], [t.dtype for t in flat[3::4]]
        ctx.ranks = [t.shape[0] for t in flat[2::4]]
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        x, down_cat, h, *rest = ctx.saved_tensors
        count = len(ctx.scalings)
        weights, ups = rest[:count], rest[count:]
        down_dtypes, up_dtypes = ctx.factor_dtypes
        needs = ctx.needs_input_grad
        x2d = x.reshape(-1, x.shape[-1])
        gs = [None if g is None else g.reshape(-1, g.shape[-1]).to(h.dtype) for g in grads]
        grad_hs: list[torch.Tensor] = []
        grad_ups: list[torch.Tensor | None] = []
        grad_downs: list[torch.Tensor | None]
        start = 0
        for i, (g, up, scaling, rank) in enumerate(zip(gs, ups, ctx.scalings, ctx.ranks, strict=True)):
            h_i = h[:, start : start + rank]
            start += rank
            if g is None:
                grad_hs.append(torch.zeros_like(h_i))
                grad_ups.append(None)
                continue
            grad_hs.append(torch.addmm(h_i, g, up, beta=0, alpha=scaling))
            if needs[3 + 4 * i + 3]:
                if _widening(g, up_dtypes[i]):
                    grad_up = torch.addmm(up, g.t(), h_i, beta=0, alpha=scaling, out_dtype=up_dtypes[i])
                else:
                    grad_up = torch.addmm(up, g.t(), h_i, beta=0, alpha=scaling).to(up_dtypes[i])
                grad_ups.append(grad_up)
            else:
                grad_ups.append(None)
        grad_h = torch.cat(grad_hs, dim=1)
        grad_x = None
        if needs[0]:
            grad_x = torch.mm(grad_h, down_cat)
            for g, weight in zip(gs, weights, strict=True):
                if g is not None:
                    grad_x.addmm_(g, weight)
            grad_x = grad_x.view(x.shape)
        if any(needs[3 + 4 * i + 2] for i in range(count)):
            dtype = down_dtypes[0]
            if all(t == dtype for t in down_dtypes) and _widening(grad_h, dtype):
                grad_down_cat = torch.mm(grad_h.t(), x2d, out_dtype=dtype)
            else:
                grad_down_cat = torch.mm(grad_h.t(), x2d)
            split_downs = list(torch.split(grad_down_cat, ctx.ranks))
            grad_downs = [
                (gd.to(dt) if needs[3 + 4 * i + 2] else None)
                for i, (gd, dt) in enumerate(zip(split_downs, down_dtypes, strict=True))
            ]
        else:
            grad_downs = [None] * count
        flat_grads: list[torch.Tensor | None] = []
        for down_grad, up_grad in zip(grad_downs, grad_ups, strict=True):
            flat_grads += [None, None, down_grad, up_grad]
        return (grad_x, None, None, *flat_grads)
