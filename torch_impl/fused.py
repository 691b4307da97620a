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
what autocast does for ``F.linear`` too. Everything here is plain ATen, so ``torch.compile``
traces it without graph breaks.

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

__all__ = ["can_fuse_linear", "disabled", "is_enabled", "lora_linear", "set_enabled"]

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
    """Whether a ``torch.func`` transform or a forward-mode AD level is active."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


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
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + F.linear(F.linear(x, down), up) * scaling``, fused.

    ``weight`` and ``bias`` get no gradient (they are the frozen pretrained layer); ``x``,
    ``down`` and ``up`` get theirs, in their own dtypes. Under autocast the computation runs in
    the autocast dtype, as ``F.linear`` would.

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
        # torch.func transforms and forward-mode AD do not take a classic autograd.Function.
        return _plain(x, weight, bias, down, up, scaling)
    device_type = x.device.type
    compute = None
    if torch.is_autocast_enabled(device_type):
        compute = torch.get_autocast_dtype(device_type)
        x, weight = _autocast(x, compute), _autocast(weight, compute)
        bias = None if bias is None else _autocast(bias, compute)
        if x.dtype != compute:  # float64 input: autocast leaves the layer alone, so do we
            compute = None
    if torch.is_grad_enabled() and (x.requires_grad or down.requires_grad or up.requires_grad):
        return _LoRALinearFunction.apply(x, weight, bias, down, up, scaling, compute)
    down, up = _to(down, compute), _to(up, compute)
    return _forward(x, weight, bias, down, up, scaling)[0]


def _plain(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """SpeechBrain's formula, op for op what the three ``nn.Linear`` modules compute."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, down), up) * scaling


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y, h)``: the layer's output and the ``(N, rank)`` down projection."""
    x2d = x.reshape(-1, x.shape[-1])
    h = torch.mm(x2d, down.t())
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
    ) -> torch.Tensor:
        down_c, up_c = _to(down, compute), _to(up, compute)
        y, h = _forward(x, weight, bias, down_c, up_c, scaling)
        ctx.save_for_backward(x, weight, down_c, up_c, h)
        ctx.scaling = scaling
        ctx.factor_dtypes = (down.dtype, up.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple:
        x, weight, down, up, h = ctx.saved_tensors
        scaling = ctx.scaling
        down_dtype, up_dtype = ctx.factor_dtypes
        need_x, _, _, need_down, need_up, _, _ = ctx.needs_input_grad
        g = grad_y.reshape(-1, grad_y.shape[-1])
        if g.dtype != h.dtype:
            g = g.to(h.dtype)
        grad_x = grad_down = grad_up = None
        if need_x or need_down:
            # scaling * g @ up; beta=0 means ``h`` only lends its shape and is never read.
            grad_h = torch.addmm(h, g, up, beta=0, alpha=scaling)
            if need_x:
                # The low-rank part first, then the base GEMM accumulates into it in place.
                grad_x = torch.mm(grad_h, down)
                grad_x.addmm_(g, weight)
                grad_x = grad_x.view(x.shape)
            if need_down:
                x2d = x.reshape(-1, x.shape[-1])
                if _widening(grad_h, down_dtype):
                    grad_down = torch.mm(grad_h.t(), x2d, out_dtype=down_dtype)
                else:
                    grad_down = torch.mm(grad_h.t(), x2d).to(down_dtype)
        if need_up:
            if _widening(g, up_dtype):
                grad_up = torch.mm(g.t(), h, out_dtype=up_dtype)
                if scaling != 1.0:
                    grad_up.mul_(scaling)
            else:
                grad_up = torch.addmm(up, g.t(), h, beta=0, alpha=scaling).to(up_dtype)
        return grad_x, None, None, grad_down, grad_up, None, None
