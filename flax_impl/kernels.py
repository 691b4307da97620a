"""Pallas (Triton) kernels for a LoRA ``nnx.Linear`` on CUDA GPUs: opt-in, issue 24.

Why by hand: the jitted BERT-base step (bf16, rank 16, q,k,v,o) launches ~10 kernels per adapted
layer on top of the frozen model's (XLA:GPU on a simulated H100, ``benchmarks/gpu_kernels_aot.py``:
638 for the floor, 1155 with LoRA on 48 layers), and the H100 profile put half of the added time
in the gaps between those launches. XLA writes the rank-``r`` products as separate thin GEMMs
(down, up, ``dh = g @ B.T``, two split-K factor gradients, ``dh @ A.T``) plus slices, adds and
casts. Three kernels do the same arithmetic, reading each activation once or twice:

- forward, per tile of rows: ``h = x @ A`` and ``low = (h @ B) * scaling``;
- backward, per tile of rows: ``dl = g * scaling``, ``dh = dl @ B.T`` and ``dh @ A.T``;
- backward, per slice of rows and block of columns: ``dA = x.T @ dh`` and ``dB = h.T @ dl``, in
  float32, left in 16 slices that XLA sums inside the optimizer's own fusion.

The frozen layer's GEMMs (``x @ W + b`` and ``g @ W.T``) and the two sums (``y = base + low``,
``dx = dx_base + dh @ A.T``) stay XLA's, which fuses the bias and the sums into its GEMMs or
their consumers.

The roundings are the plain formula's (``h``, ``h @ B``, ``dl`` and ``dh`` rounded to the compute
dtype where autodiff of the three ``nnx.Linear`` layers rounds them; sums in float32), except the
factor gradients, which stay float32 where autodiff rounds them to the compute dtype first (as
:func:`flax_impl.fused.lora_linear` does). Only the accumulation order of the rank-``r`` GEMMs
differs, as it does between two GEMM libraries.

Where it applies (:func:`can_use`; elsewhere the layer takes its usual path): the switch is on
(:func:`enabled`, ``set_enabled`` or ``FLAX_IMPL_PALLAS=1``), the three layers are plain
``nnx.Linear`` (the factors without bias, no dropout, no DoRA), input, layer and factors share a
16-bit compute dtype, the rank is a power of two from 16 to 128 (Triton's MMA tiles), and the
feature sizes and token count are multiples of 16. The kernels are lowered for CUDA only
(``jax.lax.platform_dependent``): on a CPU or TPU the same function runs the plain XLA path, so a
jitted step that uses them runs everywhere. No torch twin: ``torch_impl.fused`` is the torch side
of the same idea, written against cuBLAS.

Off by default because it measured slower: on one H100 (2026-12-07, BERT-base 32 x 128, bf16,
rank 16, ``jax.jit`` AdamW step) q,k,v,o took 12.73 ms against 12.54 ms for XLA's autodiff
(1.431x and 1.410x the frozen floor) although the step launched 947 kernels instead of 1179;
q,v 11.04 against 10.86 ms (``benchmarks/results/flax_optins_h100.md``). What a step launches can
be counted without a GPU by ``benchmarks/gpu_kernels_aot.py``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from typing import cast

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as _dtypes

__all__ = ["can_use", "enabled", "is_enabled", "lora_linear", "set_enabled"]

_ENABLED = os.environ.get("FLAX_IMPL_PALLAS", "0").strip().lower() in ("1", "true", "yes", "on")
# Tests run the kernels on the CPU through Pallas' interpreter (the CUDA lowering needs a GPU).
_INTERPRET = False
_F32 = jnp.float32
_AT_B = (((0,), (0,)), ((), ()))  # dot_general dimension numbers of a.T @ b
_A_BT = (((1,), (1,)), ((), ()))  # and of a @ b.T
_COMPUTE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Rows per program of the row kernels: about 128 programs fill the H100's 132 SMs.
_TARGET_TILES = 128
# The factor-gradient kernel leaves its float32 sums in at most 16 row slices, which XLA adds in
# the optimizer's own fusion: XLA:GPU emits a column reduction of fewer than 32 rows as a loop it
# fuses with its consumer (the AdamW update), where 128 slices took a reduction kernel of their
# own per factor (simulated H100: 2 kernels more per adapted layer).
_SLICES = 16


def set_enabled(enabled: bool) -> bool:
    """Switch the Pallas kernels on or off for every :class:`~flax_impl.adapters.LoRA`; read when
    a function is traced. Returns the previous setting.

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
    """Whether the Pallas kernels are switched on (see :func:`set_enabled`).

    Example
    -------
    >>> is_enabled()
    False
    """
    return _ENABLED


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Within the block (at trace time), LoRA layers that :func:`can_use` take the kernels.

    Example
    -------
    >>> with enabled():
    ...     is_enabled()
    True
    """
    previous = set_enabled(True)
    try:
        yield
    finally:
        set_enabled(previous)


def _power_of_two_block(size: int, rows: int = 16) -> int | None:
    """Columns per load: the largest power of two from 16 to 256 dividing ``size`` (Triton's
    loads are power-of-two shaped), at most 16,384 elements a ``(rows, columns)`` load, or None."""
    block = max(16, min(256, 2**14 // rows))
    while block >= 16:
        if size % block == 0:
            return block
        block //= 2
    return None


def _rows_per_tile(tokens: int) -> int | None:
    """Rows per program of the row kernels (forward, ``dh`` and ``dx``): about
    ``_TARGET_TILES`` programs, 16 to 256 rows each; None if no such tile divides ``tokens``."""
    rows = 16
    while rows < 256 and tokens // rows > _TARGET_TILES:
        rows *= 2
    return rows if tokens % rows == 0 else None


def _tile_rows(tokens: int) -> int:
    rows = _rows_per_tile(tokens)
    if rows is None:
        raise ValueError(
            f"{tokens} tokens: no tile of 16 to 256 rows divides them (can_use refuses this input)"
        )
    return rows


def _slices(tokens: int) -> tuple[int, int]:
    """(row slices, rows per step) of the factor-gradient kernel: up to ``_SLICES`` slices of
    whole 16- to 64-row steps."""
    for slices in (_SLICES, 8, 4, 2, 1):
        for rows in (64, 32, 16):
            if tokens % (slices * rows) == 0:
                return slices, rows
    raise ValueError(f"{tokens} tokens: not a multiple of 16")


def can_use(pretrained: nnx.Module, down: nnx.Module, up: nnx.Module, x: jax.Array) -> bool:
    """Whether :func:`lora_linear` applies to this layer and input (see the module doc).

    Example
    -------
    >>> bf16 = jnp.bfloat16
    >>> base = nnx.Linear(64, 32, dtype=bf16, rngs=nnx.Rngs(0))
    >>> down = nnx.Linear(64, 16, use_bias=False, dtype=bf16, rngs=nnx.Rngs(1))
    >>> up = nnx.Linear(16, 32, use_bias=False, dtype=bf16, rngs=nnx.Rngs(2))
    >>> x = jnp.ones((4, 16, 64), bf16)
    >>> with enabled():
    ...     can_use(base, down, up, x), can_use(base, down, up, x.astype(jnp.float32))
    (True, False)
    """
    from .fused import _plain_linear

    if not _ENABLED or not all(_plain_linear(layer) for layer in (pretrained, down, up)):
        return False
    # (``cast``: _plain_linear found all three plain nnx.Linear.)
    pretrained, down, up = cast(tuple[nnx.Linear, nnx.Linear, nnx.Linear], (pretrained, down, up))
    layers = (pretrained, down, up)
    if down.bias is not None or up.bias is not None or any(layer.precision is not None for layer in layers):
        return False
    dtype = jnp.dtype(pretrained.dtype) if pretrained.dtype is not None else None
    if (
        dtype not in _COMPUTE_DTYPES
        or x.dtype != dtype
        or {jnp.dtype(down.dtype), jnp.dtype(up.dtype)} != {dtype}
    ):
        return False
    n_in, rank = down.kernel.shape
    n_out = up.kernel.shape[1]
    tokens = math.prod(x.shape[:-1])
    rows = _rows_per_tile(tokens)
    return (
        x.ndim >= 2
        and rank in (16, 32, 64, 128)
        and rows is not None
        and _power_of_two_block(n_in, rows) is not None
        and _power_of_two_block(n_out, rows) is not None
    )


def lora_linear(
    pretrained: nnx.Linear, down: nnx.Linear, up: nnx.Linear, scaling: float, x: jax.Array
) -> jax.Array:
    """``pretrained(x) + up(down(x)) * scaling`` through the kernels on a CUDA GPU, through XLA
    elsewhere; for layers :func:`can_use` accepts.

    Example
    -------
    >>> bf16 = jnp.bfloat16
    >>> base = nnx.Linear(64, 32, dtype=bf16, rngs=nnx.Rngs(0))
    >>> down = nnx.Linear(64, 16, use_bias=False, dtype=bf16, rngs=nnx.Rngs(1))
    >>> up = nnx.Linear(16, 32, use_bias=False, dtype=bf16, rngs=nnx.Rngs(2))
    >>> x = jnp.ones((4, 16, 64), bf16)
    >>> plain = base(x) + up(down(x)) * 0.5
    >>> bool(jnp.array_equal(lora_linear(base, down, up, 0.5, x), plain))
    True
    """
    bias = pretrained.bias[...] if pretrained.bias is not None else None
    return _lora(float(scaling), x, pretrained.kernel[...], bias, down.kernel[...], up.kernel[...])


# --- the kernels ------------------------------------------------------------------------------


def _forward_kernel(x_ref, down_ref, up_ref, low_ref, h_ref, *, scaling, block_in, block_out):
    """Per row tile: ``h = x @ A`` and ``low = (h @ B) * scaling``, each rounded as autodiff
    of the plain formula rounds it."""
    from jax.experimental import pallas as pl

    rows, n_in = x_ref.shape
    rank, n_out = up_ref.shape
    dtype = x_ref.dtype

    def down_step(k, acc):
        columns = pl.ds(k * block_in, block_in)
        return acc + jnp.dot(
            x_ref[:, columns], down_ref[columns, :].astype(dtype), preferred_element_type=_F32
        )

    h = jax.lax.fori_loop(0, n_in // block_in, down_step, jnp.zeros((rows, rank), _F32)).astype(dtype)
    h_ref[...] = h

    def up_step(j, carry):
        columns = pl.ds(j * block_out, block_out)
        low = jnp.dot(h, up_ref[:, columns].astype(dtype), preferred_element_type=_F32).astype(dtype)
        low_ref[:, columns] = (low.astype(_F32) * scaling).astype(dtype)
        return carry

    jax.lax.fori_loop(0, n_out // block_out, up_step, 0)


def _backward_rows_kernel(g_ref, down_ref, up_ref, dx_ref, dh_ref, *, scaling, block_in, block_out):
    """Per row tile: ``dh = (g * scaling) @ B.T`` and the low-rank part of ``dx``, ``dh @ A.T``."""
    from jax.experimental import pallas as pl

    rows, n_in = dx_ref.shape
    rank, n_out = up_ref.shape
    dtype = dh_ref.dtype

    def up_step(j, dh):
        columns = pl.ds(j * block_out, block_out)
        d_low = (g_ref[:, columns].astype(_F32) * scaling).astype(dtype)
        up = up_ref[:, columns].astype(dtype)
        return dh + jax.lax.dot_general(d_low, up, _A_BT, preferred_element_type=_F32)

    dh = jax.lax.fori_loop(0, n_out // block_out, up_step, jnp.zeros((rows, rank), _F32)).astype(dtype)
    dh_ref[...] = dh

    def down_step(k, carry):
        columns = pl.ds(k * block_in, block_in)
        down = down_ref[columns, :].astype(dtype)
        dx_ref[:, columns] = jax.lax.dot_general(dh, down, _A_BT, preferred_element_type=_F32).astype(dtype)
        return carry

    jax.lax.fori_loop(0, n_in // block_in, down_step, 0)


def _factor_gradients_kernel(
    x_ref, dh_ref, h_ref, g_ref, d_down_ref, d_up_ref, *, scaling, rows, block_in, block_out, slice_rows
):
    """Program (slice s, column block c): the sums over slice ``s``'s rows of ``x.T @ dh`` (the
    first ``in / block_in`` blocks: ``dA``'s rows) or of ``h.T @ (g * scaling)`` (the others:
    ``dB``'s columns)."""
    from jax.experimental import pallas as pl

    first = pl.program_id(0) * slice_rows
    column = pl.program_id(1)
    blocks_in = x_ref.shape[1] // block_in
    rank = dh_ref.shape[1]
    dtype = dh_ref.dtype

    @pl.when(column < blocks_in)
    def _():
        columns = pl.ds(column * block_in, block_in)

        def step(i, acc):
            at = pl.ds(first + i * rows, rows)
            return acc + jax.lax.dot_general(
                x_ref[at, columns], dh_ref[at, :], _AT_B, preferred_element_type=_F32
            )

        d_down_ref[0, columns, :] = jax.lax.fori_loop(
            0, slice_rows // rows, step, jnp.zeros((block_in, rank), _F32)
        )

    @pl.when(column >= blocks_in)
    def _():
        columns = pl.ds((column - blocks_in) * block_out, block_out)

        def step(i, acc):
            at = pl.ds(first + i * rows, rows)
            d_low = (g_ref[at, columns].astype(_F32) * scaling).astype(dtype)
            return acc + jax.lax.dot_general(h_ref[at, :], d_low, _AT_B, preferred_element_type=_F32)

        d_up_ref[0, :, columns] = jax.lax.fori_loop(
            0, slice_rows // rows, step, jnp.zeros((rank, block_out), _F32)
        )


def _compiler_params():
    if _INTERPRET:
        return None
    from jax.experimental.pallas import triton as pallas_triton

    return pallas_triton.CompilerParams(num_warps=4, num_stages=2)


def _row_kernel_call(kernel, operand, down, up, columns_out: int, scaling: float, name: str):
    """A kernel over tiles of rows of ``operand`` (``x`` or ``g``) with both factors whole,
    writing ``(tokens, columns_out)`` and ``(tokens, rank)`` in the compute dtype."""
    from jax.experimental import pallas as pl

    tokens, columns_in = operand.shape
    n_in, rank = down.shape
    rows = _tile_rows(tokens)
    blocks = {
        "block_in": _power_of_two_block(n_in, rows),
        "block_out": _power_of_two_block(up.shape[1], rows),
    }
    return pl.pallas_call(
        functools.partial(kernel, scaling=scaling, **blocks),
        out_shape=(
            jax.ShapeDtypeStruct((tokens, columns_out), operand.dtype),
            jax.ShapeDtypeStruct((tokens, rank), operand.dtype),
        ),
        grid=(tokens // rows,),
        in_specs=[
            pl.BlockSpec((rows, columns_in), lambda i: (i, 0)),
            pl.BlockSpec(down.shape, lambda i: (0, 0)),
            pl.BlockSpec(up.shape, lambda i: (0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((rows, columns_out), lambda i: (i, 0)),
            pl.BlockSpec((rows, rank), lambda i: (i, 0)),
        ],
        interpret=_INTERPRET,
        compiler_params=_compiler_params(),
        name=name,
    )(operand, down, up)


def _pallas_forward(x, down, up, scaling):
    """``((h @ B) * scaling, h)`` with ``h = x @ A``, per tile of rows."""
    return _row_kernel_call(_forward_kernel, x, down, up, up.shape[1], scaling, "lora_forward")


def _pallas_backward(g, x, h, down, up, scaling):
    """``(dh @ A.T, dA, dB)`` for the cotangent ``g`` of the layer's output."""
    from jax.experimental import pallas as pl

    tokens, n_in = x.shape
    rank, n_out = up.shape
    dx, dh = _row_kernel_call(_backward_rows_kernel, g, down, up, n_in, scaling, "lora_backward_rows")
    slices, step_rows = _slices(tokens)
    block_in, block_out = _power_of_two_block(n_in, 128), _power_of_two_block(n_out, 128)
    whole = lambda s, c: (0, 0)  # noqa: E731 (each program indexes its own rows and columns)
    d_down, d_up = pl.pallas_call(
        functools.partial(
            _factor_gradients_kernel,
            scaling=scaling,
            rows=step_rows,
            block_in=block_in,
            block_out=block_out,
            slice_rows=tokens // slices,
        ),
        out_shape=(
            jax.ShapeDtypeStruct((slices, n_in, rank), _F32),
            jax.ShapeDtypeStruct((slices, rank, n_out), _F32),
        ),
        grid=(slices, n_in // block_in + n_out // block_out),
        in_specs=[
            pl.BlockSpec((tokens, n_in), whole),
            pl.BlockSpec((tokens, rank), whole),
            pl.BlockSpec((tokens, rank), whole),
            pl.BlockSpec((tokens, n_out), whole),
        ],
        out_specs=[
            pl.BlockSpec((1, n_in, rank), lambda s, c: (s, 0, 0)),
            pl.BlockSpec((1, rank, n_out), lambda s, c: (s, 0, 0)),
        ],
        interpret=_INTERPRET,
        compiler_params=_compiler_params(),
        name="lora_factor_gradients",
    )(x, dh, h, g)
    return dx, jnp.sum(d_down, axis=0), jnp.sum(d_up, axis=0)


# --- the same arithmetic in XLA (CPU, TPU) ----------------------------------------------------


def _xla_forward(x, down, up, scaling):
    h = jnp.dot(x, down.astype(x.dtype))
    return jnp.dot(h, up.astype(x.dtype)) * scaling, h


def _xla_backward(g, x, h, down, up, scaling):
    dtype = x.dtype
    d_low = (g * scaling).astype(dtype)
    d_up = jax.lax.dot_general(h, d_low, _AT_B, preferred_element_type=_F32)
    dh = jnp.dot(d_low, up.astype(dtype).T)
    d_down = jax.lax.dot_general(x, dh, _AT_B, preferred_element_type=_F32)
    return jnp.dot(dh, down.astype(dtype).T), d_down, d_up


def _on_cuda(pallas_version, xla_version, *args):
    if _INTERPRET:
        return pallas_version(*args)
    return jax.lax.platform_dependent(*args, cuda=pallas_version, default=xla_version)


# --- the layer under custom_vjp ---------------------------------------------------------------


def _base(x, kernel, bias):
    xb, kb, bb = _dtypes.promote_dtype((x, kernel, bias), dtype=x.dtype)
    y = jnp.dot(xb, kb)
    return y if bb is None else y + bb


def _forward(scaling, x, kernel, bias, down, up):
    x2 = x.reshape(-1, x.shape[-1])
    low, h = _on_cuda(
        functools.partial(_pallas_forward, scaling=scaling),
        functools.partial(_xla_forward, scaling=scaling),
        x2,
        down,
        up,
    )
    # The frozen layer's GEMM and the sum stay XLA's: it fuses the bias and this add into the
    # GEMM or its consumers.
    y = _base(x2, kernel, bias) + low
    return y.reshape(x.shape[:-1] + (y.shape[-1],)), (x2, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora(scaling, x, kernel, bias, down, up):
    return _forward(scaling, x, kernel, bias, down, up)[0]


def _lora_fwd(scaling, x, kernel, bias, down, up):
    y, (x2, h) = _forward(scaling, x, kernel, bias, down, up)
    return y, (x2, h, x.shape, kernel, bias, down, up)


def _lora_bwd(scaling, residuals, g):
    x2, h, shape, kernel, bias, down, up = residuals
    g2 = g.reshape(-1, g.shape[-1])
    kb = kernel.astype(x2.dtype)
    dx_base = jnp.dot(g2, kb.T)
    # The frozen kernel's and bias' gradients: exact if someone differentiates them, dead code
    # (removed by XLA) when, as usual, nobody does.
    d_kernel = jax.lax.dot_general(x2, g2, _AT_B, preferred_element_type=_F32).astype(kernel.dtype)
    d_bias = None if bias is None else jnp.sum(g2, axis=0, dtype=_F32).astype(bias.dtype)
    dx_low, d_down, d_up = _on_cuda(
        functools.partial(_pallas_backward, scaling=scaling),
        functools.partial(_xla_backward, scaling=scaling),
        g2,
        x2,
        h,
        down,
        up,
    )
    dx = dx_base + dx_low  # autodiff's sum of the two cotangents of x, in x's dtype
    return dx.reshape(shape), d_kernel, d_bias, d_down.astype(down.dtype), d_up.astype(up.dtype)


_lora.defvjp(_lora_fwd, _lora_bwd)
