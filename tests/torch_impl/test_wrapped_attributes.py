"""Adapted transformers models whose code reads attributes of the layers LoRA wraps (issue 14,
items 1 and 7), from small configs with random weights: T5 reads ``wo.weight.dtype``, ViT
``projection.weight.dtype``, Whisper ``conv1.stride``; WavLM's attention *computes* with
``q_proj.weight`` (``F.multi_head_attention_forward``), so the effective weight must carry the
adapter; wav2vec2's positional conv is ``weight_norm``-parametrized and merges exactly.

Each model runs forward, a training step (the adapter factors get gradients and move), a merge
(same outputs) and merge_and_unload (a plain model with the original keys)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.zoo.bert import transformers_module
from torch_impl import AdaptedModel, LoRA, merge_and_unload, merge_lora, unmerge_lora

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def transformers():
    return transformers_module()


def _randomize(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _check(make_base, targets, run, options=None, all_conv=False):
    """Forward differs from the base, a training step moves every factor, merge keeps outputs,
    merge_and_unload gives the base model's keys and the adapted outputs."""
    torch.manual_seed(0)
    base = make_base().eval()
    keys = list(base.state_dict())
    with torch.no_grad():
        reference = run(base)
    model = AdaptedModel(
        copy.deepcopy(base),
        LoRA,
        target_layers=targets,
        all_conv=all_conv,
        adapter_kwargs={"rank": 2, **(options or {})},
    )
    _randomize(model)
    model.eval()
    with torch.no_grad():
        adapted = run(model)
    assert (adapted - reference).abs().max() > 1e-3, "the adapter does not change the output"

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = run(model)
    # A fixed random projection: mean(h**2) of a layer-normed output is constant, its gradient 0.
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} gets no gradient"
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)

    model.eval()
    with torch.no_grad():
        trained = run(model)
        merge_lora(model)
        torch.testing.assert_close(run(model), trained, **TOL)
        unmerge_lora(model)
        torch.testing.assert_close(run(model), trained, **TOL)
        plain = merge_and_unload(model)
        assert list(plain.state_dict()) == keys
        assert not any(isinstance(m, LoRA) for m in plain.modules())
        torch.testing.assert_close(run(plain), trained, **TOL)


@pytest.mark.parametrize("options", [{}, {"use_dora": True}])
def test_t5_reads_wo_weight_dtype_of_an_adapted_layer(transformers, options):
    config = transformers.T5Config(
        vocab_size=32, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2
    )
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))

    def run(model):
        return model(input_ids=ids, decoder_input_ids=ids).last_hidden_state

    _check(lambda: transformers.T5Model(config), ["*.DenseReluDense.wo", "*.SelfAttention.q"], run, options)


def test_vit_with_all_conv_reads_the_projection_weight_dtype(transformers):
    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        image_size=8,
        patch_size=4,
    )
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(model):
        return model(pixel_values=pixels).last_hidden_state

    _check(lambda: transformers.ViTModel(config), [], run, all_conv=True)


@pytest.mark.parametrize("options", [{}, {"use_dora": True, "use_rslora": True}])
def test_whisper_encoder_reads_conv_strides_and_trains_its_adapted_convs(transformers, options):
    config = transformers.WhisperConfig(
        vocab_size=32,
        num_mel_bins=4,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        max_source_positions=6,
        max_target_positions=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    features = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(0))  # 2 * max_source_positions

    def run(model):
        return model.encoder(features).last_hidden_state

    model = transformers.WhisperModel(config)
    assert LoRA(model.encoder.conv2, 2).stride == (2,)
    _check(lambda: transformers.WhisperModel(config), ["encoder.conv1", "encoder.conv2"], run, options)


def _wavlm_config(transformers):
    return transformers.WavLMConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        conv_dim=(8, 8),
        conv_stride=(2, 2),
        conv_kernel=(3, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=1,
        num_buckets=8,
        max_bucket_distance=16,
    )


@pytest.mark.parametrize("options", [{}, {"use_dora": True}])
def test_wavlm_attention_computes_with_the_effective_weight_and_trains(transformers, options):
    config = _wavlm_config(transformers)
    audio = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))

    def run(model):
        return model(audio).last_hidden_state

    _check(
        lambda: transformers.WavLMModel(config), ["*.attention.q_proj", "*.attention.v_proj"], run, options
    )


def test_wav2vec2_positional_conv_under_weight_norm_merges_exactly(transformers):
    config = transformers.Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        conv_dim=(8, 8),
        conv_stride=(2, 2),
        conv_kernel=(3, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=1,
    )
    audio = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))

    def run(model):
        return model(audio).last_hidden_state

    torch.manual_seed(0)
    probe = transformers.Wav2Vec2Model(config)
    conv = probe.encoder.pos_conv_embed.conv
    assert torch.nn.utils.parametrize.is_parametrized(conv, "weight")  # the case of the issue
    _check(lambda: transformers.Wav2Vec2Model(config), ["encoder.pos_conv_embed.conv"], run)
