"""Run a twin pair in both frameworks and collect comparable numbers (shared by tests and the report).

Everything is compared in PyTorch's names and layouts. The Flax side is read with
:func:`flax_in_torch_layout`, a walk written here on purpose (module type -> layer kind ->
``twinformat.kinds``) rather than the converters' or ``flax_impl.checkpoint``'s, so that the
suite checks the conversion code against an independent reading instead of against itself.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import converters
import flax_impl
import torch_impl
from flax_impl.graph import get_submodule
from flax_impl.models._speech import SpeechModel, WeightNorm, WeightNormConv
from flax_impl.models.wavlm import WavLMAttention
from tests.zoo.pairs import PAIRS, AdapterCase, Batch, Pair
from twinformat import kinds as layout
from twinformat.names import dotted

PAIRS_BY_NAME = {pair.name: pair for pair in PAIRS}

#: Identical AdamW hyper-parameters on both sides. Set explicitly: the defaults differ
#: (torch weight_decay=0.01, optax 1e-4).
LEARNING_RATE = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
STEPS = 10

_FLAX_KINDS: tuple[tuple[type, str], ...] = (
    (nnx.Linear, "linear"),
    (nnx.Conv, "conv"),
    (nnx.LayerNorm, "layernorm"),
    (nnx.GroupNorm, "groupnorm"),
    (nnx.Embed, "embedding"),
    (nnx.BatchNorm, "batchnorm"),
    (flax_impl.LoRA, "lora"),  # its own variable: DoRA's adapter_magnitude
    (WeightNorm, "conv_weight_norm"),
    (WeightNormConv, "conv"),
    (SpeechModel, "masked_spec_embed"),
    (WavLMAttention, "gated_relative_position"),
)


@dataclass
class Twins:
    """A pair adapted the same way on both sides, with the same (non-zero) weights."""

    pair: Pair
    case: AdapterCase | None
    torch_model: torch.nn.Module
    flax_model: nnx.Module


def adapted(model: Any, case: AdapterCase | None, framework: str, seed: int = 0) -> Any:
    """Wrap ``model`` in the ``AdaptedModel`` of ``framework`` ('torch' or 'flax') as ``case`` says."""
    if case is None:
        return model
    package = torch_impl if framework == "torch" else flax_impl
    kwargs: dict[str, Any] = dict(
        adapter_class=getattr(package, case.adapter_class),
        all_linear=case.all_linear,
        all_conv=case.all_conv,
        target_layers=list(case.target_layers),
        unfrozen_layers=list(case.unfrozen_layers),
        adapter_kwargs=dict(case.adapter_kwargs),
    )
    if framework == "flax":
        kwargs["rngs"] = nnx.Rngs(seed)
    return package.AdaptedModel(model, **kwargs)


def randomize_adapters(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Give every adapter parameter non-zero random values (fresh LoRA up-projections are zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)


def build_twins(pair: Pair, case: AdapterCase | None, seed: int = 0) -> Twins:
    """Build both halves, adapt them, randomize the torch adapters and convert torch -> Flax.

    The Flax half is built abstractly and filled with zeros before the conversion overwrites
    every variable (strictly: a variable the conversion missed would stay zero and fail the
    comparison). Drawing random initial weights would compile a random-number kernel per
    distinct shape, about a second each on CPU, for values that are thrown away.
    """
    torch.manual_seed(seed)
    torch_model = adapted(pair.make_torch(), case, "torch", seed)
    flax_model = placeholder(lambda: adapted(pair.make_flax(nnx.Rngs(seed + 1)), case, "flax", seed + 1))
    randomize_adapters(torch_model, seed)
    torch_model.eval()
    flax_model.eval()
    converters.torch_to_flax(torch_model, flax_model)
    return Twins(pair, case, torch_model, flax_model)


def placeholder(make: Callable[[], nnx.Module]) -> nnx.Module:
    """The module ``make()`` builds, with every variable zero (RNG keys: a zero key), built without
    running its initializers."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.tree.map(_zeros, state))


def _zeros(abstract: jax.ShapeDtypeStruct) -> jax.Array:
    if jax.dtypes.issubdtype(abstract.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(jnp.zeros((*abstract.shape, 2), jnp.uint32), impl="threefry2x32")
    return jnp.zeros(abstract.shape, abstract.dtype)


# ---------------------------------------------------------------------------------------------
# Reading both sides in PyTorch's names and layouts


def flax_kind(module: object) -> str:
    """The layer kind of an NNX module, from its type."""
    for module_type, kind in _FLAX_KINDS:
        if isinstance(module, module_type):
            return kind
    raise TypeError(f"no layer kind for {type(module).__name__}")


def flax_in_torch_layout(model: nnx.Module, state: nnx.State | None = None) -> dict[str, np.ndarray]:
    """The parameters in ``state`` (default: all of ``model``'s), under PyTorch names and layouts.

    ``state`` may be a gradient state returned by ``nnx.grad``: its paths are the model's.
    """
    state = nnx.state(model, nnx.Param) if state is None else state
    out = {}
    for path, variable in nnx.to_flat_state(state):
        module_name = dotted(path[:-1])
        # A copy: a later in-place change elsewhere must not change what was read.
        value = np.array(variable.get_value() if hasattr(variable, "get_value") else variable)
        kind = flax_kind(get_submodule(model, module_name))
        torch_leaf, array = layout.flax_to_torch(kind, str(path[-1]), value)
        out[dotted((*path[:-1], torch_leaf)) if module_name else torch_leaf] = array
    return out


# ---------------------------------------------------------------------------------------------
# Forward, gradients, training


@dataclass(frozen=True)
class CaseResult:
    """What both frameworks computed for one (pair, adapter case), in PyTorch names and layouts.

    Outputs and gradients are taken at the converted starting weights, on the first of the
    ``STEPS`` AdamW steps; ``*_after`` hold every parameter after the last step;
    ``converted_back`` is the ``state_dict`` of a torch model filled by ``converters.flax_to_torch``
    from the trained Flax model.
    """

    torch_outputs: list[np.ndarray]
    flax_outputs: list[np.ndarray]
    base_outputs: list[np.ndarray]
    torch_grads: dict[str, np.ndarray]
    flax_grads: dict[str, np.ndarray]
    torch_before: dict[str, np.ndarray]
    torch_after: dict[str, np.ndarray]
    flax_after: dict[str, np.ndarray]
    converted_back: dict[str, np.ndarray]


@functools.cache
def run_case(pair_name: str, case_name: str, seed: int = 0) -> CaseResult:
    """:func:`run_pair` for a zoo pair and adapter case, by name. Cached: the forward, gradient
    and training tests of one case read the same run."""
    pair = PAIRS_BY_NAME[pair_name]
    return run_pair(pair, pair.case(case_name), seed)


def run_pair(pair: Pair, case: AdapterCase, seed: int = 0, steps: int = STEPS) -> CaseResult:
    """Build the twins of ``pair`` adapted as ``case``, train both sides ``steps`` steps, keep the numbers."""
    twins = build_twins(pair, case, seed)
    batch = pair.make_batch(np.random.default_rng(seed))
    torch.manual_seed(seed)  # build_twins seeded the base model the same way: same base weights
    with torch.no_grad():
        base_outputs = [out.numpy() for out in pair.run_torch(pair.make_torch().eval(), batch)]
    targets = make_targets(base_outputs, seed + 1)
    torch_before = torch_state_dict(twins.torch_model)

    torch_outputs, torch_grads = train_torch(twins, batch, targets, steps)
    flax_outputs, flax_grads = train_flax(twins, batch, targets, steps)

    return CaseResult(
        torch_outputs=torch_outputs,
        flax_outputs=flax_outputs,
        base_outputs=base_outputs,
        torch_grads=torch_grads,
        flax_grads=flax_grads,
        torch_before=torch_before,
        torch_after=torch_state_dict(twins.torch_model),
        flax_after=flax_in_torch_layout(twins.flax_model),
        converted_back=convert_back(twins),
    )


def torch_outputs(twins: Twins, batch: Batch) -> list[np.ndarray]:
    """The PyTorch half's outputs, as numpy."""
    with torch.no_grad():
        return [out.numpy() for out in twins.pair.run_torch(twins.torch_model, batch)]


def flax_outputs(twins: Twins, batch: Batch) -> list[np.ndarray]:
    """The Flax half's outputs (run eagerly), as numpy."""
    return [np.asarray(out) for out in twins.pair.run_flax(twins.flax_model, batch)]


def make_targets(outputs: Sequence[np.ndarray], seed: int = 1) -> list[np.ndarray]:
    """Fixed random regression targets shaped like the outputs."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(out.shape).astype(np.float32) for out in outputs]


def torch_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """``state_dict()`` as numpy copies."""
    return {name: t.detach().numpy().copy() for name, t in model.state_dict().items()}


def train_torch(
    twins: Twins, batch: Batch, targets: Sequence[np.ndarray], steps: int = STEPS
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """``steps`` of ``torch.optim.AdamW`` on the parameters that require grad (in place).

    Returns the outputs and the gradients of the first step (at the starting weights).
    """
    named = [(name, p) for name, p in twins.torch_model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [p for _, p in named], lr=LEARNING_RATE, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY
    )
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        outputs = twins.pair.run_torch(twins.torch_model, batch)
        loss = sum(((out - torch.from_numpy(t)) ** 2).mean() for out, t in zip(outputs, targets, strict=True))
        loss.backward()
        if step == 0:
            first_outputs = [out.detach().numpy().copy() for out in outputs]
            first_grads = {
                name: np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy().copy()
                for name, p in named
            }
        optimizer.step()
    return first_outputs, first_grads


def train_flax(
    twins: Twins, batch: Batch, targets: Sequence[np.ndarray], steps: int = STEPS
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """``steps`` of ``optax.adamw`` with the same hyper-parameters (in place, one jit-compiled step).

    Gradients are taken with respect to ``model.trainable`` only. Returns the outputs and the
    gradients (PyTorch names and layouts) of the first step.
    """
    model, pair = twins.flax_model, twins.pair
    tx = optax.adamw(
        LEARNING_RATE, b1=BETAS[0], b2=BETAS[1], eps=EPS, eps_root=0.0, weight_decay=WEIGHT_DECAY
    )
    optimizer = nnx.Optimizer(model, tx, wrt=model.trainable)
    graphdef, state = nnx.split((model, optimizer))
    batch = {key: jnp.asarray(value) for key, value in batch.items()}
    targets = [jnp.asarray(t) for t in targets]

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        outputs = pair.run_flax(model, batch)
        return sum(jnp.mean((out - t) ** 2) for out, t in zip(outputs, targets, strict=True)), outputs

    def step(state: nnx.State) -> tuple[nnx.State, tuple[jax.Array, ...], nnx.State]:
        model, optimizer = nnx.merge(graphdef, state)
        grad_fn = nnx.grad(loss_fn, argnums=nnx.DiffState(0, model.trainable), has_aux=True)
        grads, outputs = grad_fn(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), outputs, grads

    # XLA's backend optimisations change nothing we compare and take half the compile time.
    step = jax.jit(step, compiler_options={"xla_backend_optimization_level": 0})
    for i in range(steps):
        state, outputs, grads = step(state)
        if i == 0:
            first_outputs = [np.asarray(out) for out in outputs]
            first_grads = flax_in_torch_layout(model, grads)
    nnx.update((model, optimizer), state)
    return first_outputs, first_grads


def torch_gradients(twins: Twins, batch: Batch, targets: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Gradients of the parameters that require grad, by ``state_dict`` name (no optimizer step)."""
    twins.torch_model.zero_grad(set_to_none=True)
    outputs = twins.pair.run_torch(twins.torch_model, batch)
    sum(((out - torch.from_numpy(t)) ** 2).mean() for out, t in zip(outputs, targets, strict=True)).backward()
    return {
        name: p.grad.numpy().copy() for name, p in twins.torch_model.named_parameters() if p.requires_grad
    }


def flax_gradients(twins: Twins, batch: Batch, targets: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Gradients of the ``trainable`` parameters (run eagerly), by PyTorch name and layout."""
    model, pair = twins.flax_model, twins.pair

    def loss_fn(model: nnx.Module) -> jax.Array:
        outputs = pair.run_flax(model, batch)
        return sum(jnp.mean((out - t) ** 2) for out, t in zip(outputs, targets, strict=True))

    return flax_in_torch_layout(model, nnx.grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))(model))


def convert_back(twins: Twins) -> dict[str, np.ndarray]:
    """``converters.flax_to_torch`` into a copy of the torch model; its ``state_dict`` as numpy."""
    target = copy.deepcopy(twins.torch_model)
    converters.flax_to_torch(twins.flax_model, target)
    return torch_state_dict(target)


# ---------------------------------------------------------------------------------------------
# The real pretrained BERT


def minilm_twins(
    torch_model: torch.nn.Module, case: AdapterCase | None
) -> tuple[torch.nn.Module, nnx.Module]:
    """Adapt a pretrained ``transformers.BertModel`` as ``case`` says (non-zero adapters) and
    convert it into a ``flax_impl.models.BertModel`` adapted the same way."""
    from flax_impl.models import BertModel

    torch_model = adapted(torch_model, case, "torch")
    randomize_adapters(torch_model, scale=0.05)
    config = torch_model.config  # an AdaptedModel forwards attributes to the wrapped model
    flax_model = placeholder(lambda: adapted(BertModel(config, rngs=nnx.Rngs(0)), case, "flax"))
    torch_model.eval()
    flax_model.eval()
    converters.torch_to_flax(torch_model, flax_model)
    return torch_model, flax_model


def min_token_cosine(a: np.ndarray, b: np.ndarray, attention_mask: np.ndarray) -> float:
    """The smallest cosine similarity between ``a`` and ``b`` ``(batch, seq, hidden)`` over real tokens."""
    keep = attention_mask.astype(bool)
    a, b = a[keep].astype(np.float64), b[keep].astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


# ---------------------------------------------------------------------------------------------
# Comparing


def max_abs_diff(expected: Mapping[str, np.ndarray] | Sequence[np.ndarray], actual: Any) -> float:
    """The largest absolute difference over matching entries (keys must agree)."""
    if isinstance(expected, Mapping):
        assert sorted(expected) == sorted(actual), _key_difference(expected, actual)
        pairs = [(expected[k], actual[k]) for k in expected]
    else:
        pairs = list(zip(expected, actual, strict=True))
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) for a, b in pairs)


def assert_close(
    expected: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    actual: Any,
    *,
    atol: float,
    rtol: float,
    what: str,
) -> None:
    """``allclose`` entry by entry, the ``atol`` scaled by the entry's magnitude when above 1.

    The failure message names the entry, its largest difference and its magnitude.
    """
    if isinstance(expected, Mapping):
        assert sorted(expected) == sorted(actual), f"{what}: {_key_difference(expected, actual)}"
        items = [(k, expected[k], actual[k]) for k in expected]
    else:
        items = [(str(i), e, a) for i, (e, a) in enumerate(zip(expected, actual, strict=True))]
    for key, e, a in items:
        e, a = np.asarray(e), np.asarray(a)
        assert e.shape == a.shape, f"{what} {key}: shape {a.shape}, expected {e.shape}"
        scale = max(1.0, float(np.max(np.abs(e)))) if e.size else 1.0
        if not np.allclose(a, e, atol=atol * scale, rtol=rtol):
            raise AssertionError(
                f"{what} {key}: max abs diff {np.max(np.abs(a - e)):.3g} exceeds atol {atol * scale:.3g} "
                f"(+ rtol {rtol}); magnitude {scale:.3g}"
            )


def _key_difference(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> str:
    return (
        f"keys differ: only in expected {sorted(set(expected) - set(actual))}, "
        f"only in actual {sorted(set(actual) - set(expected))}"
    )
