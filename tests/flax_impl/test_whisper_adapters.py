"""Adapters on the Whisper twins: the same layers selected as on transformers' models and under
SpeechBrain's Whisper names, adapter files of either twin's saver crossing over, and PEFT Whisper
LoRA directories (q_proj/v_proj, all linear, DoRA) loading into the Flax twin and back into PEFT.

SpeechBrain's ``speechbrain.integrations.huggingface.whisper.Whisper`` cannot be built offline (it
downloads a config, a tokenizer and a feature extractor from the Hub); its module names are those
of the transformers ``WhisperModel`` it holds as ``model``, with the logits taken through
``model.decoder.embed_tokens.weight``. :class:`SpeechBrainNames` builds exactly that naming from
transformers' ``WhisperModel``.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest

# transformers (torch) builds the references: the jax-only CI environment skips this file.
torch = pytest.importorskip("torch")
from flax import nnx  # noqa: E402

import converters  # noqa: E402
import flax_impl  # noqa: E402
import torch_impl  # noqa: E402
from flax_impl.models import WhisperForConditionalGeneration, WhisperModel  # noqa: E402
from tests.equivalence import harness  # noqa: E402
from tests.zoo import whisper  # noqa: E402
from tests.zoo.bert import randomize_peft  # noqa: E402

peft = pytest.importorskip("peft")
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

QV = ["q_proj", "v_proj"]
LORA = {"rank": 4, "alpha": 8.0}


class SpeechBrainNames(torch.nn.Module):
    """SpeechBrain's Whisper lobe as adapters see it: transformers' ``WhisperModel`` as ``model``,
    logits through ``model.decoder.embed_tokens.weight`` (SpeechBrain's ``forward_decoder``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_features, decoder_input_ids, decoder_attention_mask=None):
        hidden = self.model(
            input_features, decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask
        ).last_hidden_state
        return hidden @ self.model.decoder.embed_tokens.weight.T


def _speechbrain_model(seed: int = 0) -> SpeechBrainNames:
    return SpeechBrainNames(whisper.torch_model(head=False, seed=seed)).eval()


def _flax_generation_twin(torch_model: torch.nn.Module) -> WhisperForConditionalGeneration:
    """The Flax WhisperForConditionalGeneration with the (base) weights of ``torch_model``, whose
    names start with ``model.`` (transformers' generation model or SpeechBrain's lobe)."""
    config = torch_model.model.config
    twin = harness.placeholder(lambda: WhisperForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    twin.eval()
    converters.torch_to_flax(torch_model, twin)
    return twin


def _inputs():
    return whisper.features(seed=7), whisper.DECODER_IDS, whisper.DECODER_MASK


def _torch_logits(model, features, ids, mask):
    with torch.no_grad():
        out = model(torch.from_numpy(features), torch.from_numpy(ids), torch.from_numpy(mask))
    return (out.logits if hasattr(out, "logits") else out).numpy()


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def test_all_linear_selects_the_same_layers_on_both_whisper_models():
    torch_model = whisper.torch_model(head=False)
    flax_model = harness.placeholder(lambda: WhisperModel(torch_model.config, rngs=nnx.Rngs(0)))
    torch_adapted = torch_impl.AdaptedModel(copy.deepcopy(torch_model), torch_impl.LoRA, all_linear=True)
    flax_adapted = flax_impl.AdaptedModel(flax_model, flax_impl.LoRA, all_linear=True, rngs=nnx.Rngs(0))

    # The same set (NNX walks attributes in sorted order: decoder before encoder).
    assert sorted(flax_adapted.replace_layers) == sorted(torch_adapted.replace_layers)
    assert len(flax_adapted.replace_layers) == 2 * 6 + 2 * 10  # encoder 6 linears a layer, decoder 10


def test_all_linear_on_the_generation_model_differs_by_the_tied_proj_out_only():
    # torch_impl (SpeechBrain's semantics) wraps every nn.Linear, transformers' tied proj_out too;
    # the Flax twin computes proj_out through embed_tokens (no Linear), as PEFT's "all-linear"
    # leaves the output layer out. SpeechBrain's own Whisper has no proj_out: no difference there.
    torch_model = whisper.torch_model()
    flax_model = harness.placeholder(
        lambda: WhisperForConditionalGeneration(torch_model.config, rngs=nnx.Rngs(0))
    )
    torch_adapted = torch_impl.AdaptedModel(copy.deepcopy(torch_model), torch_impl.LoRA, all_linear=True)
    flax_adapted = flax_impl.AdaptedModel(flax_model, flax_impl.LoRA, all_linear=True, rngs=nnx.Rngs(0))

    assert set(torch_adapted.replace_layers) - set(flax_adapted.replace_layers) == {"proj_out"}
    assert set(flax_adapted.replace_layers) <= set(torch_adapted.replace_layers)
    speechbrain = torch_impl.AdaptedModel(_speechbrain_model(), torch_impl.LoRA, all_linear=True)
    assert sorted(speechbrain.replace_layers) == sorted(flax_adapted.replace_layers)


@pytest.mark.parametrize("all_linear", [False, True], ids=["q_v-by-glob", "all-linear"])
def test_a_speechbrain_whisper_adapter_file_loads_into_the_flax_twin_and_back(tmp_path, all_linear):
    targets = [] if all_linear else ["model.*.layers.*.self_attn.[qv]_proj", "model.decoder.layers.*.fc1"]
    torch.manual_seed(0)
    base = _speechbrain_model(seed=2)
    torch_model = torch_impl.AdaptedModel(
        copy.deepcopy(base),
        torch_impl.LoRA,
        all_linear=all_linear,
        target_layers=targets,
        adapter_kwargs=LORA,
    )
    _randomize(torch_model)
    torch_model.saver(str(tmp_path / "adapters.ckpt"))
    flax_model = flax_impl.AdaptedModel(
        _flax_generation_twin(base),  # SpeechBrain's names are the generation twin's, unchanged
        flax_impl.LoRA,
        all_linear=all_linear,
        target_layers=targets,
        adapter_kwargs=LORA,
        rngs=nnx.Rngs(1),
    )
    converters.torch_to_flax(str(tmp_path / "adapters.ckpt"), flax_model)  # a pickled SpeechBrain file
    features, ids, mask = _inputs()

    expected = _torch_logits(torch_model, features, ids, mask)
    harness.assert_close(
        [expected], [np.asarray(flax_model(features, ids, mask))], atol=1e-5, rtol=1e-5, what="logits"
    )

    # And back: the Flax saver's file into a fresh SpeechBrain-named torch model.
    flax_model.saver(str(tmp_path / "flax.safetensors"))
    again = torch_impl.AdaptedModel(
        copy.deepcopy(base),
        torch_impl.LoRA,
        all_linear=all_linear,
        target_layers=targets,
        adapter_kwargs=LORA,
    )
    again.loader(str(tmp_path / "flax.safetensors"))
    np.testing.assert_array_equal(_torch_logits(again.eval(), features, ids, mask), expected)


def test_a_flax_whisper_model_reads_speechbrain_files_with_the_one_rename(tmp_path):
    base = _speechbrain_model(seed=3)
    torch_model = torch_impl.AdaptedModel(
        copy.deepcopy(base), torch_impl.LoRA, target_layers="model.decoder.layers.*.fc1"
    )
    _randomize(torch_model)
    torch_model.saver(str(tmp_path / "adapters.ckpt"))
    flax_base = harness.placeholder(lambda: WhisperModel(base.model.config, rngs=nnx.Rngs(0)))
    flax_base.eval()
    converters.torch_to_flax(base.model, flax_base)
    flax_model = flax_impl.AdaptedModel(
        flax_base, flax_impl.LoRA, target_layers="decoder.layers.*.fc1", rngs=nnx.Rngs(1)
    )

    report = converters.torch_to_flax(
        str(tmp_path / "adapters.ckpt"), flax_model, rename=[("adapted_model.model.*", "adapted_model.*")]
    )
    assert len(report.loaded) == 4
    features, ids, mask = _inputs()
    with torch.no_grad():
        expected = torch_model.adapted_model.model(
            torch.from_numpy(features),
            decoder_input_ids=torch.from_numpy(ids),
            decoder_attention_mask=torch.from_numpy(mask),
        ).last_hidden_state.numpy()
    harness.assert_close(
        [expected], [np.asarray(flax_model(features, ids, mask))], atol=1e-5, rtol=1e-5, what="hidden"
    )


@pytest.mark.parametrize(
    ("targets", "use_dora"),
    [(QV, False), (QV, True), ("all-linear", False)],
    ids=["q_v", "q_v-dora", "all-linear"],
)
def test_a_peft_whisper_lora_directory_loads_into_the_flax_twin_and_back_into_peft(
    tmp_path, targets, use_dora
):
    torch_model = whisper.torch_model(seed=5)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora)
    peft_model = randomize_peft(peft.get_peft_model(copy.deepcopy(torch_model), config)).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    features, ids, mask = _inputs()
    with torch.no_grad():
        expected = peft_model(
            input_features=torch.from_numpy(features),
            decoder_input_ids=torch.from_numpy(ids),
            decoder_attention_mask=torch.from_numpy(mask),
        ).logits.numpy()

    flax_model = flax_impl.AdaptedModel.from_pretrained(
        _flax_generation_twin(torch_model), tmp_path / "peft", rngs=nnx.Rngs(3)
    )
    assert "proj_out" not in flax_model.replace_layers
    actual = np.asarray(flax_model(jnp.asarray(features), ids, mask))
    harness.assert_close([expected], [actual], atol=1e-5, rtol=1e-5, what="logits")

    assert flax_model.save_pretrained(tmp_path / "flax") == "peft"
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), str(tmp_path / "flax")).eval()
    with torch.no_grad():
        again = reloaded(
            input_features=torch.from_numpy(features),
            decoder_input_ids=torch.from_numpy(ids),
            decoder_attention_mask=torch.from_numpy(mask),
        ).logits.numpy()
    np.testing.assert_allclose(again, expected, atol=1e-6, rtol=0)
