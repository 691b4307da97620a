"""Token lookups over meshes with ``Explicit`` axes (``jax.make_mesh``'s default).

There a gather whose indices are sharded (token ids split over ``'data'``) must name its output
sharding: ``jnp.take`` of a replicated table raises ``ShardingTypeError`` ("Use
``.at[...].get(out_sharding=)``"). The twins' token lookups go through :func:`embed_ids`, which
gives the looked-up rows the ids' sharding (data parallelism: each device embeds its own rows)
and leaves every other call alone.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from flax_impl.sharding import has_explicit_axes


def embed_ids(embed: nnx.Module, ids: jax.Array) -> jax.Array:
    """``embed(ids)``; where ``ids`` is typed over ``Explicit`` mesh axes, computed under
    ``jax.sharding.auto_axes`` with the output sharded as ``ids`` along its leading axes (the
    features replicated). ``embed`` is an ``nnx.Embed`` or an adapter wrapping one; its state
    enters ``auto_axes`` as an argument (a closed-over table keeps its explicit type there).

    >>> import jax.numpy as jnp
    >>> table = nnx.Embed(3, 2, embedding_init=nnx.initializers.ones, rngs=nnx.Rngs(0))
    >>> embed_ids(table, jnp.array([[0, 2]])).shape
    (1, 2, 2)
    """
    if not has_explicit_axes(ids):
        return embed(ids)
    sharding = jax.typeof(ids).sharding
    spec = PartitionSpec(*sharding.spec, *(None,) * (ids.ndim - len(sharding.spec)), None)
    graphdef, state = nnx.split(embed)

    def lookup(state: nnx.State, ids: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(ids)

    return jax.sharding.auto_axes(lookup, out_sharding=spec)(state, ids)
