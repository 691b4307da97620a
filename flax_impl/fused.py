"""The fast path of :class:`~flax_impl.adapters.LoRA` on an ``nnx.Linear``: the twin of
``torch_impl.fused``.

``lora_linear`` computes exactly what the three ``nnx.Linear`` layers compute (the same dtype
promotions, precisions and operation order, so the forward is the plain formula's, value for
value) under a ``jax.custom_vjp`` whose backward is the one we want:

- the scaling multiplies the small ``(N, rank)`` and ``(rank, out)`` products, not the
  ``(N, out)`` cotangent (autodiff of ``lo * scaling`` scales the full cotangent first);
- the factors' gradients come out of the low-precision GEMMs directly in their own (float32)
  dtype (``preferred_element_type``), with no rounding to bf16 and no separate convert;
- the frozen kernel's gradient is written as the plain ``x.T @ g`` so that it is exact when
  someone does differentiate it, and dead code (removed by XLA) when, as usual, nobody does.

Off by default: on one H200 (2026-12-01, BERT-base, bf16, q,k,v,o, ``jax.jit``) it measured
1.432x the frozen floor against 1.415x for XLA's autodiff of the plain formula, the same within
the rounds' spread, so it is not switched on until it pays. Nor did a joint formulation (issue
24, branch ``perf`` commit 48cdf6a: the down projection in the base GEMM, ``x @ [W | A]``, and
``g @ B.T`` in the frozen ``dx`` GEMM, ``g @ [W; B].T``): on one H100 (2026-12-06) it took
q,k,v,o from 1.406x to 1.367x (spreads 9-10%) and q,v from 1.171x to 1.170x, because XLA
materialised the concatenations and transposes (+132 concatenate/transpose kernels for 66 fewer
thin GEMMs) and its forward was no longer the plain formula bit for bit. ``set_enabled(True)``, the context
manager ``enabled()`` or ``FLAX_IMPL_FUSED=1`` in the environment turn it on; ``disabled()``
turns it off for a block.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import partial
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as _dtypes

__all__ = ["can_fuse_linear", "disabled", "enabled", "is_enabled", "lora_linear", "set_enabled"]

_ENABLED = os.environ.get("FLAX_IMPL_FUSED", "0").strip().lower() in ("1", "true", "yes", "on")


def set_enabled(enabled: bool) -> bool:
    """Switch the fused path on or off for every :class:`~flax_impl.adapters.LoRA`.

    Off (the default), every LoRA layer calls its three ``nnx.Linear`` layers (the same
    function; autodiff then writes the backward). The switch is read when a function is traced:
    re-trace (a new ``jax.jit``) after changing it. ``FLAX_IMPL_FUSED=1`` in the environment
    starts it on.

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
    >>> previous = set_enabled(True)
    >>> is_enabled()
    True
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
    """Within the block (at trace time), every LoRA layer takes the plain formula.

    Example
    -------
    >>> layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> down = nnx.Linear(4, 2, use_bias=False, rngs=nnx.Rngs(1))
    >>> up = nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(2))
    >>> with enabled(), disabled():
    ...     can_fuse_linear(layer, down, up)
    False
    """
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Within the block (at trace time), every plain LoRA ``nnx.Linear`` takes the fused path.

    Example
    -------
    >>> layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> down = nnx.Linear(4, 2, use_bias=False, rngs=nnx.Rngs(1))
    >>> up = nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(2))
    >>> with enabled():
    ...     can_fuse_linear(layer, down, up)
    True
    >>> can_fuse_linear(layer, down, up)
    False
    """
    previous = set_enabled(True)
    try:
        yield
    finally:
        set_enabled(previous)


def _plain_linear(layer: nnx.Module) -> bool:
    if type(layer).__call__ is not nnx.Linear.__call__:
        return False
    linear = cast(nnx.Linear, layer)  # it runs nnx.Linear.__call__, which reads these attributes
    return (
        linear.dot_general is jax.lax.dot_general
        and linear.promote_dtype is _dtypes.promote_dtype
        and linear.preferred_element_type is None
    )


def can_fuse_linear(pretrained: nnx.Module, down: nnx.Module, up: nnx.Module) -> bool:
    """Whether ``lora_linear`` computes exactly what the three layers' ``__call__`` would.

    True when the fused path is switched on (off by default) and all three are ``nnx.Linear`` with their own
    ``__call__``, the default ``dot_general`` and ``promote_dtype`` and no
    ``preferred_element_type``, and the factors have no bias.

    Arguments
    ---------
    pretrained: nnx.Module
        The wrapped layer, ``(in, out)`` kernel.
    down: nnx.Module
        The down projection, ``(in, rank)`` kernel, no bias.
    up: nnx.Module
        The up projection, ``(rank, out)`` kernel, no bias.

    Returns
    -------
    bool
        Whether the fused path applies.

    Example
    -------
    >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> down = nnx.Linear(4, 2, use_bias=False, rngs=nnx.Rngs(1))
    >>> with enabled():
    ...     can_fuse_linear(base, down, nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(2)))
    True
    >>> with enabled():  # a biased factor
    ...     can_fuse_linear(base, down, nnx.Linear(2, 3, rngs=nnx.Rngs(2)))
    False
    """
    return (
        _ENABLED
        and all(_plain_linear(layer) for layer in (pretrained, down, up))
        # (``cast``: both are plain nnx.Linear by the line above.)
        and cast(nnx.Linear, down).bias is None
        and cast(nnx.Linear, up).bias is None
    )


def lora_linear(
    pretrained: nnx.Linear, down: nnx.Linear, up: nnx.Linear, scaling: float, x: jax.Array
) -> jax.Array:
    """``pretrained(x) + up(down(x)) * scaling`` with the backward described in the module doc.

    Arguments
    ---------
    pretrained, down, up: nnx.Linear
        The wrapped layer and the two factors (see :func:`can_fuse_linear`).
    scaling: float
        ``alpha / rank``.
    x: jax.Array
        Input of shape ``[..., in]``.

    Returns
    -------
    jax.Array
        Output of shape ``[..., out]``, the same values as the plain formula.

    Example
    -------
    >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> down = nnx.Linear(4, 2, use_bias=False, rngs=nnx.Rngs(1))
    >>> up = nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(2))
    >>> x = jnp.ones((5, 4))
    >>> bool(jnp.allclose(lora_linear(base, down, up, 0.5, x), base(x) + up(down(x)) * 0.5))
    True
    """
    config = (
        float(scaling),
        pretrained.dtype,
        pretrained.precision,
        down.dtype,
        down.precision,
        up.dtype,
        up.precision,
    )
    bias = pretrained.bias[...] if pretrained.bias is not None else None
    return _lora(config, x, pretrained.kernel[...], bias, down.kernel[...], up.kernel[...])


def _dot(a: jax.Array, b: jax.Array, precision: Any, out: Any = None) -> jax.Array:
    """``a @ b`` contracting ``a``'s last axis with ``b``'s first, as ``nnx.Linear`` does."""
    kwargs = {} if out is None else {"preferred_element_type": out}
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), precision=precision, **kwargs)


def _forward(config: tuple, x, kernel, bias, down, up):
    scaling, dtype, precision, down_dtype, down_precision, up_dtype, up_precision = config
    xb, kb, bb = _dtypes.promote_dtype((x, kernel, bias), dtype=dtype)
    y = _dot(xb, kb, precision)
    if bb is not None:
        y += jnp.reshape(bb, (1,) * (y.ndim - 1) + (-1,))
    xd, dd = _dtypes.promote_dtype((x, down), dtype=down_dtype)
    h = _dot(xd, dd, down_precision)
    hu, uu = _dtypes.promote_dtype((h, up), dtype=up_dtype)
    low = _dot(hu, uu, up_precision)
    return y + low * scaling, (xb, kb, xd, dd, hu, uu)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora(config: tuple, x, kernel, bias, down, up):
    return _forward(config, x, kernel, bias, down, up)[0]


def _lora_fwd(config: tuple, x, kernel, bias, down, up):
    out, saved = _forward(config, x, kernel, bias, down, up)
    # Zero-size stand-ins carry the primal dtypes (and bias' presence) to the backward.
    dtypes = tuple(jnp.zeros((0,), t.dtype) if t is not None else None for t in (x, kernel, bias, down, up))
    return out, (saved, dtypes)


def _flat(t: jax.Array) -> jax.Array:
    return t.reshape(-1, t.shape[-1])


def _lora_bwd(config: tuple, residuals, g):
    scaling, _, precision, _, down_precision, _, up_precision = config
    (xb, kb, xd, dd, hu, uu), (x_t, kernel_t, bias_t, down_t, up_t) = residuals
    g2 = _flat(g)
    # Base layer: dx = g @ K.T; dK = x.T @ g and db = sum(g) (dead code unless differentiated).
    gb = g2.astype(kb.dtype)
    dx = _dot(gb, kb.T, precision).astype(x_t.dtype)
    d_kernel = _dot(_flat(xb).T, gb, precision, out=kernel_t.dtype)
    d_bias = None if bias_t is None else jnp.sum(g2, axis=0, dtype=bias_t.dtype)
    # Low-rank branch: the scaling lands on the (N, rank) and (rank, out) products.
    gu = g2.astype(uu.dtype)
    hu2 = _flat(hu)
    d_up = _dot(hu2.T, gu, up_precision, out=up_t.dtype) * scaling
    dh = (_dot(gu, uu.T, up_precision, out=jnp.float32) * scaling).astype(dd.dtype)
    d_down = _dot(_flat(xd).T, dh, down_precision, out=down_t.dtype)
    dx = dx + _dot(dh, dd.T, down_precision).astype(x_t.dtype)
    return (dx.reshape(xb.shape[:-1] + (xb.shape[-1],)), d_kernel, d_bias, d_down, d_up)


_lora.defvjp(_lora_fwd, _lora_bwd)
