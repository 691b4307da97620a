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

On by default (after 0.2.0; off before), as ``torch_impl``'s fused path is: it is exact (the forward is the
plain formula's, the equivalence suite passes unchanged) and never measured slower. On one H100
(2026-12-07/08, bf16, ``jax.jit``) the ~1B Llama step took 1.20x its frozen floor against 1.21x
for XLA's autodiff of the plain formula; whisper-small's (8 x 30 s, LoRA on all 192 linear
layers) spent 3.2 ms of its 40.7 ms of GPU time in the padding copies that the fused path's sliced
factor gradients avoid (36.7 ms with them); BERT-base compiles to the same kernel counts (1.432x
against 1.415x on one H200, 2026-12-01, within the rounds' spread). On a 2-core CPU (BERT twin, 4
layers, 8 x 64 tokens, q,k,v,o, 2026-12-08) the step took 1.055x the floor against 1.078x in bf16
and 1.211x against 1.257x in float32. A joint formulation (issue 24, branch ``perf`` commit
48cdf6a: the down projection in the base GEMM, ``x @ [W | A]``, and ``g @ B.T`` in the frozen
``dx`` GEMM, ``g @ [W; B].T``) did not pay: on one H100 (2026-12-06) it took q,k,v,o from 1.406x
to 1.367x (spreads 9-10%) and q,v from 1.171x to 1.170x, because XLA materialised the
concatenations and transposes (+132 concatenate/transpose kernels for 66 fewer thin GEMMs) and its
forward was no longer the plain formula bit for bit.

A LoRA layer with active dropout (training with PEFT's ``lora_dropout``) takes it too: the layer
draws ``dropout(x)`` as the plain formula does and passes it as the low-rank branch's own input
(``x_low``), whose gradient autodiff takes back through the mask.

``set_enabled(False)``, the context manager ``disabled()`` or ``FLAX_IMPL_FUSED=0`` in the
environment select the plain formula (autodiff writes the backward); ``enabled()`` turns the
fused path on for a block. What the plain formula still does that the fused path cannot:
forward-mode differentiation of the model's forward (``jax.jvp``, ``jax.linearize``,
``jax.jacfwd`` of the outputs): a ``jax.custom_vjp`` function has no forward mode, and JAX says
"can't apply forward-mode autodiff (jvp) to a custom_vjp function"; trace such a function under
``disabled()``. Reverse mode, Hessians (``jax.hessian``) and Hessian-vector products
(``jax.jvp`` of ``jax.grad``) work on both paths.

Opt-in, on the fused path (issue 24): ``stacked()`` (``set_stacked``, ``FLAX_IMPL_STACKED=1``)
computes a widening layer's output as ``[x, x @ A] @ [K; scaling * B]`` and a narrowing layer's
input gradient as ``[g, dh] @ [K, A].T``, one GEMM each, where XLA otherwise writes the
full-width low-rank term and reads it back to add it, and reads each wide activation once for two
products through the same weights (``g @ [K; scaling * B].T``, ``x @ [K | A]``): at LLM sizes the
step's overhead is memory traffic (see :func:`set_stacked` for the numbers).

On the fused path, in programs lowered for CUDA, each factor gradient (a contraction over every
token) is cut into token slices summed in float32 where XLA:GPU would pad the tokens for its
split-K (see ``_factor_gradient``: whisper-small's encoder factor gradients 2.8x faster on one
H100); on a TPU or CPU it stays one GEMM.

Opt-in, model level (issue 24): ``group_shared_input(model)`` computes the down projections of
the LoRA ``query``, ``key`` and ``value`` of each attention block in one GEMM
(``x @ [A_q | A_k | A_v]``; under autodiff one GEMM for the three factor gradients and one for
the low-rank part of ``dx``), the twin of ``torch_impl.fused.group_shared_input``. The
profile of the jitted BERT-base step (one H100, q,k,v,o) put the LoRA overhead in kernel count:
234 thin GEMMs for 48 layers, half the added time launch gaps.

Opt-in, step level (issue 24; no torch twin: autocast caches its casts):
``compute_dtype_factors(model)`` gives bf16 copies of the float32 factors of bf16 layers, and
``value_and_grad_with_factors`` differentiates with respect to them, so that a step carrying the
copies has no factor casts in its forward and backward (the profile's 93 ``wrapped_convert``
kernels a step); the step makes the next copies from the updated parameters. Same numbers as
the plain formula (``disabled()``); both opt-ins take it, so their bf16 factor gradients are
rounded to bf16 before their float32 cast, as autodiff rounds them, where the fused path's are
not.

Together with ``optax.flatten`` around the optimizer, the two took the jitted BERT-base step
(32 x 128, bf16, rank 16, q,k,v,o) from 12.54 ms to 11.48 ms on one H100 (2026-12-07; 1.410x ->
1.291x the frozen floor); each alone is not timed on a GPU.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as _dtypes

from twinformat.adapters import LORA

from .graph import named_modules
from .sharding import has_explicit_axes

__all__ = [
    "can_fuse_linear",
    "compute_dtype_factors",
    "disabled",
    "enabled",
    "group_shared_input",
    "is_enabled",
    "is_stacked",
    "lora_linear",
    "set_enabled",
    "set_stacked",
    "stacked",
    "ungroup_shared_input",
    "value_and_grad_with_factors",
]

_ENABLED = os.environ.get("FLAX_IMPL_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")
_STACKED = os.environ.get("FLAX_IMPL_STACKED", "0").strip().lower() in ("1", "true", "yes", "on")
# Stacked also along the outputs (see ``set_stacked``); off only to compare the two in benchmarks.
_OUTPUT_STACKED = True
# The factor gradients' token axis cut into slices where XLA:GPU would pad it (see
# ``_factor_gradient``); off only to compare the two in benchmarks.
_SLICED_FACTOR_GRADIENTS = True


def set_enabled(enabled: bool) -> bool:
    """Switch the fused path on or off for every :class:`~flax_impl.adapters.LoRA`.

    On (the default), a plain LoRA ``nnx.Linear`` computes through :func:`lora_linear`; off,
    every LoRA layer calls its three ``nnx.Linear`` layers (the same function; autodiff then
    writes the backward). The switch is read when a function is traced: re-trace (a new
    ``jax.jit``) after changing it. ``FLAX_IMPL_FUSED=0`` in the environment starts it off.

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
    """Within the block (at trace time), every plain LoRA ``nnx.Linear`` takes the fused path
    (the default; for a block inside a :func:`disabled` one, or after ``set_enabled(False)``).

    Example
    -------
    >>> layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> down = nnx.Linear(4, 2, use_bias=False, rngs=nnx.Rngs(1))
    >>> up = nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(2))
    >>> with disabled():
    ...     with enabled():
    ...         print(can_fuse_linear(layer, down, up))
    ...     print(can_fuse_linear(layer, down, up))
    True
    False
    """
    previous = set_enabled(True)
    try:
        yield
    finally:
        set_enabled(previous)


def set_stacked(stacked: bool) -> bool:
    """Switch the fused path's stacked GEMMs on or off (off by default; ``FLAX_IMPL_STACKED=1`` in
    the environment starts it on). Read when a function is traced; has effect only where the fused
    path is on (:func:`set_enabled`).

    Stacked, a layer that widens (``out > in``: an MLP's up and gate projections) computes its
    output as one GEMM over a contraction stacked with the low-rank branch,
    ``[x, x @ A] @ [K; scaling * B]``, instead of writing the ``(N, out)`` low-rank output and
    adding it; a layer that narrows (``in > out``: the down projection) computes its input
    gradient as ``[g, dh] @ [K, A].T`` instead of writing and adding the ``(N, in)`` term
    ``dh @ A.T``. The copies it makes instead are ``(N, in + rank)`` and ``(N, out + rank)``.
    Each also reads its wide activation once where it read it twice, through the same stacked
    weights along the outputs: the widening layer's backward computes ``g @ [K; scaling * B].T =
    [g @ K.T, dh]``, the narrowing layer's forward ``x @ [K | A] = [y, x @ A]``.
    Why: on the ~1B Llama training step (4 x 2048 tokens, bf16, LoRA r=16 on every linear layer)
    the overhead over the frozen floor is memory traffic, its kernels running at 2.1-3.2 of the
    H100's 3.35 TB/s (``benchmarks/profile_llm.py``). XLA:GPU's program for a simulated H100
    (``benchmarks/gpu_kernels_aot.py``) moves 3.3 GB more than the floor's per block (a block
    added to a 1-block program) without it, 2.6 GB with the stacked contractions and 2.3 GB with
    the stacked outputs too (which keep the stacked weights for the backward: ~95 MiB more
    temporaries a block). On one H100 (2026-12-07, 4 of the 16 blocks, one run) the step took
    1.206x the floor's time by default, 1.186x with the stacked contractions and 1.161x with both.
    Layers of equal sizes (BERT's attention) are unchanged.

    The values differ from the plain formula's by rounding: the stacked GEMM accumulates both
    terms before it rounds once (the plain formula rounds each term to the compute dtype first),
    and ``scaling * B`` is rounded to the compute dtype before the product (also where it gives
    ``dh``, which the plain formula scales after the product). In float32 the two
    agree to float32 rounding; in bf16 the stacked output is the more accurate one.

    Returns the previous setting.

    Example
    -------
    >>> previous = set_stacked(True)
    >>> is_stacked()
    True
    >>> _ = set_stacked(previous)
    """
    global _STACKED
    previous, _STACKED = _STACKED, bool(stacked)
    return previous


def is_stacked() -> bool:
    """Whether the fused path stacks its GEMMs (see :func:`set_stacked`).

    Example
    -------
    >>> with stacked():
    ...     is_stacked()
    True
    """
    return _STACKED


@contextlib.contextmanager
def stacked() -> Iterator[None]:
    """Within the block (at trace time), the fused path stacks its GEMMs (see :func:`set_stacked`).

    Example
    -------
    >>> layer = nnx.Linear(2, 8, rngs=nnx.Rngs(0))
    >>> down = nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(1))
    >>> up = nnx.Linear(1, 8, use_bias=False, rngs=nnx.Rngs(2))
    >>> x = jnp.ones((3, 2))
    >>> with enabled(), stacked():
    ...     y = lora_linear(layer, down, up, 0.5, x)
    >>> bool(jnp.allclose(y, layer(x) + up(down(x)) * 0.5, atol=1e-6))
    True
    """
    previous = set_stacked(True)
    try:
        yield
    finally:
        set_stacked(previous)


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

    True when the fused path is switched on (the default) and all three are ``nnx.Linear`` with their own
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
    pretrained: nnx.Linear,
    down: nnx.Linear,
    up: nnx.Linear,
    scaling: float,
    x: jax.Array,
    x_low: jax.Array | None = None,
) -> jax.Array:
    """``pretrained(x) + up(down(x_low)) * scaling`` (``x_low`` defaults to ``x``) with the
    backward described in the module doc.

    Arguments
    ---------
    pretrained, down, up: nnx.Linear
        The wrapped layer and the two factors (see :func:`can_fuse_linear`).
    scaling: float
        ``alpha / rank``.
    x: jax.Array
        Input of shape ``[..., in]``.
    x_low: jax.Array, optional
        The low-rank branch's input where it is not ``x``: LoRA's dropout, ``dropout(x)``
        (computed by the caller, whose autodiff takes its gradient back through the mask).

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
    # (Not stacked over explicit mesh axes: the stacked weights would concatenate a sharded
    # kernel with an unsharded factor.)
    stackable = (
        _STACKED and pretrained.precision == down.precision == up.precision and not has_explicit_axes(x)
    )
    if x_low is not None and x_low.shape != x.shape:
        raise ValueError(f"lora_linear: x_low has shape {x_low.shape}, x {x.shape}; they must be equal")
    config = (
        float(scaling),
        pretrained.dtype,
        pretrained.precision,
        down.dtype,
        down.precision,
        up.dtype,
        up.precision,
        # Stacked where it writes less: the forward where the layer widens (out > in), dx where it
        # narrows (in > out); see ``set_stacked``.
        stackable and pretrained.out_features > pretrained.in_features,
        # (Not with a separate low-rank input: [g, dh] @ [K, A].T would sum both inputs' gradients.)
        stackable and pretrained.in_features > pretrained.out_features and x_low is None,
    )
    bias = pretrained.bias[...] if pretrained.bias is not None else None
    return _lora(config, x, x_low, pretrained.kernel[...], bias, down.kernel[...], up.kernel[...])


def _dot(a: jax.Array, b: jax.Array, precision: Any, out: Any = None, like: Any = None) -> jax.Array:
    """``a @ b`` contracting ``a``'s last axis with ``b``'s first, as ``nnx.Linear`` does;
    ``like``: the output's sharding where the mesh's axes are explicit (see :func:`~flax_impl.sharding.has_explicit_axes`)."""
    kwargs: dict[str, Any] = {} if out is None else {"preferred_element_type": out}
    if like is not None:
        kwargs["out_sharding"] = like
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), precision=precision, **kwargs)


def _tokens_dot(a: jax.Array, b: jax.Array, precision: Any, out: Any, like: Any = None) -> jax.Array:
    """``a.T @ b`` over every leading (token) axis of ``a`` ``(..., p)`` and ``b`` ``(..., q)``."""
    if like is None and a.ndim == 2:
        return _dot(a.T, b, precision, out=out)
    tokens = tuple(range(a.ndim - 1))
    return jax.lax.dot_general(
        a, b, ((tokens, tokens), ((), ())), precision=precision, preferred_element_type=out, out_sharding=like
    )


def _forward(config: tuple, x, x_low, kernel, bias, down, up):
    scaling, dtype, precision, down_dtype, down_precision, up_dtype, up_precision, stack_y, stack_dx = config
    xb, kb, bb = _dtypes.promote_dtype((x, kernel, bias), dtype=dtype)
    xd, dd = _dtypes.promote_dtype((x if x_low is None else x_low, down), dtype=down_dtype)
    y = None
    if stack_dx and _OUTPUT_STACKED and xb.dtype == xd.dtype and kb.dtype == dd.dtype:
        # A narrowing layer reads its (wide) input once for both products: x @ [K | A] = [y, h]
        # (the backward's stacked dx GEMM takes the same [K | A]).
        yh = _dot(xb, _stacked_columns(kb, dd), precision)
        y, h = yh[..., : kb.shape[1]], yh[..., kb.shape[1] :]
    else:
        h = _dot(xd, dd, down_precision)
    hu, uu = _dtypes.promote_dtype((h, up), dtype=up_dtype)
    stack_y = stack_y and xb.dtype == hu.dtype == uu.dtype  # (else a promoted, wider GEMM)
    if stack_y:  # one GEMM over the stacked contraction: [x, h] @ [K; scaling * B]
        y = _dot(jnp.concatenate([xb, hu], axis=-1), _stacked_rows(kb, uu, scaling), precision)
    elif y is None:
        y = _dot(xb, kb, precision)
    if bb is not None:
        y += jnp.reshape(bb, (1,) * (y.ndim - 1) + (-1,))
    if not stack_y:
        y = y + _dot(hu, uu, up_precision) * scaling
    return y, (xb, kb, xd, dd, hu, uu)


def _stacked_rows(kernel: jax.Array, up: jax.Array, scaling: float) -> jax.Array:
    """``[K; scaling * B]``, ``(in + rank, out)``: the widening layer's stacked weights, which its
    forward contracts over and its backward (output-stacked) multiplies ``g`` by."""
    return jnp.concatenate([kernel, up * scaling], axis=0)


def _stacked_columns(kernel: jax.Array, down: jax.Array) -> jax.Array:
    """``[K | A]``, ``(in, out + rank)``: the narrowing layer's stacked weights, which its forward
    multiplies ``x`` by and its backward contracts over."""
    return jnp.concatenate([kernel, down], axis=1)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora(config: tuple, x, x_low, kernel, bias, down, up):
    return _forward(config, x, x_low, kernel, bias, down, up)[0]


def _lora_fwd(config: tuple, x, x_low, kernel, bias, down, up):
    out, saved = _forward(config, x, x_low, kernel, bias, down, up)
    # Zero-size stand-ins carry the primal dtypes (and the presence of x_low and bias) to the
    # backward; the bias itself (a parameter, alive anyway) where its sharding is typed (explicit
    # mesh axes), so that its gradient gets that sharding back.
    primals = (x, x_low, kernel, bias, down, up)
    dtypes = tuple(jnp.zeros((0,), t.dtype) if t is not None else None for t in primals)
    if bias is not None and has_explicit_axes(bias):
        dtypes = (*dtypes[:3], bias, *dtypes[4:])
    return out, (saved, dtypes)


def _flat(t: jax.Array) -> jax.Array:
    return t.reshape(-1, t.shape[-1])


def _token_slices(tokens: int) -> int:
    """Slices of the token axis for a factor gradient: 1 (one GEMM) unless the tokens are many
    and not a multiple of 1024, then the largest of 32, 16, 8 that divides them (else 1)."""
    if not _SLICED_FACTOR_GRADIENTS or tokens < 4096 or tokens % 1024 == 0:
        return 1
    return next((s for s in (32, 16, 8) if tokens % s == 0), 1)


def _factor_gradient(a: jax.Array, b: jax.Array, precision: Any, out: Any, like: Any = None) -> jax.Array:
    """``a.T @ b`` over the token axis (``a``: ``(N, p)``, ``b``: ``(N, q)``) in ``out``; with
    ``like`` (explicit mesh axes: ``a`` and ``b`` unflattened, ``(..., p)`` and ``(..., q)``) one
    contraction over every leading axis with that output sharding, unsliced.

    Why sliced: a factor gradient contracts over every token and XLA:GPU splits that contraction
    (split-K) for parallelism; where the token count is not a multiple of its split it pads both
    operands first, a copy of each activation. On one H100 (2026-12-07,
    ``benchmarks/bench_thin_gemms.py``) whisper-small's encoder (8 x 1500 = 12,000 tokens, fc1
    768 -> 3072, rank 16) took 23.5 us for ``x.T @ dh`` and 82.9 us for ``h.T @ g`` (23% and
    27% of the memory bound) against 8.3 and 31.9 us as 32 slices summed in float32; at 8,192
    and 4,096 tokens (no padding) slicing was no faster, so those keep one GEMM. The padding is
    XLA:GPU's: a program lowered for another platform (TPU, CPU) keeps the one GEMM
    (``jax.lax.platform_dependent``).
    """
    if like is not None:
        return _tokens_dot(a, b, precision, out, like)
    slices = _token_slices(a.shape[0])

    def whole(a: jax.Array, b: jax.Array) -> jax.Array:
        return _dot(a.T, b, precision, out=out)

    if slices == 1:
        return whole(a, b)

    def sliced(a: jax.Array, b: jax.Array) -> jax.Array:
        return _sliced_factor_gradient(a, b, slices, precision, out)

    return jax.lax.platform_dependent(a, b, cuda=sliced, default=whole)


def _sliced_factor_gradient(a: jax.Array, b: jax.Array, slices: int, precision: Any, out: Any) -> jax.Array:
    """``a.T @ b`` as ``slices`` token slices in one batched GEMM, summed in float32."""
    a3 = a.reshape(slices, -1, a.shape[-1])
    b3 = b.reshape(slices, -1, b.shape[-1])
    batched = (((1,), (1,)), ((0,), (0,)))
    partial = jax.lax.dot_general(a3, b3, batched, precision=precision, preferred_element_type=jnp.float32)
    return partial.sum(0).astype(out)


def _lora_bwd(config: tuple, residuals, g):
    scaling, _, precision, _, down_precision, _, up_precision, stack_y, stack_dx = config
    (xb, kb, xd, dd, hu, uu), (x_t, x_low_t, kernel_t, bias_t, down_t, up_t) = residuals
    # Over a mesh with explicit axes the arrays keep their token axes (merging a sharded one
    # with another is refused) and every GEMM that contracts a possibly sharded axis names its
    # output's sharding, the primal's, as JAX's own transpose of ``dot_general`` does.
    explicit = has_explicit_axes(g)

    def flat(t: jax.Array) -> jax.Array:
        return t if explicit else _flat(t)

    def like(t: jax.Array) -> Any:
        return jax.typeof(t).sharding if explicit else None

    g2 = flat(g)
    d_x_low = None  # (the low-rank branch's own input, where it was given one)
    # Base layer: dx = g @ K.T; dK = x.T @ g and db = sum(g) (dead code unless differentiated).
    gb = g2.astype(kb.dtype)
    d_kernel = _tokens_dot(flat(xb), gb, precision, kernel_t.dtype, like(kb))
    d_bias = None if bias_t is None else jnp.sum(g2, axis=tuple(range(g2.ndim - 1)), dtype=bias_t.dtype)
    if d_bias is not None and explicit:
        d_bias = jax.sharding.reshard(d_bias, like(bias_t))
    # Low-rank branch: the scaling lands on the (N, rank) and (rank, out) products.
    gu = g2.astype(uu.dtype)
    hu2 = flat(hu)
    d_up = _factor_gradient(hu2, gu, up_precision, up_t.dtype, like(uu)) * scaling
    if stack_y and _OUTPUT_STACKED and kb.dtype == uu.dtype == dd.dtype:
        # A widening layer reads its (wide) output gradient once for both products:
        # g @ [K; scaling * B].T = [g @ K.T, dh], the forward's stacked weights again.
        dxh = _dot(gb, _stacked_rows(kb, uu, scaling).T, precision)
        dx_base, dh = dxh[:, : kb.shape[0]], dxh[:, kb.shape[0] :]
    else:
        dx_base = None
        dh = (_dot(gu, uu.T, up_precision, out=jnp.float32, like=like(hu2)) * scaling).astype(dd.dtype)
    d_down = _factor_gradient(flat(xd), dh, down_precision, down_t.dtype, like(dd))
    if stack_dx and gb.dtype == dh.dtype:  # one GEMM over the stacked contraction: [g, dh] @ [K, A].T
        dx = _dot(jnp.concatenate([gb, dh], axis=-1), _stacked_columns(kb, dd).T, precision)
        dx = dx.astype(x_t.dtype)
    else:
        dx_base = _dot(gb, kb.T, precision, like=like(xb)) if dx_base is None else dx_base
        dx_low = _dot(dh, dd.T, down_precision, like=like(xd))
        if x_low_t is None:
            dx = dx_base.astype(x_t.dtype) + dx_low.astype(x_t.dtype)
        else:  # the low-rank branch's input was x_low: it gets that term, x the base one
            dx, d_x_low = dx_base.astype(x_t.dtype), dx_low.astype(x_low_t.dtype).reshape(xd.shape)
    return (dx.reshape(xb.shape), d_x_low, d_kernel, d_bias, d_down, d_up)


_lora.defvjp(_lora_fwd, _lora_bwd)


# ---------------------------------------------------------------------------------------------
# Opt-in grouping of LoRA layers that read the same input (q, k and v of an attention block).
#
# A grouped layer and its parent get a subclass of their own class (``SharedInputLoRA``,
# ``SharedInputBertSelfAttention``, ...), made once per class and adding only ``__call__``: the
# class is what an NNX graphdef records, so the grouping survives ``nnx.split``/``nnx.merge``
# (the README's jitted step merges a new model inside every trace) and changes no state.
# The parent's ``__call__`` opens a scope that lists its members (the live instances of this
# trace); the first member called in it computes every member's down projection in one GEMM;
# the scope, and the arrays it holds, end with the parent's call.


class _SharedDown:
    """The shared down projection of one group in one call of its parent."""

    def __init__(self, x: jax.Array, h: jax.Array, columns: dict[int, tuple[int, int, Any]]) -> None:
        self.x = x  # the input it was computed for (compared with ``is``)
        self.h = h  # (..., sum of ranks), in the down projections' compute dtype
        self.columns = columns  # id(member) -> (start, stop, the down kernel's value it read)


class _SharedInputCall:
    """One call of a grouped parent: its groups' members and their shared down projections."""

    def __init__(self, parent: nnx.Module, groups: tuple[tuple[str, ...], ...]) -> None:
        self.groups: list[list[Any]] = [[vars(parent).get(name) for name in names] for names in groups]
        self.shared: dict[int, _SharedDown] = {}


_CALLS = threading.local()  # .stack: the _SharedInputCall of every grouped parent being called


def _call_stack() -> list[_SharedInputCall]:
    stack = getattr(_CALLS, "stack", None)
    if stack is None:
        stack = _CALLS.stack = []
    return stack


def _plain_lora(layer: Any) -> bool:
    """A LoRA layer whose output is exactly ``pretrained(x) + up(down(x)) * scaling`` now: its own
    (default) factors, no DoRA, no dropout mask, not merged, no several-adapter switch."""
    dropout = vars(layer).get("adapter_dropout")
    return (
        getattr(layer, "adapter_kind", None) is LORA
        and isinstance(vars(layer).get("pretrained_module"), nnx.Linear)
        and vars(layer).get("has_default", True)
        and vars(layer).get("adapter_switch") is None
        and not layer.merged
        and not layer.use_dora
        and (dropout is None or dropout.deterministic)
    )


def _shares_down_projection(layer: Any, reference: Any) -> bool:
    """Whether ``layer``'s down projection can be columns of one GEMM with ``reference``'s: both
    plain bias-free ``nnx.Linear`` with the same input size, kernel dtype, dtype and precision."""
    if not (_SHARED_INPUT_BASE in type(layer).__dict__ and _plain_lora(layer)):
        return False
    down, ref = layer.adapter_down_proj, reference.adapter_down_proj
    return (
        _plain_linear(down)
        and down.bias is None
        and down.in_features == ref.in_features
        and down.kernel.dtype == ref.kernel.dtype
        and down.dtype == ref.dtype
        and down.precision == ref.precision
    )


def _shared_down_projection(layer: Any, x: jax.Array) -> jax.Array | None:
    """``layer.adapter_down_proj(x)`` as columns of its group's GEMM, or None where the layer
    must compute alone (no grouped parent being called, another input, not plain LoRA now)."""
    for call in reversed(_call_stack()):
        found = [(i, members) for i, members in enumerate(call.groups) if any(m is layer for m in members)]
        if found:
            break
    else:
        return None
    index, members = found[0]
    shared = call.shared.get(index)
    if shared is None:  # the first member called: one GEMM for every member that can share it
        if not _shares_down_projection(layer, layer):
            return None
        sharing = [m for m in members if m is layer or _shares_down_projection(m, layer)]
        if len(sharing) < 2:
            return None
        kernels = [m.adapter_down_proj.kernel for m in sharing]
        down = layer.adapter_down_proj
        xd, dd = _dtypes.promote_dtype(
            (x, jnp.concatenate([k[...] for k in kernels], axis=-1)), dtype=down.dtype
        )
        h = _dot(xd, dd, down.precision)
        columns, start = {}, 0
        for member, kernel in zip(sharing, kernels, strict=True):
            stop = start + kernel.shape[-1]
            columns[id(member)] = (start, stop, kernel.get_value())
            start = stop
        shared = call.shared[index] = _SharedDown(x, h, columns)
    column = shared.columns.get(id(layer))
    if shared.x is not x or column is None or not _plain_lora(layer):
        return None
    start, stop, kernel_value = column
    if layer.adapter_down_proj.kernel.get_value() is not kernel_value:  # set since: not that GEMM's
        return None
    return shared.h[..., start:stop]


_SHARED_INPUT_BASE = "_shared_input_base"  # class attribute of a grouped class: the class it extends
_SHARED_INPUT_CLASSES: dict[tuple[type, tuple[tuple[str, ...], ...] | None], type] = {}


def _member_class(base: type) -> type:
    """``base`` (a LoRA class) whose ``__call__`` takes the group's down projection when there is one."""
    key = (base, None)
    if key not in _SHARED_INPUT_CLASSES:

        def __call__(self: Any, x: jax.Array) -> jax.Array:
            h = _shared_down_projection(self, x)
            if h is None:
                return base.__call__(self, x)
            # LoRA's plain formula, with down(x) read from the group's GEMM.
            return self.pretrained_module(x) + self.adapter_up_proj(h) * self.scaling

        _SHARED_INPUT_CLASSES[key] = _subclass(base, __call__, {_SHARED_INPUT_BASE: base})
    return _SHARED_INPUT_CLASSES[key]


def _parent_class(base: type, groups: tuple[tuple[str, ...], ...]) -> type:
    """``base`` whose ``__call__`` opens the scope in which its ``groups`` share down projections."""
    key = (base, groups)
    if key not in _SHARED_INPUT_CLASSES:

        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            stack = _call_stack()
            stack.append(_SharedInputCall(self, groups))
            try:
                return base.__call__(self, *args, **kwargs)
            finally:
                stack.pop()

        attributes = {_SHARED_INPUT_BASE: base, "shared_input_groups": groups}
        _SHARED_INPUT_CLASSES[key] = _subclass(base, __call__, attributes)
    return _SHARED_INPUT_CLASSES[key]


def _subclass(base: type, call: Any, attributes: dict[str, Any]) -> type:
    name = f"SharedInput{base.__name__}"
    namespace = {"__call__": call, "__module__": __name__, "__qualname__": name, "__doc__": base.__doc__}
    return type(base)(name, (base,), {**namespace, **attributes})


def _set_class(module: nnx.Module, cls: type) -> None:
    # object.__setattr__: NNX's __setattr__ would record ``__class__`` as an attribute of the node.
    object.__setattr__(module, "__class__", cls)


def _original_class(module: nnx.Module) -> type:
    return type(module).__dict__.get(_SHARED_INPUT_BASE, type(module))


def group_shared_input(model: nnx.Module, names: tuple[str, ...] = ("query", "key", "value")) -> int:
    """Opt-in: compute the down projections of the LoRA layers ``names`` of each parent module in
    one GEMM (the twin of ``torch_impl.fused.group_shared_input``).

    For every module with at least two plain LoRA children among ``names`` (wrapping an
    ``nnx.Linear``; no DoRA, no dropout, not merged, one adapter), the first of them that the
    parent's ``__call__`` calls computes ``x @ concatenate([A_1, A_2, ...])`` (one GEMM, one cast
    of the concatenated factors) and each member called on the very same array (``is``) takes its
    columns, then adds ``up(h) * scaling`` to its base output as LoRA does. Under autodiff the
    backward then has one GEMM for the factors' gradients and one for the low-rank part of
    ``dx``. A member called on another array, outside its parent's call, or that is no longer
    plain LoRA (merged, dropout active, a second adapter since) computes alone.

    The forward is LoRA's plain formula with the down projection's columns taken from a wider
    GEMM (bit for bit the same where the backend computes each column alike, as XLA:CPU does);
    the gradients of ``x`` sum the members' low-rank terms inside one GEMM instead of adding
    them one by one (float32 rounding apart). It takes the plain formula, where the members would
    otherwise take the fused path (the default): in bf16 its factor gradients are then rounded
    to bf16 as autodiff rounds them.

    The grouped parents and members become subclasses of their classes that add only
    ``__call__`` (``SharedInputLoRA``, ...): the parameters, ``nnx.state`` and checkpoints do not
    change, and ``nnx.split``/``nnx.merge`` keep the grouping, so a step that merges the model
    from a graphdef inside ``jax.jit`` (the README's split-state step) groups too, provided
    ``nnx.split`` runs after this call. :func:`ungroup_shared_input` undoes it.

    Arguments
    ---------
    model: nnx.Module
        A model holding LoRA layers (an ``AdaptedModel`` or its wrapped model).
    names: tuple of str
        Child names to group under each parent.

    Returns
    -------
    int
        The number of groups formed.

    Example
    -------
    >>> from flax_impl import LoRA
    >>> class Attention(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.query, self.key, self.value = (
    ...             LoRA(nnx.Linear(8, 8, rngs=rngs), 2, rngs=rngs) for _ in range(3))
    ...     def __call__(self, x):
    ...         return self.query(x) * self.key(x) + self.value(x)
    >>> attention = Attention(nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (4, 8))
    >>> before = attention(x)
    >>> group_shared_input(attention)
    1
    >>> type(attention.query).__name__
    'SharedInputLoRA'
    >>> graphdef, state = nnx.split(attention)  # the grouping is in the graphdef
    >>> bool(jnp.allclose(jax.jit(lambda s: nnx.merge(graphdef, s)(x))(state), before, atol=1e-6))
    True
    >>> ungroup_shared_input(attention)
    3
    """
    count = 0
    for _, parent in named_modules(model):
        children = dict(nnx.iter_module_children(parent))
        members = [
            name
            for name in names
            if name in children
            and _plain_lora(children[name])
            and not children[name].dropout
            and _SHARED_INPUT_BASE not in type(children[name]).__dict__
        ]
        if len(members) < 2:
            continue
        for name in members:
            _set_class(children[name], _member_class(type(children[name])))
        groups = (*getattr(type(parent), "shared_input_groups", ()), tuple(members))
        _set_class(parent, _parent_class(_original_class(parent), groups))
        count += 1
    return count


def ungroup_shared_input(model: nnx.Module) -> int:
    """Undo :func:`group_shared_input`: every module gets its class back; return the number of
    LoRA layers released.

    Example
    -------
    >>> ungroup_shared_input(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    0
    """
    count = 0
    for _, module in named_modules(model):
        if _SHARED_INPUT_BASE in type(module).__dict__:
            count += "shared_input_groups" not in type(module).__dict__
            _set_class(module, _original_class(module))
    return count


# ---------------------------------------------------------------------------------------------
# Opt-in: the factors in the dtype their layers compute in, as copies carried by the step.


def _compute_dtype_kernels(model: nnx.Module) -> dict[int, Any]:
    """id(kernel Variable) -> compute dtype, for the LoRA factors whose layer casts the kernel to
    a narrower dtype before its GEMM (bf16 compute, float32 parameters): the factors of plain or
    dropout LoRA layers on ``nnx.Linear`` (DoRA's norm and a merge read the factors themselves)."""
    kernels: dict[int, Any] = {}
    for _, layer in named_modules(model):
        if not (
            getattr(layer, "adapter_kind", None) is LORA
            and isinstance(vars(layer).get("pretrained_module"), nnx.Linear)
            and vars(layer).get("has_default", True)
            and not cast(Any, layer).merged
            and not cast(Any, layer).use_dora
        ):
            continue
        for factor in (cast(Any, layer).adapter_down_proj, cast(Any, layer).adapter_up_proj):
            if _plain_linear(factor) and factor.dtype is not None:
                dtype = jnp.dtype(factor.dtype)
                if dtype != factor.kernel.dtype:
                    kernels[id(factor.kernel)] = dtype
    return kernels


def compute_dtype_factors(model: nnx.Module) -> nnx.State:
    """Opt-in: copies of the LoRA factors in the dtype their layers compute in, for
    :func:`value_and_grad_with_factors`.

    A LoRA factor of a bf16 layer with float32 parameters (``nnx.Linear(..., dtype=bfloat16)``)
    is cast to bf16 in every forward and its gradient back to float32 in every backward: ~2 cast
    kernels per factor and step. A training step that carries these copies (computed here once,
    then by the step from the updated parameters, where the cast rides in the optimizer's
    update) differentiates with respect to them instead: the same bf16 operands and GEMMs, so
    the same numbers as the plain formula (:func:`disabled`), with the casts out of the forward
    and backward. The model's parameters stay float32; only the step's carry grows (2 bytes a
    factor entry).

    Arguments
    ---------
    model: nnx.Module
        A model holding LoRA layers. Factors of DoRA or merged layers, of layers that compute
        in their parameters' dtype, and of convolutions and embeddings are left out.

    Returns
    -------
    nnx.State
        The copies, at the factors' paths in ``nnx.state(model)`` (empty when no layer casts).

    Example
    -------
    >>> from flax_impl import LoRA
    >>> layer = LoRA(nnx.Linear(8, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(1))
    >>> factors = compute_dtype_factors(layer)
    >>> [(path, v.dtype.name) for path, v in nnx.to_flat_state(factors)]
    [(('adapter_down_proj', 'kernel'), 'bfloat16'), (('adapter_up_proj', 'kernel'), 'bfloat16')]
    >>> layer.adapter_down_proj.kernel.dtype.name  # the parameter itself is unchanged
    'float32'
    """
    kernels = _compute_dtype_kernels(model)
    state = nnx.state(model, lambda _, variable: id(variable) in kernels)
    return nnx.from_flat_state(
        [
            (path, variable.replace(variable.get_value().astype(kernels[id(variable)])))
            for path, variable in nnx.to_flat_state(state)
        ]
    )


def value_and_grad_with_factors(
    fn: Any, model: nnx.Module, factors: nnx.State, *, wrt: Any, has_aux: bool = False
) -> tuple[Any, nnx.State]:
    """``nnx.value_and_grad(fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)(model)`` with the
    LoRA factors read from ``factors`` (:func:`compute_dtype_factors`) instead of cast in the
    layers.

    During the call each factor Variable holds its copy (the layers' cast is then a no-op), the
    gradient is taken with respect to the copies and cast to the parameter's dtype (autodiff of
    the layers' cast does the same), and the parameters are put back. The layers take the plain
    formula (:func:`disabled`), so the value and the gradients are those of the plain formula,
    provided ``factors`` are the copies of the current parameters: a step that updates them
    must return ``compute_dtype_factors(model)`` for the next step.

    Arguments
    ---------
    fn: callable
        ``fn(model)``, the loss (``(loss, aux)`` with ``has_aux``).
    model: nnx.Module
        The model, as the step merged it.
    factors: nnx.State
        ``compute_dtype_factors(model)`` of the current parameters.
    wrt: filter
        What to differentiate (``model.trainable`` of an ``AdaptedModel``).
    has_aux: bool
        Whether ``fn`` returns ``(loss, aux)``.

    Returns
    -------
    tuple
        ``(value, grads)``: ``fn``'s value and the gradients in the parameters' dtypes, the state
        of ``wrt`` as ``nnx.value_and_grad`` gives it.

    Example
    -------
    >>> from flax_impl import LoRA
    >>> layer = LoRA(nnx.Linear(8, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(1))
    >>> x = jnp.ones((3, 8))
    >>> loss = lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2)
    >>> _, grads = value_and_grad_with_factors(loss, layer, compute_dtype_factors(layer), wrt=nnx.LoRAParam)
    >>> _, reference = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
    >>> jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype and bool((a == b).all()), grads, reference))
    True
    """
    live = dict(nnx.to_flat_state(nnx.state(model)))
    masters: dict[tuple, tuple[nnx.Variable, Any]] = {}
    for path, copy in nnx.to_flat_state(factors):
        variable = live.get(path)
        if variable is None or variable.shape != copy.shape:
            raise KeyError(
                f"factors holds {'.'.join(map(str, path))!r} {copy.shape}, which the model "
                f"{'has not' if variable is None else f'holds with shape {variable.shape}'}: "
                "pass compute_dtype_factors(model) of this model"
            )
        masters[path] = (variable, variable.get_value())
    try:
        for path, copy in nnx.to_flat_state(factors):
            masters[path][0].set_value(copy.get_value())
        with disabled():
            value, grads = nnx.value_and_grad(fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)(model)
    finally:
        for variable, master in masters.values():
            variable.set_value(master)
    flat = [
        (path, grad.replace(grad.get_value().astype(masters[path][1].dtype)) if path in masters else grad)
        for path, grad in nnx.to_flat_state(grads)
    ]
    return value, nnx.from_flat_state(flat)
