"""Fold LoRA updates into the wrapped weights for inference and take them back out; drop the
wrappers (``merge_and_unload``, ``unload``) to get the plain model back.

Every function checks the whole model before it changes anything: an adapter that cannot be
merged (Houlsby) or a weight that cannot be written exactly (a parametrization without
``right_inverse``) raises :class:`MergeError` naming the layer, and the model is as it was.
"""

from __future__ import annotations

from torch import nn

from twinformat.adapters import adapter_of
from twinformat.errors import MergeError
from twinformat.names import parent_and_leaf

from .lora import LoRA, check_writable_weight

__all__ = ["MergeError", "merge_and_unload", "merge_lora", "unload", "unmerge_lora"]


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer of ``model``: ``W += scaling * up @ down`` (conv and embedding too;
    DoRA: ``W <- m / ||W + scaling * up @ down|| * (W + scaling * up @ down)``).

    Afterwards each LoRA layer computes only its pretrained module, with the same outputs (to
    float rounding); the wrappers stay, so that :func:`unmerge_lora` can take the update out
    again, and cost their Python call (eager bf16 inference of BERT-base, q,k,v,o, one H100:
    1.024x the base model). :func:`merge_and_unload` drops them (1.000x). Returns the number of
    layers merged. Raises
    :class:`MergeError` if ``model`` holds an adapter that cannot be merged (Houlsby) or a
    parametrized weight that cannot be written back exactly, before changing anything.

    Example
    -------
    >>> import torch
    >>> layer = LoRA(nn.Linear(4, 3), rank=2)
    >>> _ = nn.init.normal_(layer.adapter_up_proj.weight)
    >>> x = torch.randn(5, 4)
    >>> before = layer(x)
    >>> merge_lora(layer)
    1
    >>> torch.allclose(layer(x), before, atol=1e-6)
    True
    """
    _refuse_unmergeable(model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRA) and not m.merged]
    for name, layer in layers:
        check_writable_weight(layer.pretrained_module, name)
    done = []
    try:
        for _, layer in layers:
            layer.merge()
            done.append(layer)
    except MergeError:
        for layer in reversed(done):  # a parametrization that did not reproduce the weight
            layer.unmerge()
        raise
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora` on every merged LoRA layer; returns how many were unmerged."""
    layers = [m for m in model.modules() if isinstance(m, LoRA) and m.merged]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer, then return the base model with each wrapper replaced by its
    merged pretrained layer: a plain model whose ``state_dict`` keys are the original model's.

    ``model`` is an ``AdaptedModel`` (its ``adapted_model`` is returned) or any module holding
    LoRA layers (changed in place and returned; a LoRA root gives its pretrained layer). Raises
    :class:`MergeError`, changing nothing, when an adapter cannot be merged.

    Example
    -------
    >>> import torch
    >>> from torch_impl import AdaptedModel
    >>> model = AdaptedModel(nn.Sequential(nn.Linear(4, 3)), LoRA, target_layers="0")
    >>> _ = nn.init.normal_(model.adapted_model[0].adapter_up_proj.weight)
    >>> x = torch.randn(2, 4)
    >>> before = model(x)
    >>> plain = merge_and_unload(model)
    >>> list(plain.state_dict()), torch.allclose(plain(x), before, atol=1e-6)
    (['0.weight', '0.bias'], True)
    """
    base = _base_of(model)
    merge_lora(base)
    return _unwrap_all(base)


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter without merging it: the base model with each wrapper replaced by its
    pretrained layer, as before adaptation (a merged LoRA is unmerged first).

    Example
    -------
    >>> import torch
    >>> from torch_impl import AdaptedModel
    >>> base = nn.Sequential(nn.Linear(4, 3))
    >>> x = torch.randn(2, 4)
    >>> before = base(x)
    >>> model = AdaptedModel(base, LoRA, target_layers="0")
    >>> _ = nn.init.normal_(model.adapted_model[0].adapter_up_proj.weight)
    >>> plain = unload(model)
    >>> type(plain[0]).__name__, torch.equal(plain(x), before)
    ('Linear', True)
    """
    base = _base_of(model)
    unmerge_lora(base)
    return _unwrap_all(base)


def _base_of(model: nn.Module) -> nn.Module:
    # An AdaptedModel holds the adapted model as ``adapted_model`` and declares no adapter itself.
    inner = model._modules.get("adapted_model") if adapter_of(model) is None else None
    return inner if isinstance(inner, nn.Module) and hasattr(model, "adapter_class") else model


def _unwrap_all(model: nn.Module) -> nn.Module:
    adapters = [(name, m, kind) for name, m in model.named_modules() if (kind := adapter_of(m)) is not None]
    # Deepest first, so a name stays valid while its ancestors are still in place.
    for name, module, kind in sorted(adapters, key=lambda item: -item[0].count(".") if item[0] else 1):
        wrapped = getattr(module, kind.wrapped)
        if not name:
            return wrapped
        # (AdaptedModel's replace_module, spelled out: adapted_model imports this module.)
        parent, leaf = parent_and_leaf(name)
        setattr(model.get_submodule(parent) if parent else model, leaf, wrapped)
    return model


def _refuse_unmergeable(model: nn.Module) -> None:
    for name, module in model.named_modules():
        kind = adapter_of(module)
        if kind is not None and not kind.merges:
            raise MergeError(
                f"layer {name or '<root>'!r} is a {kind.name}, which cannot be merged: "
                "its activation between the projections is not linear"
            )
        if isinstance(module, LoRA) and module.adapter_names() != ["default"]:
            raise MergeError(
                f"layer {name or '<root>'!r} holds the adapters {module.adapter_names()}: merge the ones you want "
                "with AdaptedModel.merge_and_unload(adapter_names=[...])"
            )
