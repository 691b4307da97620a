"""What adapter files record, checked against the model that loads them (framework-free rules)."""

from __future__ import annotations

import pytest

from twinformat.errors import CheckpointError
from twinformat.format import adapter_metadata
from twinformat.recorded import check_recorded_adapter, is_persistence_name


def _meta(adapter_class: str, kwargs: dict) -> dict[str, str]:
    return adapter_metadata(framework="torch", adapter_class=adapter_class, adapter_kwargs=kwargs)


def test_defaults_are_filled_in_on_both_sides_before_comparing():
    check_recorded_adapter(_meta("LoRA", {"rank": 16}), "LoRA", {"alpha": 1.0}, where="f")
    check_recorded_adapter(_meta("LoRA", {}), "LoRA", {"rank": 16, "alpha": 1}, where="f")
    with pytest.raises(CheckpointError, match=r"rank differs \(file 16, model 8\)"):
        check_recorded_adapter(_meta("LoRA", {}), "LoRA", {"rank": 8}, where="f")


def test_an_option_only_the_class_declares_compares_as_its_default():
    defaults = {"rank": 16, "alpha": 1.0, "dropout": 0.0}
    check_recorded_adapter(_meta("LoRA", {"dropout": 0.0}), "LoRA", {}, where="f", class_defaults=defaults)
    with pytest.raises(CheckpointError, match="dropout differs"):
        check_recorded_adapter(
            _meta("LoRA", {"dropout": 0.1}), "LoRA", {}, where="f", class_defaults=defaults
        )


def test_the_twins_own_classes_are_the_same_activation_and_others_are_not():
    class Swish:  # stands for either twin's class: only the recorded dotted name matters
        pass

    Swish.__module__ = "flax_impl.activations"
    torch_file = _meta(
        "HoulsbyAdapterLinear", {"projection_size": 4, "activation": "torch_impl.activations.Swish"}
    )
    check_recorded_adapter(
        torch_file, "HoulsbyAdapterLinear", {"projection_size": 4, "activation": Swish}, where="f"
    )
    with pytest.raises(CheckpointError, match="activation differs"):
        check_recorded_adapter(
            torch_file,
            "HoulsbyAdapterLinear",
            {"projection_size": 4, "activation": "torch.nn.GELU"},
            where="f",
        )


def test_a_repr_recorded_for_a_kwarg_without_json_form_compares_without_its_address():
    def gelu(x):
        return x

    recorded = _meta("HoulsbyAdapterLinear", {"projection_size": 4, "activation": gelu})
    recorded["adapter_kwargs"] = recorded["adapter_kwargs"].replace(hex(id(gelu)), "0xdeadbeef")

    check_recorded_adapter(
        recorded, "HoulsbyAdapterLinear", {"projection_size": 4, "activation": gelu}, where="f"
    )


def test_files_that_record_nothing_are_not_checked_and_bad_metadata_is_refused():
    check_recorded_adapter({}, "LoRA", {"rank": 2}, where="sb.ckpt")
    with pytest.raises(CheckpointError, match="'f': metadata 'adapter_kwargs' is not valid JSON"):
        check_recorded_adapter({"adapter_class": "LoRA", "adapter_kwargs": "{"}, "LoRA", {}, where="f")
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        check_recorded_adapter({"adapter_class": "LoRA", "adapter_kwargs": "[1]"}, "LoRA", {}, where="f")


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("push_to_hub", True),
        ("save_pretrained", True),
        ("load_adapter", True),
        ("enable_adapters", True),
        ("get_adapter_state_dict", True),
        ("to_bettertransformer", True),
        ("config", False),
        ("pretrained_module", False),
        ("gradient_checkpointing_enable", False),
        ("get_input_embeddings", False),
        ("adapter_down_proj", False),
    ],
)
def test_save_load_and_convert_attributes_are_kept_from_the_wrapped_model(name, kept):
    assert is_persistence_name(name) is kept
