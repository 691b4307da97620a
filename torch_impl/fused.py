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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

__all__ = ["can_fuse_linear", "lora_linear"]

# Dtypes autocast would cast (it leaves float64 and integer tensors alone).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def can_fuse_linear(pretrained: nn.Module, down: nn.Module, up: nn.Module) -> bool:
    """Whether ``lora_linear`` computes exactly what the three modules' ``forward`` would.

    True when all three are plain ``nn.Linear`` (their ``forward`` not overridden), no forward
    hook is registered on them (the fused path does not call the modules, so it would skip
    hooks), and the pretrained weight and bias are frozen (the fused backward never computes
    their gradients). Otherwise :class:`~torch_impl.adapters.LoRA` takes the plain formula.

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
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
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
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, down, up = (
            _autocast(x, dtype),
            _autocast(weight, dtype),
            _autocast(down, dtype),
            _autocast(up, dtype),
        )
        bias = None if bias is None else _autocast(bias, dtype)
    if torch.is_grad_enabled() and (x.requires_grad or down.requires_grad or up.requires_grad):
        return _LoRALinearFunction.apply(x, weight, bias, down, up, scaling)
    return _forward(x, weight, bias, down, up, scaling)[0]


def _autocast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast like autocast's ``cached_cast``: only float32/16 and bfloat16 tensors move."""
    return tensor.to(dtype) if tensor.dtype in _AUTOCAST_ELIGIBLE else tensor


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


class _LoRALinearFunction(torch.autograd.Function):
    """Autograd for :func:`lora_linear`; all tensors already in one dtype.

    The classic ``forward(ctx, ...)`` form: it costs about half the Python overhead of the
    ``setup_context`` form with a second (non-differentiable) output, and eager LoRA training
    is often bound by exactly that overhead.
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
    ) -> torch.Tensor:
        y, h = _forward(x, weight, bias, down, up, scaling)
        ctx.save_for_backward(x, weight, down, up, h)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple:
        x, weight, down, up, h = ctx.saved_tensors
        scaling = ctx.scaling
        need_x, _, _, need_down, need_up, _ = ctx.needs_input_grad
        g = grad_y.reshape(-1, grad_y.shape[-1])
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
                grad_down = torch.mm(grad_h.t(), x.reshape(-1, x.shape[-1]))
        if need_up:
            grad_up = torch.addmm(up, g.t(), h, beta=0, alpha=scaling)
        return grad_x, None, None, grad_down, grad_up, None
