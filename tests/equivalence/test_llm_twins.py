"""The LLM twins compute what transformers computes: logits (left padding, packed positions,
bfloat16), greedy decoding with the cache, LoRA gradients and ten AdamW steps on a causal-LM loss
in both frameworks, and the weights back in PyTorch bit for bit."""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import converters
import flax_impl
from flax_impl.checkpoint import torch_style_state_dict
from flax_impl.graph import named_modules
from flax_impl.models.decoder import generation_positions
from flax_impl.models.qwen3 import Qwen3Model
from tests.zoo import llm
from tests.zoo.arrays import same_bits

from . import harness

VARIANTS = list(llm.VARIANTS)
ATOL = RTOL = 1e-5

#: The unadapted pairs, built once: the tests below only read them (torch runs go through a
#: fresh copy, since transformers' dynamic RoPE keeps state between calls).
_twins = functools.cache(llm.twins)


def _torch_logits(model: torch.nn.Module, ids, mask=None, positions=None) -> np.ndarray:
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(np.asarray(mask))
    if positions is not None:
        kwargs["position_ids"] = torch.from_numpy(np.asarray(positions, np.int64))
    with torch.no_grad():
        return llm.fresh_copy(model)(torch.from_numpy(ids), **kwargs).logits.float().numpy()


@pytest.mark.parametrize("variant", VARIANTS)
def test_module_names_and_state_dict_keys_are_transformers(variant):
    torch_model, flax_model = _twins(variant)
    tied = set(flax_model.tied_weights)

    # rotary_emb holds only non-persistent buffers; a tied head is the embedding itself.
    torch_names = {n for n, _ in torch_model.named_modules() if "rotary_emb" not in n}
    assert {n for n, _ in named_modules(flax_model)} == torch_names - {k.rpartition(".")[0] for k in tied}
    # the Flax side exports a tied key with its source's values, as PyTorch's state_dict lists it
    torch_keys = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    assert {k: v.shape for k, v in torch_style_state_dict(flax_model).items()} == torch_keys
    assert flax_model.tied_weights == (
        {"lm_head.weight": "model.embed_tokens.weight"} if torch_model.config.tie_word_embeddings else {}
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_without_and_with_left_padding(variant):
    torch_model, flax_model = _twins(variant)
    batch = llm.token_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.astype(bool)
    positions = np.asarray(generation_positions(mask))

    expected = _torch_logits(torch_model, ids)
    harness.assert_close([expected], [np.asarray(flax_model(ids))], atol=ATOL, rtol=RTOL, what=variant)
    # With padding, the padded queries attend to nothing and their outputs are arbitrary in
    # both frameworks: the real tokens are compared, with transformers' default positions
    # (arange, shifted by the padding) and with positions counted from each row's first token.
    for given in (None, positions):
        expected = _torch_logits(torch_model, ids, mask, given)[real]
        actual = np.asarray(flax_model(ids, mask, given))[real]
        harness.assert_close([expected], [actual], atol=ATOL, rtol=RTOL, what=f"{variant} padded")


@pytest.mark.parametrize("variant", ["mistral-window", "gemma3"])
def test_position_ids_that_restart_are_packed_sequences_only_when_asked(variant):
    torch_model, flax_model = _twins(variant)
    ids = llm.token_batch(length=11)["input_ids"]
    positions = np.array([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        # transformers packs only without a cache; its forward makes one unless use_cache=False.
        packed = llm.fresh_copy(torch_model)(
            torch.from_numpy(ids), position_ids=torch.from_numpy(positions), use_cache=False
        ).logits.numpy()
    unpacked = _torch_logits(torch_model, ids, positions=positions)

    actual_packed = np.asarray(flax_model(ids, position_ids=positions, packed=True))
    actual = np.asarray(flax_model(ids, position_ids=positions))

    harness.assert_close([packed, unpacked], [actual_packed, actual], atol=ATOL, rtol=RTOL, what=variant)
    assert not np.allclose(packed, unpacked, atol=1e-3)  # the second sequence does not see the first


def test_the_model_without_a_head_returns_transformers_last_hidden_state():
    torch_model = llm.torch_model("qwen3-window-bias").model
    flax_model = harness.placeholder(lambda: Qwen3Model(torch_model.config, rngs=nnx.Rngs(0)))
    converters.torch_to_flax(torch_model, flax_model)
    batch = llm.token_batch()

    with torch.no_grad():
        expected = torch_model(
            torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"])
        ).last_hidden_state.numpy()
    actual = np.asarray(flax_model(batch["input_ids"], batch["attention_mask"]))

    real = batch["attention_mask"].astype(bool)
    harness.assert_close([expected[real]], [actual[real]], atol=ATOL, rtol=RTOL, what="Qwen3Model")


def _torch_greedy(model: torch.nn.Module, ids, mask, new: int, eos) -> np.ndarray:
    with torch.no_grad():
        out = llm.fresh_copy(model).generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=new,
            min_new_tokens=0,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
        )
    return out.numpy()


#: One variant per kind of cache: full, dynamic RoPE growing past its length, every layer a
#: ring, mixed full and ring layers (Qwen2, Gemma's local/global with its own RoPE per type).
GENERATE_VARIANTS = [
    "llama-tied-biases-head-dim",
    "llama-dynamic-rope",
    "mistral-window",
    "qwen2-window",
    "gemma3",
]


@pytest.mark.parametrize("variant", GENERATE_VARIANTS)
def test_greedy_generate_gives_transformers_tokens_on_a_left_padded_batch(variant):
    torch_model, flax_model = _twins(variant)
    batch = llm.token_batch(seed=1)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    new = 9  # past every sliding window: the ring cache wraps around

    expected = _torch_greedy(torch_model, ids, mask, new, None)
    actual = np.asarray(flax_model.generate(ids, new, attention_mask=mask, eos_token_id=[]))

    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("variant", ["qwen3"])
def test_rows_stop_at_eos_and_are_padded_with_it(variant):
    torch_model, flax_model = _twins(variant)
    batch = llm.token_batch(seed=1)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    free = _torch_greedy(torch_model, ids, mask, 8, None)
    eos = int(free[0, ids.shape[1] + 2])  # a token row 0 generates third: it stops there

    expected = _torch_greedy(torch_model, ids, mask, 8, eos)
    actual = np.asarray(flax_model.generate(ids, 8, attention_mask=mask, eos_token_id=eos))

    # transformers stops when every row has stopped; the twin keeps its shape, padded with eos.
    np.testing.assert_array_equal(actual[:, : expected.shape[1]], expected)
    assert (actual[:, expected.shape[1] :] == eos).all()
    assert (actual[0, ids.shape[1] + 2 :] == eos).all()


def test_bfloat16_logits_are_as_close_to_transformers_as_bfloat16_allows():
    variant = "gemma3"  # the scaled embedding, (1 + w) norms and softcap all round in bfloat16
    torch32 = llm.torch_model(variant)
    torch16 = llm.torch_model(variant, dtype=torch.bfloat16)
    flax16 = llm.flax_model(variant, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    flax16.eval()
    converters.torch_to_flax(torch16, flax16)
    ids = llm.token_batch()["input_ids"]

    reference = _torch_logits(torch32, ids)
    expected = _torch_logits(torch16, ids)
    actual = np.asarray(flax16(ids))

    assert actual.dtype == np.float32
    rounding = np.abs(expected - reference).max()  # how far bfloat16 is from float32 here
    assert 0 < np.abs(actual - expected).max() <= 2 * rounding
    assert np.abs(actual - reference).max() <= 3 * rounding


# ---------------------------------------------------------------------------------------------
# Adapters: gradients, ten AdamW steps, back to PyTorch


def _adapted_twins(variant: str):
    case = harness.AdapterCase("lora", "LoRA", {"rank": 2, "alpha": 4.0}, target_layers=llm.LORA_TARGETS)
    torch_model = harness.adapted(llm.torch_model(variant), case, "torch")
    harness.randomize_adapters(torch_model)
    flax_model = harness.placeholder(
        lambda: harness.adapted(
            llm.FAMILIES[llm.VARIANTS[variant][0]][2](llm.torch_config(variant), rngs=nnx.Rngs(0)),
            case,
            "flax",
        )
    )
    torch_model.eval()
    flax_model.eval()
    converters.torch_to_flax(torch_model, flax_model)
    return torch_model, flax_model


def _torch_loss(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    # Only real tokens predicting real tokens: a padded query's logits are arbitrary.
    weights = (mask[:, :-1] * mask[:, 1:]).reshape(-1).to(losses.dtype)
    return (losses * weights).sum() / weights.sum()


def _flax_loss(model, ids, mask):
    logits = model(ids, mask)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    weights = (mask[:, :-1] * mask[:, 1:]).astype(losses.dtype)
    return (losses * weights).sum() / weights.sum()


@pytest.mark.parametrize("variant", llm.TRAINING_VARIANTS)
def test_lora_gradients_and_ten_adamw_steps_match_and_convert_back_bit_exact(variant):
    torch_model, flax_model = _adapted_twins(variant)
    batch = llm.token_batch(seed=2)
    t_ids, t_mask = (torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask"))
    f_ids, f_mask = (jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask"))

    named = [(n, p) for n, p in torch_model.named_parameters() if p.requires_grad]
    assert len(named) == 2 * 7 * torch_model.config.num_hidden_layers  # down, up of q k v o gate up down
    optimizer = torch.optim.AdamW(
        [p for _, p in named],
        lr=harness.LEARNING_RATE,
        betas=harness.BETAS,
        eps=harness.EPS,
        weight_decay=harness.WEIGHT_DECAY,
    )
    for step in range(harness.STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = _torch_loss(torch_model, t_ids, t_mask)
        loss.backward()
        if step == 0:
            torch_loss = float(loss.detach())
            torch_grads = {n: p.grad.numpy().copy() for n, p in named}
        optimizer.step()

    tx = optax.adamw(
        harness.LEARNING_RATE,
        b1=harness.BETAS[0],
        b2=harness.BETAS[1],
        eps=harness.EPS,
        eps_root=0.0,
        weight_decay=harness.WEIGHT_DECAY,
    )
    flax_opt = nnx.Optimizer(flax_model, tx, wrt=flax_model.trainable)

    graphdef, state = nnx.split((flax_model, flax_opt))

    def train_step(state, ids, mask):
        model, opt = nnx.merge(graphdef, state)
        grad_fn = nnx.value_and_grad(_flax_loss, argnums=nnx.DiffState(0, model.trainable))
        loss, grads = grad_fn(model, ids, mask)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss, grads

    # XLA's backend optimisations change nothing compared here and take half the compile time.
    train_step = jax.jit(train_step, compiler_options={"xla_backend_optimization_level": 0})
    for step in range(harness.STEPS):
        state, loss, grads = train_step(state, f_ids, f_mask)
        if step == 0:
            flax_loss, flax_grads = float(loss), harness.flax_in_torch_layout(flax_model, grads)
    nnx.update((flax_model, flax_opt), state)

    assert abs(flax_loss - torch_loss) < 1e-5
    harness.assert_close(torch_grads, flax_grads, atol=1e-4, rtol=1e-4, what=f"{variant} gradients")
    trained = {n: p.detach().numpy() for n, p in named}
    flax_trained = torch_style_state_dict(flax_model)
    harness.assert_close(
        trained, {k: flax_trained[k] for k in trained}, atol=1e-4, rtol=1e-4, what=f"{variant} after 10 steps"
    )
    # Back to PyTorch: every tensor, trained or frozen, bit for bit.
    back = copy.deepcopy(torch_model)
    converters.flax_to_torch(flax_model, back)
    back_state = {k: v.numpy() for k, v in back.state_dict().items() if k in flax_trained}
    assert same_bits(back_state, flax_trained) == []


def test_generate_runs_through_an_adapted_model_with_the_adapters_applied():
    torch_model, flax_model = _adapted_twins("llama")
    batch = llm.token_batch(seed=1)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    expected = _torch_greedy(torch_model.adapted_model, ids, mask, 5, None)

    np.testing.assert_array_equal(
        np.asarray(flax_model.generate(ids, 5, attention_mask=mask, eos_token_id=[])), expected
    )


def test_a_config_the_twin_cannot_compute_is_refused_naming_the_field():
    from flax_impl.models.gemma3 import gemma3_config
    from flax_impl.models.llama import LlamaForCausalLM

    base = dict(llm.BASE)
    with pytest.raises(ValueError, match="rope_type 'longrope' is not supported"):
        LlamaForCausalLM({**base, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        LlamaForCausalLM({**base, "rope_parameters": {"partial_rotary_factor": 0.5}}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        gemma3_config({**base, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        LlamaForCausalLM({**base, "num_key_value_heads": 3}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="activation 'mish'"):
        LlamaForCausalLM({**base, "hidden_act": "mish"}, rngs=nnx.Rngs(0))


def test_config_json_dict_and_transformers_config_read_the_same():
    for variant in llm.VARIANTS:
        config = llm.torch_config(variant)
        twin = llm.FAMILIES[llm.VARIANTS[variant][0]][2]
        from_object = twin.base_class.read_config(config)
        from_dict = twin.base_class.read_config(config.to_dict())
        assert from_object == from_dict, variant


def test_older_configs_spell_rope_scaling_and_rope_theta_and_read_the_same():
    from flax_impl.models.llama import llama_config

    new = {**llm.BASE, **llm.VARIANTS["llama3-rope"][1]}
    old = dict(new)
    params = dict(old.pop("rope_parameters"))
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = {**params, "type": params.pop("rope_type")}

    assert llama_config(old) == llama_config(new)
    assert llama_config(new) == llama_config(llm.torch_config("llama3-rope"))


def test_jax_traces_the_forward_under_jit():
    _, flax_model = _twins("qwen2-window")
    batch = llm.token_batch()
    eager = np.asarray(flax_model(batch["input_ids"], batch["attention_mask"]))
    jitted = nnx.jit(lambda m, i, a: m(i, a))(flax_model, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(np.asarray(jitted), eager, atol=1e-5)
    assert jax.devices()[0].platform == "cpu"


# ---------------------------------------------------------------------------------------------
# PEFT's LoRA directories, both ways

#: (variant, LoraConfig options): each family once, each option PEFT users set on LLMs once.
PEFT_CASES = [
    pytest.param("llama", dict(target_modules=llm.PEFT_TARGETS), id="llama-qkvo-mlp"),
    pytest.param(
        "mistral-window", dict(target_modules="all-linear", use_rslora=True), id="mistral-all-linear-rslora"
    ),
    pytest.param("qwen2-window", dict(target_modules=llm.PEFT_TARGETS, use_dora=True), id="qwen2-dora"),
    # Tied embeddings with a LoRA on them: the head keeps reading the base table, as in PEFT.
    pytest.param(
        "qwen3", dict(target_modules=[*llm.PEFT_TARGETS, "embed_tokens"]), id="qwen3-tied-embedding-lora"
    ),
    pytest.param(
        "gemma3",
        dict(target_modules="all-linear", use_rslora=True, use_dora=True),
        id="gemma3-all-linear-rslora-dora",
    ),
]


@pytest.mark.parametrize(("variant", "options"), PEFT_CASES)
def test_a_peft_lora_loads_into_the_flax_twin_and_saves_back_for_peft(variant, options, tmp_path):
    import peft

    from tests.zoo.bert import randomize_peft

    torch_model, flax_model = llm.twins(variant)  # a fresh twin: from_pretrained adapts it in place
    peft_model = peft.get_peft_model(
        llm.fresh_copy(torch_model), peft.LoraConfig(r=4, lora_alpha=8, **options)
    )
    randomize_peft(peft_model).eval()
    # PEFT would also save the whole base embedding (a LoRA on it sets save_embedding_layers);
    # the adapter alone is the adapter.
    peft_model.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    batch = llm.token_batch(seed=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.astype(bool)
    with torch.no_grad():
        expected = peft_model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits.numpy()

    adapted = flax_impl.AdaptedModel.from_pretrained(flax_model, tmp_path / "peft", rngs=nnx.Rngs(0))
    harness.assert_close(
        [expected[real]], [np.asarray(adapted(ids, mask))[real]], atol=ATOL, rtol=RTOL, what=f"{variant} PEFT"
    )

    assert adapted.save_pretrained(tmp_path / "flax") == "peft"
    again = peft.PeftModel.from_pretrained(llm.fresh_copy(torch_model), tmp_path / "flax").eval()
    with torch.no_grad():
        back = again(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_array_equal(back, expected)  # the same tensors, bit for bit


@pytest.mark.parametrize("variant", ["qwen2-window", "gemma3"])
def test_the_fused_attention_computes_the_same_function(variant):
    _, reference = _twins(variant)
    _, fused = _twins(variant, attention_implementation="xla")
    batch = llm.token_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.astype(bool)

    harness.assert_close(
        [np.asarray(reference(ids))], [np.asarray(fused(ids))], atol=ATOL, rtol=RTOL, what="causal"
    )
    harness.assert_close(
        [np.asarray(reference(ids, mask))[real]],
        [np.asarray(fused(ids, mask))[real]],
        atol=ATOL,
        rtol=RTOL,
        what="mask",
    )
