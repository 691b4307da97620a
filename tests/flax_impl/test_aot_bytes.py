"""``benchmarks/gpu_kernels_aot.py``'s byte count of an optimised HLO program (what each launched
kernel kind writes), read on a program compiled here for the CPU: the same text format XLA:GPU's
deviceless compile gives."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.gpu_kernels_aot import written_by_kind


def test_written_bytes_are_the_launched_outputs_sizes():
    def f(x, y):
        return jnp.sin(x) @ y, jnp.cos(y).astype(jnp.bfloat16)

    x = jnp.ones((8, 16), jnp.float32)
    y = jnp.ones((16, 4), jnp.float32)
    text = jax.jit(f).lower(x, y).compile().as_text()
    written = written_by_kind(text)
    total = sum(size for _, size in written.values())
    # The two results at least (8 x 4 float32, 16 x 4 bfloat16); at most those plus sin(x) once.
    assert 8 * 4 * 4 + 16 * 4 * 2 <= total <= 8 * 4 * 4 + 16 * 4 * 2 + 8 * 16 * 4
    assert all(n >= 1 for n, _ in written.values())
    assert not any(kind in ("parameter", "tuple", "constant") for kind in written)
