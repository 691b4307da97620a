"""Adapter checkpoints under ``torch.distributed``: DDP replicas and FSDP2-sharded parameters.

What :class:`~torch_impl.adapters.AdaptedModel`'s ``saver``/``loader`` need to work unchanged
inside a process group, and nothing else:

- under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a ``DTensor`` holding
  one shard; :func:`gather_full` turns only the tensors it is given (the trainable ones) into
  whole tensors, so a checkpoint never gathers a frozen weight;
- :func:`is_writer` says which process writes a file (rank 0 in a process group);
- :func:`shard_like` turns a whole tensor read from a file back into the shard this rank holds,
  with no communication (every rank reads the small adapter file itself).

Under DDP parameters are plain tensors, identical on every rank: nothing here changes them.
Frozen parameters need no special care under either wrapper: DDP registers only parameters that
require grad with its reducer (so they are never all-reduced), and FSDP2 reduce-scatters only
the gradients that exist.

Example
-------
>>> import torch
>>> is_writer()                       # no process group: this process writes
True
>>> gather_full({"w": torch.ones(2)})["w"]
tensor([1., 1.])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch

__all__ = ["gather_full", "is_sharded", "is_writer", "shard_like"]


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a ``DTensor`` (a parameter sharded by FSDP2 or tensor parallelism).

    Example
    -------
    >>> is_sharded(torch.zeros(3))
    False
    """
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def is_writer() -> bool:
    """Whether this process writes checkpoint files: rank 0 of an initialized process group, or
    any process outside one.

    Example
    -------
    >>> is_writer()
    True
    """
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def gather_full(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every ``DTensor`` gathered into the whole tensor, detached, on the CPU.

    A collective when any tensor is sharded: every rank of the tensors' mesh must call it with
    the same keys in the same order. Plain tensors are returned detached, where they are.

    Arguments
    ---------
    tensors: mapping of str to torch.Tensor
        E.g. the trainable entries of a ``state_dict``; only these are gathered.

    Returns
    -------
    dict of str to torch.Tensor

    Example
    -------
    >>> gather_full({"a": torch.zeros(2, requires_grad=True)})["a"].requires_grad
    False
    """
    out = {}
    for name, tensor in tensors.items():
        if is_sharded(tensor):
            # One tensor at a time: peak memory is the largest trainable tensor, not all of them.
            out[name] = cast(Any, tensor.detach()).full_tensor().cpu()
        else:
            out[name] = tensor.detach()
    return out


def shard_like(tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole, as read from a file) laid out like ``target``.

    For a ``DTensor`` target: a ``DTensor`` with ``target``'s mesh and placements, built from
    the slice of ``tensor`` this rank owns, without communication (every rank holds the whole
    tensor). A plain target gets ``tensor`` unchanged (``load_state_dict`` copies it in place).

    Arguments
    ---------
    tensor: torch.Tensor
        The whole tensor, of ``target``'s global shape.
    target: torch.Tensor
        The model's parameter or buffer it will be copied into.

    Returns
    -------
    torch.Tensor

    Example
    -------
    >>> shard_like(torch.ones(2), torch.zeros(2))
    tensor([1., 1.])
    """
    if not is_sharded(target):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    dtensor = cast(Any, target)  # a DTensor (is_sharded checked it)
    local = tensor.to(device=dtensor.to_local().device, dtype=target.dtype)
    return distribute_tensor(local, dtensor.device_mesh, dtensor.placements, src_data_rank=None)


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor
