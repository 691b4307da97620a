"""examples.adam_state: Flax training picks up torch AdamW's step count and moments exactly."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import converters  # noqa: E402
import flax_impl  # noqa: E402
import torch_impl  # noqa: E402
from examples.adam_state import AdamStateError, torch_adamw_to_optax  # noqa: E402
from tests.zoo import flax_models, torch_models  # noqa: E402

LR, BETAS, EPS, DECAY = 1e-2, (0.9, 0.999), 1e-8, 0.01


def adapted_pair():
    """LoRA on ``layer1`` and ``layer2`` unfrozen: adapters and a plain layer both train."""
    torch.manual_seed(0)
    kwargs = {"target_layers": ["layer1"], "unfrozen_layers": ["layer2"], "adapter_kwargs": {"rank": 2}}
    torch_model = torch_impl.AdaptedModel(torch_models.MLP(), torch_impl.LoRA, **kwargs)
    flax_model = flax_impl.AdaptedModel(
        flax_models.MLP(rngs=nnx.Rngs(0)), flax_impl.LoRA, **kwargs, rngs=nnx.Rngs(1)
    )
    return torch_model, flax_model


def batches(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32))
        for _ in range(n)
    ]


def torch_steps(model, optimizer, data) -> list[float]:
    losses = []
    for x, y in data:
        loss = torch.nn.functional.mse_loss(model(torch.from_numpy(x)), torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def flax_steps(model, optimizer, data) -> list[float]:
    def loss_fn(model, x, y):
        return jnp.mean((model(jnp.asarray(x)) - jnp.asarray(y)) ** 2)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))
    losses = []
    for x, y in data:
        loss, grads = grad_fn(model, x, y)
        optimizer.update(model, grads)
        losses.append(float(loss))
    return losses


def trained_then_converted(carry_state: bool):
    """Train in torch for 3 steps, convert, then 4 more steps in torch and in Flax."""
    torch_model, flax_model = adapted_pair()
    trainable = [p for p in torch_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY)
    data = batches(7)
    torch_steps(torch_model, optimizer, data[:3])
    converters.torch_to_flax(torch_model, flax_model)
    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=DECAY)
    flax_optimizer = nnx.Optimizer(flax_model, tx, wrt=flax_model.trainable)
    if carry_state:
        assert torch_adamw_to_optax(optimizer, [torch_model], [flax_model], [flax_optimizer]) == 3
    flax_losses = flax_steps(flax_model, flax_optimizer, data[3:])
    torch_losses = torch_steps(torch_model, optimizer, data[3:])
    back = copy.deepcopy(torch_model)
    converters.flax_to_torch(flax_model, back)
    weight_diff = max(
        float((a - b).abs().max().detach())
        for a, b in zip(torch_model.parameters(), back.parameters(), strict=True)
    )
    return np.array(torch_losses), np.array(flax_losses), weight_diff


def test_flax_steps_after_carrying_the_adamw_state_are_the_torch_steps():
    torch_losses, flax_losses, weight_diff = trained_then_converted(carry_state=True)
    np.testing.assert_allclose(flax_losses, torch_losses, rtol=1e-5, atol=1e-6)
    assert weight_diff < 1e-5


def test_a_fresh_flax_optimizer_takes_different_steps():
    # Guards the test above: without the carried state the trajectories do part.
    torch_losses, flax_losses, weight_diff = trained_then_converted(carry_state=False)
    assert weight_diff > 1e-3
    assert not np.allclose(flax_losses[1:], torch_losses[1:], rtol=1e-5, atol=1e-6)


def test_an_untrained_torch_optimizer_is_refused_naming_the_parameter():
    torch_model, flax_model = adapted_pair()
    optimizer = torch.optim.AdamW([p for p in torch_model.parameters() if p.requires_grad], lr=LR)
    flax_optimizer = nnx.Optimizer(flax_model, optax.adamw(LR), wrt=flax_model.trainable)
    with pytest.raises(
        AdamStateError, match=r"no state for trainable parameter 'adapted_model\.layer1\.adapter"
    ):
        torch_adamw_to_optax(optimizer, [torch_model], [flax_model], [flax_optimizer])
