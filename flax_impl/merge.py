"""Fold LoRA updates into the wrapped kernels for inference and take them back out; drop the
wrappers (``merge_and_unload``, ``unload``) to get the plain model back: the twin of
``torch_impl.merge``. Every function checks the whole model before it changes anything."""

from __future__ import annotations

from flax import nnx

from twinformat.adapters import adapter_of
from twinformat.errors import MergeError

from .graph import named_modules, set_submodule
from .lora import LoRA

__all__ = ["MergeError", "merge_and_unload", "merge_lora", "unload", "unmerge_lora"]


def merge_lora(model: nnx.Module) -> int:
    """Merge every LoRA layer of ``model``: ``kernel += scaling * down @ up`` (conv and embedding
    too; DoRA: ``kernel <- m / ||kernel + scaling * down @ up|| * (kernel + scaling * down @ up)``).

    Afterwards each LoRA layer computes only its pretrained module, at the base model's speed,
    with the same outputs (to float rounding). Returns the number of layers merged. Raises
    :class:`MergeError` if ``model`` holds an adapter that cannot be merged (Houlsby), before
    changing anything.

    Example
    -------
    >>> import jax, jax.numpy as jnp
    >>> layer = LoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
    >>> layer.adapter_up_proj.kernel[...] = jax.random.normal(jax.random.key(2), (2, 3))
    >>> x = jax.random.normal(jax.random.key(3), (5, 4))
    >>> before = layer(x)
    >>> merge_lora(layer)
    1
    >>> bool(jnp.allclose(layer(x), before, atol=1e-6))
    True
    """
    _refuse_unmergeable(model)
    layers = [m for _, m in named_modules(model) if isinstance(m, LoRA) and not m.merged]
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nnx.Module) -> int:
    """Undo :func:`merge_lora` on every merged LoRA layer; returns how many were unmerged."""
    layers = [m for _, m in named_modules(model) if isinstance(m, LoRA) and m.merged]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def merge_and_unload(model: nnx.Module) -> nnx.Module:
    """Merge every LoRA layer, then return the base model with each wrapper replaced by its
    merged pretrained layer: a plain model with the original model's structure and names.

    ``model`` is an ``AdaptedModel`` (its ``adapted_model`` is returned) or any module holding
    LoRA layers (changed in place and returned; a LoRA root gives its pretrained layer). Raises
    :class:`MergeError`, changing nothing, when an adapter cannot be merged.

    Example
    -------
    >>> import jax, jax.numpy as jnp
    >>> from flax_impl import AdaptedModel
    >>> model = AdaptedModel(nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0))), LoRA,
    ...                      target_layers="layers.0", rngs=nnx.Rngs(1))
    >>> lora = model.adapted_model.layers[0]
    >>> lora.adapter_up_proj.kernel[...] = jax.random.normal(jax.random.key(2), (16, 3))
    >>> x = jax.random.normal(jax.random.key(3), (2, 4))
    >>> before = model(x)
    >>> plain = merge_and_unload(model)
    >>> type(plain.layers[0]).__name__, bool(jnp.allclose(plain(x), before, atol=1e-5))
    ('Linear', True)
    """
    base = _base_of(model)
    merge_lora(base)
    return _unwrap_all(base)


def unload(model: nnx.Module) -> nnx.Module:
    """Drop every adapter without merging it: the base model with each wrapper replaced by its
    pretrained layer, as before adaptation (a merged LoRA is unmerged first).

    Example
    -------
    >>> import jax, jax.numpy as jnp
    >>> from flax_impl import AdaptedModel
    >>> base = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    >>> x = jnp.ones((2, 4))
    >>> before = base(x)
    >>> model = AdaptedModel(base, LoRA, target_layers="layers.0", rngs=nnx.Rngs(1))
    >>> model.adapted_model.layers[0].adapter_up_proj.kernel[...] = jnp.ones((16, 3))
    >>> plain = unload(model)
    >>> type(plain.layers[0]).__name__, bool(jnp.array_equal(plain(x), before))
    ('Linear', True)
    """
    base = _base_of(model)
    unmerge_lora(base)
    return _unwrap_all(base)


def _base_of(model: nnx.Module) -> nnx.Module:
    # An AdaptedModel holds the adapted model as ``adapted_model`` and declares no adapter itself.
    inner = vars(model).get("adapted_model") if adapter_of(model) is None else None
    return inner if isinstance(inner, nnx.Module) and hasattr(model, "adapter_class") else model


def _unwrap_all(model: nnx.Module) -> nnx.Module:
    adapters = [(name, m, kind) for name, m in named_modules(model) if (kind := adapter_of(m)) is not None]
    # Deepest first, so a name stays valid while its ancestors are still in place.
    for name, module, kind in sorted(adapters, key=lambda item: -item[0].count(".") if item[0] else 1):
        wrapped = getattr(module, kind.wrapped)
        if not name:
            return wrapped
        set_submodule(
            model, name, wrapped
        )  # AdaptedModel's replace_module (adapted_model imports this module)
    return model


def _refuse_unmergeable(model: nnx.Module) -> None:
    for name, module in named_modules(model):
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
