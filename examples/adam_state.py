"""Carry PyTorch AdamW's state (step count and moments) over to optax's ``adamw`` in Flax NNX.

Converting only the weights and starting Flax with a fresh optimizer restarts Adam's bias
correction: the first Flax steps move every trainable weight by about the full learning rate,
which knocks a converged model off its minimum. The moments are tensors shaped like the
parameters they belong to, so ``converters`` moves them with the same names and layout rules as
the weights (a Linear's ``(out, in)`` moment becomes an ``(in, out)`` one): each moment dict is
converted onto a scratch copy of the Flax model, whose trainable state is then the moment tree
that ``nnx.Optimizer`` keeps.

torch ``AdamW`` and ``optax.adamw`` with the same ``lr``, ``betas``/``b1, b2``, ``eps`` and
``weight_decay`` compute the same update, so training continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["AdamStateError", "torch_adamw_to_optax"]


class AdamStateError(ValueError):
    """The PyTorch optimizer state does not fit the Flax optimizers it should fill."""


def torch_adamw_to_optax(
    torch_optimizer: Any,
    torch_modules: Sequence[Any],
    flax_modules: Sequence[Any],
    flax_optimizers: Sequence[Any],
) -> int:
    """Copy ``torch_optimizer``'s step and ``exp_avg``/``exp_avg_sq`` into ``flax_optimizers``.

    Arguments
    ---------
    torch_optimizer: torch.optim.AdamW
        The optimizer that trained ``torch_modules`` (one or several param groups).
    torch_modules, flax_modules: sequences of modules
        Twin modules, pairwise (same dotted names); the Flax ones already hold the converted weights.
    flax_optimizers: sequence of nnx.Optimizer
        ``nnx.Optimizer(flax_module, optax.adamw(...), wrt=...)``, one per Flax module.

    Returns
    -------
    int
        The step count carried over.
    """
    import jax.numpy as jnp
    from flax import nnx

    import converters

    steps = set()
    for torch_module, flax_module, optimizer in zip(
        torch_modules, flax_modules, flax_optimizers, strict=True
    ):
        moments: dict[str, dict[str, Any]] = {"mu": {}, "nu": {}}
        for name, param in torch_module.named_parameters():
            if not param.requires_grad:
                continue
            state = torch_optimizer.state.get(param)
            if not state:
                raise AdamStateError(f"the PyTorch optimizer holds no state for trainable parameter {name!r}")
            moments["mu"][name] = state["exp_avg"].detach()
            moments["nu"][name] = state["exp_avg_sq"].detach()
            steps.add(int(state["step"]))
        adam = _scale_by_adam_state(optimizer)
        for key, tensors in moments.items():
            scratch = nnx.clone(flax_module)
            # Moments exist for the trainable parameters only: the frozen ones are missing on purpose.
            report = converters.torch_to_flax(tensors, scratch, strict=False)
            if report.unexpected or set(report.loaded) != set(tensors):
                raise AdamStateError(
                    f"{key}: moments that do not fit the Flax model: unexpected {report.unexpected}, "
                    f"not loaded {sorted(set(tensors) - set(report.loaded))}"
                )
            converted = dict(nnx.to_flat_state(nnx.state(scratch, optimizer.wrt)))
            slots = dict(nnx.to_flat_state(getattr(adam, key)))
            if converted.keys() != slots.keys():
                raise AdamStateError(
                    f"{key}: the converted moments cover {sorted(map(str, converted))[:4]}..., "
                    f"the Flax optimizer expects {sorted(map(str, slots))[:4]}..."
                )
            for path, slot in slots.items():
                slot.value = converted[path].value
    if len(steps) != 1:
        raise AdamStateError(f"parameters were trained for different numbers of steps: {sorted(steps)}")
    (step,) = steps
    for optimizer in flax_optimizers:
        adam = _scale_by_adam_state(optimizer)
        adam.count.value = jnp.asarray(step, adam.count.value.dtype)
        optimizer.step.value = jnp.asarray(step, optimizer.step.value.dtype)
    return step


def _scale_by_adam_state(optimizer: Any) -> Any:
    """The ``ScaleByAdamState`` inside an ``optax.adamw`` chain's state."""
    import optax

    found = [s for s in optimizer.opt_state if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise AdamStateError(
            f"expected an optax.adamw optimizer, found state {type(optimizer.opt_state).__name__}"
        )
    return found[0]
