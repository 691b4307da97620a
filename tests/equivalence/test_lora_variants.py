"""LoRA's PEFT options (dropout, rsLoRA, DoRA) on every layer kind LoRA wraps (embedding, Linear,
Conv1d/2d/3d): PyTorch and Flax compute the same forward, gradients and ten AdamW steps, the
weights (DoRA's magnitude included) cross torch -> Flax -> torch bit-exact, merges agree, and
adapter files saved by one twin load into the other.

Dropout is compared in eval mode (the two frameworks draw different masks); its training-mode
semantics are tested on each side against PEFT.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

import converters
import flax_impl
import torch_impl
from tests.zoo.pairs import AdapterCase, Batch, Pair

from . import harness

LAYERS = ("emb", "lin", "c1", "c2", "c3")
OPTIONS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "dropout": {"dropout": 0.25},
    "dora": {"use_dora": True},
    "rslora-dora-dropout": {"use_rslora": True, "use_dora": True, "dropout": 0.1},
}


class TorchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 5)
        self.c1 = nn.Conv1d(5, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 3, (3, 2), stride=(1, 2))
        self.c3 = nn.Conv3d(3, 2, (1, 2, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.emb(tokens))  # (b, t, 5)
        h = self.c1(h.transpose(1, 2))  # (b, 4, t)
        h = self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 4))  # (b, 3, t-2, 2)
        return self.c3(h.unsqueeze(-1)).permute(0, 2, 3, 4, 1)  # channels last: (b, t-2, 1, 1, 2)


class FlaxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.emb = nnx.Embed(11, 6, rngs=rngs)
        self.lin = nnx.Linear(6, 5, rngs=rngs)
        self.c1 = nnx.Conv(5, 4, (3,), padding=[(1, 1)], rngs=rngs)
        self.c2 = nnx.Conv(4, 3, (3, 2), strides=(1, 2), padding="VALID", rngs=rngs)
        self.c3 = nnx.Conv(3, 2, (1, 2, 1), padding="VALID", rngs=rngs)

    def __call__(self, tokens):
        import jax.numpy as jnp

        h = self.c1(self.lin(self.emb(tokens)))  # (b, t, 4)
        b, t, c = h.shape
        h = self.c2(jnp.broadcast_to(h[:, :, None, :], (b, t, 4, c)))  # (b, t-2, 2, 3)
        return self.c3(h[:, :, :, None, :])


def _batch(rng: np.random.Generator) -> Batch:
    return {"tokens": rng.integers(0, 11, size=(3, 7)).astype(np.int64)}


def _pair(case: AdapterCase) -> Pair:
    return Pair(
        name="all-kinds",
        make_torch=TorchNet,
        make_flax=FlaxNet,
        make_batch=_batch,
        run_torch=lambda model, batch: (model(torch.from_numpy(batch["tokens"])),),
        run_flax=lambda model, batch: (model(batch["tokens"].astype(np.int32)),),
        cases=(case,),
    )


def _case(option: str) -> AdapterCase:
    layers = tuple(layer for layer in LAYERS if not (OPTIONS[option].get("use_dora") and layer == "emb"))
    return AdapterCase(option, "LoRA", {"rank": 2, "alpha": 3.0, **OPTIONS[option]}, target_layers=layers)


_RESULTS: dict[str, harness.CaseResult] = {}


def _result(option: str) -> harness.CaseResult:
    if option not in _RESULTS:
        case = _case(option)
        _RESULTS[option] = harness.run_pair(_pair(case), case)
    return _RESULTS[option]


@pytest.mark.parametrize("option", list(OPTIONS))
def test_forward_gradients_and_ten_adamw_steps_agree_between_the_twins(option):
    result = _result(option)
    harness.assert_close(
        result.torch_outputs, result.flax_outputs, atol=1e-5, rtol=1e-5, what=f"{option} output"
    )
    assert harness.max_abs_diff(result.base_outputs, result.torch_outputs) > 1e-3, (
        "the adapters change nothing"
    )
    assert sorted(result.flax_grads) == sorted(result.torch_grads)
    if OPTIONS[option].get("use_dora"):
        assert any(k.endswith("adapter_magnitude") for k in result.torch_grads)
    assert all(np.any(g != 0) for g in result.torch_grads.values()), "a trainable parameter gets no gradient"
    harness.assert_close(
        result.torch_grads, result.flax_grads, atol=1e-4, rtol=1e-4, what=f"{option} gradient"
    )
    harness.assert_close(
        result.torch_after, result.flax_after, atol=1e-4, rtol=0, what=f"{option} after 10 steps"
    )
    changed = [
        k for k in result.flax_after if not np.array_equal(result.converted_back[k], result.flax_after[k])
    ]
    assert not changed, f"flax_to_torch changed the bits of {changed}"


def _twins(option: str) -> harness.Twins:
    case = _case(option)
    return harness.build_twins(_pair(case), case)


@pytest.mark.parametrize("option", ["rslora", "dora"])
def test_merged_twins_agree_and_merge_and_unload_gives_the_plain_twins(option):
    twins = _twins(option)
    batch = _batch(np.random.default_rng(0))
    before = harness.torch_outputs(twins, batch)
    torch_impl.merge_lora(twins.torch_model)
    flax_impl.merge_lora(twins.flax_model)
    for name in twins.case.target_layers:
        torch_layer = twins.torch_model.adapted_model.get_submodule(name).pretrained_module
        flax_layer = getattr(twins.flax_model.adapted_model, name).pretrained_module
        harness.assert_close(
            {k: v.detach().numpy() for k, v in torch_layer.state_dict().items()},
            {k: v.detach().numpy() for k, v in _as_torch(flax_layer, torch_layer).state_dict().items()},
            atol=1e-5,
            rtol=1e-5,
            what=f"{option} merged {name}",
        )
    harness.assert_close(before, harness.flax_outputs(twins, batch), atol=1e-5, rtol=1e-5, what="merged flax")
    plain_torch = torch_impl.merge_and_unload(twins.torch_model)
    plain_flax = flax_impl.merge_and_unload(twins.flax_model)
    assert list(plain_torch.state_dict()) == list(TorchNet().state_dict())
    assert isinstance(plain_flax.lin, nnx.Linear) and isinstance(plain_flax.c2, nnx.Conv)
    back = TorchNet()
    converters.flax_to_torch(plain_flax, back)
    with torch.no_grad():
        harness.assert_close(
            before, [back(torch.from_numpy(batch["tokens"])).numpy()], atol=1e-5, rtol=1e-5, what="unloaded"
        )


def _as_torch(flax_layer: nnx.Module, like: nn.Module) -> nn.Module:
    import copy

    target = copy.deepcopy(like)
    converters.flax_to_torch(flax_layer, target)
    return target


@pytest.mark.parametrize("option", ["dora", "rslora-dora-dropout"])
def test_adapter_files_cross_between_the_twins_bit_exact(option, tmp_path):
    twins = _twins(option)
    torch_file, flax_file = tmp_path / "torch.safetensors", tmp_path / "flax.safetensors"
    twins.torch_model.saver(str(torch_file))
    twins.flax_model.saver(str(flax_file))
    torch_saved = converters.files.TensorFile(torch_file)
    flax_saved = converters.files.TensorFile(flax_file)
    assert sorted(torch_saved.names) == sorted(flax_saved.names)
    assert any(name.endswith("adapter_magnitude") for name in torch_saved.names)
    for name in torch_saved.names:
        assert np.array_equal(torch_saved.get(name), flax_saved.get(name)), name
    fresh = _twins(option)
    fresh.flax_model.loader(str(torch_file))
    fresh.torch_model.loader(str(flax_file))
    batch = _batch(np.random.default_rng(1))
    harness.assert_close(
        harness.torch_outputs(fresh, batch),
        harness.flax_outputs(fresh, batch),
        atol=1e-5,
        rtol=1e-5,
        what="loaded",
    )
