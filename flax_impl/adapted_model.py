"""``AdaptedModel``: wrap a model, put adapters on the layers the patterns select, freeze the
rest by a filter: the twin of ``torch_impl.adapted_model``.

Same class names, constructor arguments (plus a keyword-only ``rngs``), attribute names and
forward math as the PyTorch side, and the same departures from SpeechBrain: a single string is
one pattern, patterns that match nothing raise, a second ``insert_adapters()`` raises, the
wrapper's own attributes are not shadowed by the wrapped model's, adapters follow the wrapped
layer's dtype, and a model whose root is itself an ``nnx.Linear`` can be adapted.

What differs is freezing: NNX parameters carry no ``requires_grad`` flag, so
:attr:`AdaptedModel.trainable` is a filter that selects the parameters to train, for
``nnx.Optimizer(..., wrt=...)`` and ``nnx.DiffState``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flax import nnx

from twinformat.adapters import adapter_class_name
from twinformat.errors import AdapterInsertionError, CheckpointError, NoMatchError
from twinformat.format import adapter_metadata
from twinformat.names import (
    as_patterns,
    check_all_matched,
    dotted,
    matches_any,
    matches_unfrozen,
    parent_and_leaf,
)
from twinformat.recorded import (
    check_recorded_adapter,
    is_persistence_name,
    layer_kinds_entry,
    not_forwarded_message,
    signature_defaults,
)

from .checkpoint import load_state_dict_file, save_state_dict_file
from .graph import get_submodule, named_modules, set_submodule
from .interchange import TorchEntry, _assign, _plan_load, _torch_arrays, layer_kind, torch_entries

__all__ = ["AdaptedModel", "TrainableFilter", "is_layer_adaptable", "replace_module"]


@dataclasses.dataclass(frozen=True)
class TrainableFilter:
    """NNX filter selecting the ``nnx.Param`` variables that train in an :class:`AdaptedModel`.

    A variable is selected when its graph path (relative to the ``AdaptedModel``) lies under one
    of ``include`` (the adapters and the ``unfrozen_layers``) and under none of ``exclude`` (the
    pretrained layer each adapter wraps). Paths are compared as strings, so list indices match
    whether they appear as ``0`` or ``'0'``. Hashable, hence usable as a static argument of
    ``nnx.jit`` and inside ``nnx.DiffState``.
    """

    include: frozenset[tuple[str, ...]]
    exclude: frozenset[tuple[str, ...]]

    def __call__(self, path: tuple[Any, ...], value: Any) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        parts = tuple(str(part) for part in path)
        return _under_any(parts, self.include) and not _under_any(parts, self.exclude)


class AdaptedModel(nnx.Module):
    """Wrap a model and replace its target layers with adapters, keeping their parameters.

    The twin of ``torch_impl.AdaptedModel``. Layer names are NNX graph paths joined with dots,
    list indices as digits (``blocks.0.ffn.linear1``): the names ``named_modules()`` gives the
    PyTorch twin, so the same patterns select the same layers. Freezing is a filter:
    :attr:`trainable` selects the adapter parameters plus those of ``unfrozen_layers``; pass it
    as ``wrt`` to ``nnx.Optimizer`` and inside ``nnx.DiffState`` to ``nnx.grad``, and no
    gradient is computed for any other weight. ``nnx.MultiHeadAttention`` projects through
    ``nnx.LinearGeneral``, not ``nnx.Linear``: ``all_linear`` leaves it alone and naming its
    projections in ``target_layers`` raises (torch_impl skips ``nn.MultiheadAttention`` with a
    warning because its fused kernel reads the weights directly).

    Arguments
    ---------
    model_to_adapt: nnx.Module
        The base Flax NNX model to add adapters to.
    adapter_class: class
        An (uninitialized) adapter class, e.g. :class:`LoRA` or :class:`HoulsbyAdapterLinear`,
        called as ``adapter_class(layer, **adapter_kwargs, rngs=rngs)``.
    all_linear: bool
        Whether to add the adapter to all ``nnx.Linear`` layers (default: False).
    all_conv: bool
        Whether to add the adapter to all ``nnx.Conv`` layers (default: False).
    target_layers: list of str
        Names of the modules to replace; shell-style wildcards ``(*, ?, [seq], [!seq])``.
        A single string is one pattern. A pattern that matches no layer raises ``ValueError``.
    unfrozen_layers: list of str
        Names of layers to unfreeze for training, with the same wildcards.
    adapter_kwargs: dict
        Keyword arguments given to the adapter class.
    manual_adapter_insertion: bool
        When True, call :meth:`insert_adapters` yourself (e.g. after loading pretrained
        parameters); otherwise adapters are inserted now. ``rngs`` is kept until then.
    rngs: nnx.Rngs
        Random streams for the adapters' initial weights (the ``params`` stream).

    Example
    -------
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from flax_impl import LoRA
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.layer1 = nnx.Linear(10, 20, rngs=rngs)
    ...         self.layer2 = nnx.Linear(20, 20, rngs=rngs)
    ...         self.layer3 = nnx.Linear(20, 10, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.layer3(nnx.relu(self.layer2(nnx.relu(self.layer1(x)))))
    >>> model = AdaptedModel(
    ...     model_to_adapt=Net(nnx.Rngs(0)),
    ...     adapter_class=LoRA,
    ...     target_layers=["layer[13]"],
    ...     unfrozen_layers=["layer2"],
    ...     adapter_kwargs={"rank": 2},
    ...     rngs=nnx.Rngs(1),
    ... )
    >>> type(model.adapted_model.layer1).__name__, model.replace_layers
    ('LoRA', ['layer1', 'layer3'])

    The standard training step: only ``model.trainable`` gets gradients and updates.

    >>> optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=model.trainable)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...     def loss_fn(model):
    ...         return jnp.mean((model(x) - y) ** 2)
    ...     grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))
    ...     loss, grads = grad_fn(model)
    ...     optimizer.update(model, grads)
    ...     return loss
    >>> x, y = jnp.ones((4, 10)), jnp.zeros((4, 10))
    >>> losses = [float(train_step(model, optimizer, x, y)) for _ in range(5)]
    >>> losses[-1] < losses[0]
    True
    >>> sorted(model.trainable_state_dict())[:2]
    ['adapted_model.layer1.adapter_down_proj.weight', 'adapted_model.layer1.adapter_up_proj.weight']
    """

    def __init__(
        self,
        model_to_adapt: nnx.Module,
        adapter_class: Callable[..., nnx.Module],
        all_linear: bool = False,
        all_conv: bool = False,
        target_layers: Iterable[str] | str = (),
        unfrozen_layers: Iterable[str] | str = (),
        adapter_kwargs: Mapping[str, Any] | None = None,
        manual_adapter_insertion: bool = False,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        if not isinstance(model_to_adapt, nnx.Module):
            raise TypeError(f"model_to_adapt must be an nnx.Module, got {type(model_to_adapt).__name__}")
        if not callable(adapter_class):
            raise TypeError(f"adapter_class must be an adapter class such as LoRA, got {adapter_class!r}")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
        target_layers = as_patterns(target_layers)
        unfrozen_layers = as_patterns(unfrozen_layers)

        self.adapted_model = model_to_adapt
        self.adapter_class = adapter_class
        self.adapter_kwargs = dict(adapter_kwargs or {})
        self.target_layers = list(target_layers)
        self.unfrozen_layers = list(unfrozen_layers)
        # Layer name -> kwargs that differ from adapter_kwargs for that layer (PEFT's
        # rank_pattern/alpha_pattern); set before insert_adapters() (manual insertion).
        self.layer_adapter_kwargs: dict[str, dict[str, Any]] = {}
        # The PEFT config this model was read from (from_pretrained), so that save_pretrained
        # writes back the user's target_modules, patterns, task_type and base model name.
        self.recorded_peft_config: dict[str, Any] | None = None

        named = list(named_modules(model_to_adapt))
        names = [name for name, _ in named]
        check_all_matched(target_layers, names, argument="target_layers")
        check_all_matched(unfrozen_layers, names, argument="unfrozen_layers")
        if all_linear and not any(isinstance(m, nnx.Linear) for _, m in named):
            raise NoMatchError("all_linear=True but the model has no nnx.Linear layer")
        if all_conv and not any(_is_conv(m) for _, m in named):
            raise NoMatchError("all_conv=True but the model has no nnx.Conv layer")

        # Same walk as torch_impl: adaptable layers are queued, other matches are unfrozen.
        self.replace_layers: list[str] = []
        self.unfrozen_module_names: list[str] = []
        for name, module in named:
            if is_layer_adaptable(name, module, all_linear, all_conv, target_layers):
                self.replace_layers.append(name)
            elif matches_unfrozen(name, unfrozen_layers):
                self.unfrozen_module_names.append(name)

        # Dotted names (under adapted_model) of the pretrained layer inside each adapter.
        self.wrapped_layer_names: list[str] = []
        self.adapters_inserted = False
        if manual_adapter_insertion:
            self.rngs = rngs
        else:
            self.insert_adapters(rngs=rngs)

    def insert_adapters(self, *, rngs: nnx.Rngs | None = None) -> None:
        """Replace the queued layers with adapters. Call exactly once, before training.

        ``rngs`` defaults to the one given to the constructor. Raises
        :class:`AdapterInsertionError` on a second call, which would otherwise wrap adapters
        inside adapters.
        """
        if self.adapters_inserted:
            raise AdapterInsertionError(
                "insert_adapters() was already called on this AdaptedModel; a second call "
                f"would wrap adapters in adapters (layers: {self.replace_layers})"
            )
        if rngs is None:
            rngs = vars(self).get("rngs")
        if rngs is None:
            raise TypeError("insert_adapters() needs rngs: pass rngs=nnx.Rngs(...)")
        # Build every adapter before replacing any layer, so that a layer the adapter class
        # refuses leaves the model unchanged (same order of random draws as torch_impl).
        new_modules = []
        for name in self.replace_layers:
            module = get_submodule(self.adapted_model, name)
            kwargs = {**self.adapter_kwargs, **self.layer_adapter_kwargs.get(name, {})}
            try:
                new_modules.append(self.adapter_class(module, **kwargs, rngs=rngs))
            except (ValueError, TypeError) as exc:
                adapter_name = getattr(self.adapter_class, "__name__", repr(self.adapter_class))
                raise _with_message(
                    exc,
                    f"cannot wrap layer {name or '<root>'!r} ({type(module).__name__}) in {adapter_name}: {exc}",
                ) from exc
        for name, new_module in zip(self.replace_layers, new_modules, strict=True):
            module = get_submodule(self.adapted_model, name)
            if name:
                replace_module(self.adapted_model, name, new_module)
            else:  # the root itself is the adaptable layer (e.g. a bare nnx.Linear)
                self.adapted_model = new_module
            for key, child in nnx.iter_children(new_module):
                if child is module:
                    self.wrapped_layer_names.append(f"{name}.{key}" if name else str(key))
        self.adapters_inserted = True
        if "rngs" in vars(self):
            del self.rngs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Pass arguments to the adapted model."""
        return self.adapted_model(*args, **kwargs)

    @property
    def trainable(self) -> TrainableFilter:
        """The NNX filter of the parameters that train: adapters plus ``unfrozen_layers``.

        Paths are relative to this ``AdaptedModel``: pass the wrapper itself (not
        ``adapted_model``) to ``nnx.Optimizer``, ``nnx.grad`` and ``nnx.state``.
        """
        adapters = self.replace_layers if self.adapters_inserted else []
        include = {_path_under_model(name) for name in (*adapters, *self.unfrozen_module_names)}
        exclude = {_path_under_model(name) for name in self.wrapped_layer_names}
        return TrainableFilter(frozenset(include), frozenset(exclude))

    def trainable_state_dict(self) -> dict[str, Any]:
        """What :meth:`saver` writes: the :attr:`trainable` parameters, keyed and laid out as in
        the PyTorch twin's ``state_dict()``, plus the non-parameter variables (BatchNorm's
        running statistics) of ``unfrozen_layers``."""
        return _torch_arrays(_entries_at(self, [*self._trainable_paths(), *self._unfrozen_buffer_paths()]))

    def saver(self, path: str) -> None:
        """Save only the trainable parameters (and running statistics of unfrozen layers).

        Writes the ``.safetensors`` interchange format with the same keys, layouts and metadata
        as ``torch_impl.AdaptedModel.saver``: the adapter class and kwargs (which :meth:`loader`
        checks) and the kind of every layer written (``layer_kinds``). The write is atomic.
        """
        arrays = self.trainable_state_dict()
        save_state_dict_file(arrays, path, self._file_metadata(arrays))

    def loader(self, path: str, end_of_epoch: bool = False) -> None:
        """Load trained parameters saved by :meth:`saver` (this twin's or the PyTorch one's).

        The file may lack frozen weights, but every trainable parameter must be there, and an
        unexpected or mis-shaped key raises :class:`CheckpointError` before anything is loaded;
        so does a file that records another adapter class or other adapter kwargs than this
        model's (``alpha=16`` into a model built with the default ``alpha=1`` would scale every
        update wrongly). Files that record nothing load unchecked.
        """
        del end_of_epoch
        arrays, metadata = load_state_dict_file(path)
        self._load_checked(arrays, metadata, where=str(path))

    def _file_metadata(self, arrays: Mapping[str, Any]) -> dict[str, str]:
        """The safetensors metadata :meth:`saver` writes for ``arrays``."""
        metadata = adapter_metadata(
            framework="flax",
            adapter_class=adapter_class_name(self.adapter_class),
            adapter_kwargs=self.adapter_kwargs,
            target_layers=self.target_layers or self.replace_layers,
            unfrozen_layers=self.unfrozen_layers,
        )
        kinds = {name: kind for name, module in named_modules(self) if (kind := layer_kind(module))}
        metadata["layer_kinds"] = layer_kinds_entry(kinds, arrays)
        return metadata

    def _load_checked(self, arrays: Mapping[str, Any], metadata: Mapping[str, str], *, where: str) -> None:
        """Check ``arrays`` (torch names and layouts, and the adapter ``metadata`` records)
        against this model, then load them; nothing is assigned when a check fails."""
        check_recorded_adapter(
            metadata,
            adapter_class_name(self.adapter_class),
            self.adapter_kwargs,
            where=where,
            class_defaults=signature_defaults(self.adapter_class),
        )
        report, assignments = _plan_load(self, arrays, strict=False)
        trainable = {entry.key for entry in _entries_at(self, self._trainable_paths())}
        missing = [key for key in report.missing if key in trainable]
        if report.unexpected or report.mismatched or missing:
            raise CheckpointError(
                f"checkpoint {where!r} does not fit this AdaptedModel: "
                f"unexpected keys {report.unexpected}, mis-shaped keys {report.mismatched}, "
                f"missing trainable keys {missing}"
            )
        _assign(assignments)

    def parameter_transfer(self, path: str) -> None:
        """Load parameters for transfer (SpeechBrain's Pretrainer hook); same as ``loader``."""
        self.loader(path, True)

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        *,
        base_model_name_or_path: str | None = None,
        task_type: str | None = None,
    ) -> str:
        """Write the adapters (only them) to ``directory``, the habit of PEFT users.

        PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, which
        ``peft.PeftModel.from_pretrained(base, directory)`` loads onto the PyTorch twin of the
        base model with the same outputs) where PEFT can represent the adapters: LoRA with any
        of its options (``dropout``, ``use_rslora``, ``use_dora``, per-layer ranks and alphas as
        ``rank_pattern``/``alpha_pattern``) on named Linear/Conv/Embed layers, unfrozen layers as
        ``modules_to_save`` (none holding an adapter), convs of dilation 1 and zero padding. Our
        format otherwise (``peft_twins_adapter.json`` + ``adapters.safetensors``, the :meth:`saver`
        file). The write is atomic. Returns ``'peft'`` or ``'peft-twins'``.

        PEFT's config keeps what the user gave, as the PyTorch twin's does: ``target_modules`` as
        read from PEFT, else ``target_layers`` as one regular expression (where either selects
        exactly the adapted layers); ``task_type`` (argument, else read); ``base_model_name_or_path``
        (argument, else read, else the base model's ``name_or_path``); with no ``task_type``,
        PEFT's ``auto_mapping`` naming the transformers class a Flax twin mirrors.

        Example
        -------
        >>> import tempfile
        >>> from flax_impl import HoulsbyAdapterLinear
        >>> model = AdaptedModel(nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0))), HoulsbyAdapterLinear,
        ...                      target_layers="layers.0", adapter_kwargs={"projection_size": 2}, rngs=nnx.Rngs(1))
        >>> model.save_pretrained(tempfile.mkdtemp() + "/houlsby")
        'peft-twins'
        """
        from .pretrained import save_pretrained

        return save_pretrained(
            self, directory, base_model_name_or_path=base_model_name_or_path, task_type=task_type
        )

    @classmethod
    def from_pretrained(
        cls, base_model: nnx.Module, directory: str | os.PathLike[str], *, rngs: nnx.Rngs
    ) -> AdaptedModel:
        """Wrap ``base_model`` in the adapters saved in ``directory`` (by :meth:`save_pretrained`
        of either twin, or by PEFT's ``save_pretrained`` for LoRA with any option our LoRA
        computes: DoRA, dropout, rsLoRA, embeddings, rank/alpha patterns, ``modules_to_save`` as
        unfrozen layers) and load them.
        Like ``peft.PeftModel.from_pretrained``, the model comes back in eval mode (``.train()``
        to train on).

        ``rngs`` initialises the adapters before their saved values overwrite them.
        ``base_model`` is changed in place, as by the constructor; a refused load (a layer the
        model lacks, a shape that does not fit, a PEFT option our LoRA cannot compute) raises
        and puts it back as it was. See :mod:`flax_impl.pretrained` for an example.
        """
        from .pretrained import from_pretrained

        return from_pretrained(cls, base_model, directory, rngs=rngs)

    def __getattr__(self, item: str) -> Any:
        """Fall back to the adapted model for attributes the wrapper does not have.

        Except those that would save, load or convert the wrapped model as if it were not
        adapted (``state_dict``, ``load_adapter``, ...): they raise ``AttributeError`` saying
        what to use instead (see :func:`twinformat.recorded.is_persistence_name`).
        """
        # Only reached when normal lookup fails, so the wrapper's own attributes come first.
        # Private names are never forwarded: NNX probes them while building the object.
        if item.startswith("_") or item in ("adapted_model", "rngs"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {item!r}")
        model = vars(self).get("adapted_model")
        if model is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {item!r}")
        if is_persistence_name(item) and hasattr(model, item):
            raise AttributeError(not_forwarded_message(type(self).__name__, type(model).__name__, item))
        return getattr(model, item)

    def _trainable_paths(self) -> list[tuple[Any, ...]]:
        """Graph paths of the :attr:`trainable` parameters."""
        return [path for path, _ in nnx.to_flat_state(nnx.state(self, self.trainable))]

    def _unfrozen_buffer_paths(self) -> list[tuple[Any, ...]]:
        """Graph paths of the non-parameter variables (running statistics) of ``unfrozen_layers``."""
        prefixes = frozenset(_path_under_model(name) for name in self.unfrozen_module_names)
        return [
            path
            for path, value in nnx.to_flat_state(nnx.state(self))
            if not isinstance(value, (nnx.Param, nnx.RngState))
            and _under_any(tuple(str(part) for part in path), prefixes)
        ]


def is_layer_adaptable(
    name: str,
    module: nnx.Module,
    all_linear: bool,
    all_conv: bool,
    target_layers: Iterable[str] | str,
) -> bool:
    """Check if a layer is among the layers to be adapted.

    Arguments
    ---------
    name: str
        The dotted name of the module (as :func:`flax_impl.graph.named_modules` gives it).
    module: nnx.Module
        The module to check.
    all_linear: bool
        Whether all ``nnx.Linear`` layers should be adapted.
    all_conv: bool
        Whether all convolutions should be adapted: ``nnx.Conv`` and every layer the type table
        calls a ``conv`` (the speech twins' weight-normed positional conv among them, so that
        ``all_conv`` meets the same layers as in PyTorch, where that conv is an ``nn.Conv1d``).
    target_layers: str or list of str
        Shell-style patterns; a single string is one pattern.

    Returns
    -------
    bool
        Whether the layer is to be adapted.

    Example
    -------
    >>> layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    >>> is_layer_adaptable("layer1", layer, False, False, "layer1")
    True
    >>> is_layer_adaptable("layer2", layer, False, False, "layer1")
    False
    """
    return bool(
        (all_linear and isinstance(module, nnx.Linear))
        or (all_conv and _is_conv(module))
        or matches_any(name, as_patterns(target_layers))
    )


def _is_conv(module: nnx.Module) -> bool:
    """Whether ``all_conv`` meets ``module``: the type table calls it a ``conv`` (``nnx.Conv`` and
    the speech twins' ``WeightNormConv``)."""
    return layer_kind(module) == "conv"


def replace_module(model: nnx.Module, name: str, new_module: nnx.Module) -> None:
    """Replace the layer at dotted ``name`` with ``new_module`` by assigning it on its parent.

    Arguments
    ---------
    model: nnx.Module
        Model containing the module to be replaced.
    name: str
        Dotted name of the target module (the model itself is the parent of a top-level name;
        a digit indexes an ``nnx.List``).
    new_module: nnx.Module
        New module made of the old plus the new parameters.

    Example
    -------
    >>> from flax_impl import Swish
    >>> model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    >>> replace_module(model, "layers.0", Swish())
    >>> type(model.layers[0]).__name__
    'Swish'
    """
    parent_and_leaf(name)  # the root has no parent: same ValueError as torch_impl
    set_submodule(model, name, new_module)


def _with_message(exc: Exception, message: str) -> Exception:
    """An exception of ``exc``'s type carrying ``message`` (AdapterInsertionError if the type
    cannot be built from a message alone)."""
    try:
        return type(exc)(message)
    except Exception:
        return AdapterInsertionError(message)


def _path_under_model(name: str) -> tuple[str, ...]:
    """Graph path, relative to the AdaptedModel, of the layer named ``name`` in adapted_model."""
    return ("adapted_model", *name.split(".")) if name else ("adapted_model",)


def _under_any(parts: tuple[str, ...], prefixes: frozenset[tuple[str, ...]]) -> bool:
    return any(parts[: len(prefix)] == prefix for prefix in prefixes)


def _entries_at(model: nnx.Module, paths: Iterable[tuple[Any, ...]]) -> list[TorchEntry]:
    """The PyTorch-named entries of the variables at graph ``paths``, in ``state_dict`` order.

    Raises :class:`CheckpointError` naming any of them that sits in a module of no supported
    kind, rather than leaving a trained weight out of a checkpoint.
    """
    wanted = set(paths)
    entries = [entry for entry in torch_entries(model, strict=False) if entry.path in wanted]
    unnamed = wanted - {entry.path for entry in entries}
    if unnamed:
        raise CheckpointError(
            "trainable variables with no PyTorch name (their module is not an nnx.Linear, "
            f"nnx.Conv, norm, nnx.Embed or nnx.BatchNorm): {sorted(dotted(p) for p in unnamed)}"
        )
    return entries
