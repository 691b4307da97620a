"""A BERT checkpoint saved without a pooler (``BertModel(add_pooling_layer=False)``, the encoder of
``BertForMaskedLM`` / ``BertForTokenClassification``: common on the hub) loads into the Flax twin,
built without a pooler, saying so (0.1 refused it with ``missing (2): pooler.dense.weight, ...``)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_impl.models import BertModel  # noqa: E402
from tests.equivalence import harness  # noqa: E402
from tests.zoo import bert  # noqa: E402
from tests.zoo.arrays import randomize_torch  # noqa: E402

IDS = np.array([[2, 7, 9, 4, 0], [3, 4, 5, 6, 8]])
MASK = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


def _expected(encoder: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        out = encoder(torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK))
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize(
    "saved", ["BertModel(add_pooling_layer=False)", "BertForMaskedLM", "BertForTokenClassification"]
)
def test_a_checkpoint_without_a_pooler_builds_the_model_without_one_and_says_so(tmp_path, saved):
    transformers = bert.transformers_module()
    config = transformers.BertConfig(**bert.SMALL_CONFIG, num_labels=3)
    torch.manual_seed(0)
    if saved.startswith("BertModel"):
        torch_model = transformers.BertModel(config, add_pooling_layer=False)
        encoder = torch_model
    else:
        torch_model = getattr(transformers, saved)(config)
        encoder = torch_model.bert
    randomize_torch(torch_model.eval())
    torch_model.save_pretrained(str(tmp_path))

    with pytest.warns(UserWarning, match="no pooler"):
        model, report = BertModel.from_pretrained(tmp_path, output_loading_info=True)

    assert model.pooler is None and report.ok
    assert any("no pooler" in note for note in report.notes)
    harness.assert_close(
        [_expected(encoder)], [np.asarray(model(IDS, attention_mask=MASK))], atol=1e-5, rtol=1e-5, what=saved
    )


def test_a_checkpoint_with_a_pooler_still_builds_one_silently_and_asking_for_one_still_refuses(
    tmp_path, recwarn
):
    transformers = bert.transformers_module()
    torch.manual_seed(0)
    with_pooler = tmp_path / "with"
    transformers.BertModel(transformers.BertConfig(**bert.SMALL_CONFIG)).save_pretrained(str(with_pooler))
    assert BertModel.from_pretrained(with_pooler).pooler is not None
    assert not [w for w in recwarn if "pooler" in str(w.message)]

    without = tmp_path / "without"
    transformers.BertModel(
        transformers.BertConfig(**bert.SMALL_CONFIG), add_pooling_layer=False
    ).save_pretrained(str(without))
    from twinformat.errors import CheckpointError

    with pytest.raises(CheckpointError, match="pooler.dense.weight"):  # the user asked for a pooler
        BertModel.from_pretrained(without, add_pooling_layer=True)
