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

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import nnx

from twinformat.adapters import LORA, adapter_class_name, adapter_of
from twinformat.errors import AdapterError, AdapterInsertionError, CheckpointError, NoMatchError
from twinformat.format import adapter_metadata
from twinformat.names import (
    as_patterns,
    check_all_matched,
    check_flags,
    check_layer_kwargs_names,
    dotted,
    matches_any,
    matches_unfrozen,
    parent_and_leaf,
)
from twinformat.recorded import (
    check_recorded_adapter,
    check_recorded_layer_kwargs,
    is_persistence_name,
    layer_kinds_entry,
    layer_kwargs_entry,
    not_forwarded_message,
    signature_defaults,
)
from twinformat.report import misfit_message

from .checkpoint import load_state_dict_file, save_state_dict_file
from .graph import get_submodule, named_modules, set_submodule
from .interchange import (
    KIND_OF_TYPE,
    TorchEntry,
    _assign,
    _plan_load,
    _torch_arrays,
    layer_kind,
    torch_entries,
)
from .lora import BASE_ADAPTER, DEFAULT_ADAPTER, AdapterSwitch, LoRA, LoRABranch

#: A LoRA adapter's factors, as one-adapter keys name them after the layer.
_FACTORS = ("adapter_down_proj.weight", "adapter_up_proj.weight")

# A named adapter's factors sit in a LoRABranch: its own tensors (DoRA's magnitude) are a LoRA's.
if not any(match is LoRABranch for match, _ in KIND_OF_TYPE):
    KIND_OF_TYPE.append((LoRABranch, "lora"))

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
    #: Selected even under ``exclude``: the active named adapters inside excluded containers.
    reinclude: frozenset[tuple[str, ...]] = frozenset()

    def __call__(self, path: tuple[Any, ...], value: Any) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        parts = tuple(str(part) for part in path)
        if _under_any(parts, self.reinclude):
            return True
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
    layer_adapter_kwargs: dict
        Layer name -> keyword arguments that replace ``adapter_kwargs``' for that layer (PEFT's
        ``rank_pattern``/``alpha_pattern``: ``{"encoder.0.fc": {"rank": 32}}``); every name
        must be a layer the model adapts. Keyword only; not in SpeechBrain's signature.

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

    _adapter_switch: AdapterSwitch  # set while several adapters are held (see _refresh_switch)
    switch_names: tuple[str, ...]

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
        layer_adapter_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if not isinstance(model_to_adapt, nnx.Module):
            raise TypeError(f"model_to_adapt must be an nnx.Module, got {type(model_to_adapt).__name__}")
        if not callable(adapter_class):
            raise TypeError(f"adapter_class must be an adapter class such as LoRA, got {adapter_class!r}")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
        check_flags(all_linear=all_linear, all_conv=all_conv)
        target_layers = as_patterns(target_layers)
        unfrozen_layers = as_patterns(unfrozen_layers)

        self.adapted_model = model_to_adapt
        self.adapter_class = adapter_class
        self.adapter_kwargs = dict(adapter_kwargs or {})
        self.target_layers = list(target_layers)
        self.unfrozen_layers = list(unfrozen_layers)
        # Layer name -> kwargs that differ from adapter_kwargs for that layer (PEFT's
        # rank_pattern/alpha_pattern): the constructor's argument, or set before
        # insert_adapters() (manual insertion).
        self.layer_adapter_kwargs: dict[str, dict[str, Any]] = {
            name: dict(kwargs) for name, kwargs in (layer_adapter_kwargs or {}).items()
        }
        # The PEFT config this model was read from (from_pretrained), so that save_pretrained
        # writes back the user's target_modules, patterns, task_type and base model name.
        self.recorded_peft_config: dict[str, Any] | None = None
        # Further adapters (add_adapter/load_adapter), by name: what built them; and PEFT's
        # active set. The constructor's adapter is PEFT's "default" (or default_adapter_name).
        self.named_adapter_specs: dict[str, dict[str, Any]] = {}
        self.default_adapter_name = DEFAULT_ADAPTER

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

        check_layer_kwargs_names(self.layer_adapter_kwargs, self.replace_layers)
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

    def __call__(
        self,
        *args: Any,
        adapter_names: Sequence[str] | None = None,
        adapter_mask: jax.Array | None = None,
        **kwargs: Any,
    ) -> Any:
        """Pass arguments to the adapted model.

        A mixed batch (PEFT's ``adapter_names``): one adapter name per sample (the first axis of
        every adapted layer's input), ``'__base__'`` for the base model; or, inside a jitted
        step, the same choice as data, ``adapter_mask=model.adapter_mask(names)``, so that one
        compiled step serves any mix. Inference only, as in PEFT.
        """
        with self._per_sample(adapter_names, adapter_mask):
            return self.adapted_model(*args, **kwargs)

    def generate(
        self,
        *args: Any,
        adapter_names: Sequence[str] | None = None,
        adapter_mask: jax.Array | None = None,
        **kwargs: Any,
    ) -> Any:
        """The adapted model's ``generate`` (the Whisper and LLM twins' greedy decoding), with
        PEFT's mixed batch: ``adapter_names`` gives one adapter per prompt (``'__base__'``: none)
        for the whole decoding, as ``PeftModel.generate(..., adapter_names=...)`` does; the
        choice is data, so one compiled decoding loop serves any mix.

        Example
        -------
        >>> from flax_impl.models import LlamaForCausalLM
        >>> config = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, num_key_value_heads=1, eos_token_id=2)
        >>> model = AdaptedModel(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), LoRA, target_layers=["*q_proj"],
        ...     rngs=nnx.Rngs(1))
        >>> model.add_adapter("b", LoRA, ["*v_proj"], rngs=nnx.Rngs(2))
        >>> model.eval()
        >>> ids = jnp.array([[1, 5, 7], [1, 9, 3]])
        >>> model.generate(ids, 2, adapter_names=["b", "__base__"]).shape
        (2, 5)
        """
        generate = getattr(self.adapted_model, "generate", None)
        if generate is None:
            raise AttributeError(f"{type(self.adapted_model).__name__} has no generate method to call")
        with self._per_sample(adapter_names, adapter_mask):
            return generate(*args, **kwargs)

    @contextlib.contextmanager
    def _per_sample(
        self, adapter_names: Sequence[str] | None, adapter_mask: jax.Array | None
    ) -> Iterator[None]:
        """One adapter per sample for the calls run inside (nothing when both are None)."""
        if adapter_names is not None:
            if adapter_mask is not None:
                raise TypeError("give adapter_names or adapter_mask, not both")
            adapter_mask = self.adapter_mask(adapter_names)
        if adapter_mask is None:
            yield
            return
        switch = vars(self).get("_adapter_switch")
        if switch is None:
            raise AdapterError(
                "adapter_mask needs the switch model.adapter_mask(names) creates: call it first"
            )
        old = switch.get_value()
        switch.set_value(jnp.asarray(adapter_mask, old.dtype))
        try:
            yield
        finally:
            switch.set_value(old)

    # --- named adapters (PEFT's names and meaning) ----------------------------------------

    @property
    def adapters(self) -> list[str]:
        """The names of the adapters this model holds: the constructor's (``'default'``) first,
        then those added, in order."""
        return [self.default_adapter_name, *self.named_adapter_specs]

    @property
    def active_adapters(self) -> list[str]:
        """The adapters the forward applies (summed), as PEFT's ``active_adapters``, in the
        model's order. Read from the switch's values: the active set is data, not part of the
        graph (a static attribute would make a jitted step trace again on every change)."""
        switch = vars(self).get("_adapter_switch")
        if switch is None:
            return [self.default_adapter_name]
        if isinstance(switch.get_value(), jax.core.Tracer):
            raise AdapterError(
                "the active adapters are data inside a jitted function (so that set_adapter does not retrace "
                "it): read model.active_adapters or model.trainable outside it, e.g. trainable = model.trainable "
                "before the step, and close over it"
            )
        values = jax.device_get(switch.get_value())
        if values.ndim != 1:
            raise AdapterError("a mixed batch is running: the active adapters differ per sample")
        return [name for name, value in zip(self.switch_names, values, strict=True) if value]

    def add_adapter(
        self,
        adapter_name: str,
        adapter_class: Callable[..., nnx.Module],
        target_layers: Iterable[str] | str,
        *,
        adapter_kwargs: Mapping[str, Any] | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        """Add a LoRA adapter called ``adapter_name`` on the layers ``target_layers`` selects,
        inactive and out of :attr:`trainable` until :meth:`set_adapter`, as PEFT's
        ``add_adapter``: the twin of ``torch_impl.AdaptedModel.add_adapter``.

        Example
        -------
        >>> from flax_impl import LoRA
        >>> net = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
        >>> model = AdaptedModel(net, LoRA, target_layers="layers.0", adapter_kwargs={"rank": 2}, rngs=nnx.Rngs(2))
        >>> model.add_adapter("other", LoRA, ["layers.0", "layers.1"], adapter_kwargs={"rank": 1}, rngs=nnx.Rngs(3))
        >>> model.set_adapter(["default", "other"])
        >>> model.adapters, model.active_adapters
        (['default', 'other'], ['default', 'other'])
        """
        if adapter_of(adapter_class) is not LORA:
            raise AdapterError(
                f"add_adapter adds LoRA adapters; {getattr(adapter_class, '__name__', adapter_class)!r} can only "
                "be the constructor's (default) adapter"
            )
        self._check_new_name(adapter_name)
        patterns = as_patterns(target_layers)
        names = list(self._base_modules())
        check_all_matched(patterns, names, argument="target_layers")
        layers = [name for name in names if name and matches_any(name, patterns)]
        self._add_named(adapter_name, layers, dict(adapter_kwargs or {}), {}, list(patterns), rngs)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make ``adapter_name`` the active adapter (a list: several, summed, as PEFT does for
        LoRA). Only active adapters are :attr:`trainable`. The choice is data (the shared
        :class:`~flax_impl.lora.AdapterSwitch`): a jitted forward is not traced again. An unknown
        name is refused, naming those that exist."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise AdapterError(f"set_adapter needs at least one adapter name; this model has {self.adapters}")
        self._check_known(names)
        self._refresh_switch(active=names)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter():`` the base model's outputs, exactly (every adapter's
        weight 0); the active set comes back after. A model with unfrozen layers is refused."""
        if self.unfrozen_module_names:
            raise AdapterError(
                f"disable_adapter cannot give the base model's outputs: unfrozen layers {self.unfrozen_module_names[:8]} "
                "are trained in place (no original copy is kept)"
            )
        active = self.active_adapters
        switch = self._refresh_switch(active=active, keep=True)
        assert switch is not None  # keep=True holds one
        switch.set_value(jnp.zeros_like(switch.get_value()))
        try:
            yield
        finally:
            self._refresh_switch(active=active)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the added adapter ``adapter_name`` (see the PyTorch twin)."""
        self._check_known([adapter_name])
        if adapter_name == self.default_adapter_name:
            raise AdapterError(
                f"the constructor's adapter {adapter_name!r} cannot be deleted; delete one of {list(self.named_adapter_specs)}"
            )
        spec = self.named_adapter_specs.pop(adapter_name)
        for layer in spec["layers"]:
            module = cast(LoRA, get_submodule(self.adapted_model, layer))
            module.remove_named_adapter(adapter_name)
            if not module.adapter_names():
                module.attach_switch(None, {})
                replace_module(self.adapted_model, layer, module.pretrained_module)
        remaining = [name for name in self._active_before(adapter_name) if name != adapter_name]
        self._refresh_switch(active=remaining or [self.default_adapter_name], rebuild=True)

    def load_adapter(self, path: str | os.PathLike[str], adapter_name: str, *, rngs: nnx.Rngs) -> None:
        """Add the LoRA adapter saved in ``path`` (a PEFT directory, or ours) as ``adapter_name``,
        inactive, as PEFT's ``load_adapter``; a refused load leaves the model as it was."""
        from .pretrained import read_named_adapter

        self._check_new_name(adapter_name)
        found = read_named_adapter(self, path)
        self._add_named(
            adapter_name, found["layers"], found["adapter_kwargs"], found["layer_adapter_kwargs"], [], rngs
        )
        self.named_adapter_specs[adapter_name]["recorded_peft_config"] = found["recorded_peft_config"]
        try:
            self._load_named(adapter_name, found["tensors"], where=found["where"])
        except BaseException:
            self.delete_adapter(adapter_name)
            raise

    def adapter_mask(self, adapter_names: Sequence[str]) -> jax.Array:
        """The per-sample choice of ``adapter_names`` (``'__base__'``: none) as data, shape
        ``(batch, n_adapters)``, for ``model(x, adapter_mask=...)`` inside a jitted step."""
        if isinstance(adapter_names, str):
            raise TypeError("adapter_names must be a list of names, one per sample, not a string")
        self._check_known([name for name in adapter_names if name != BASE_ADAPTER])
        if any(_training(m) for _, m in named_modules(self)):
            raise AdapterError(
                "adapter_names (a mixed batch) is for inference: call model.eval() first, as PEFT requires"
            )
        self._refresh_switch(active=self.active_adapters, keep=True)
        names = self.adapters
        rows = [[1.0 if name == column else 0.0 for column in names] for name in adapter_names]
        return jnp.asarray(rows, jnp.float32)

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        *,
        rngs: nnx.Rngs,
    ) -> None:
        """Add ``adapter_name``, a weighted combination of the LoRA ``adapters``, inactive, with
        PEFT's formulas and refusals: the twin of ``torch_impl.AdaptedModel.add_weighted_adapter``
        (the same :func:`twinformat.adapters.weighted_lora_factors`)."""
        from twinformat.adapters import WEIGHTED_COMBINATIONS, lora_scaling, weighted_lora_factors

        from .pretrained import peft_layer_kind

        self._check_new_name(adapter_name)
        self._check_known(adapters)
        if combination_type not in WEIGHTED_COMBINATIONS:
            raise AdapterError(
                f"combination_type {combination_type!r} is not computed; give one of {list(WEIGHTED_COMBINATIONS)}"
            )
        factors = []
        for name in adapters:
            spec = self._spec(name)
            if adapter_of(spec["adapter_class"]) is not LORA:
                raise AdapterError(
                    f"adapter {name!r} is a {spec['adapter_class'].__name__}; only LoRA adapters combine"
                )
            state = self.adapter_state_dict(name)
            layer_factors = {}
            for layer in spec["layers"]:
                options = {**spec["adapter_kwargs"], **spec["layer_adapter_kwargs"].get(layer, {})}
                if options.get("use_dora"):
                    raise AdapterError(
                        f"adapter {name!r} uses DoRA: PEFT gives a combined adapter's magnitude its initial value, "
                        "which depends on the new factors' random initialisation; combine LoRA adapters without DoRA"
                    )
                down, up = (state[f"adapted_model.{layer}.{part}"] for part in _FACTORS)
                layer_factors[layer] = (down, up, lora_scaling(options))
            factors.append(layer_factors)
        modules = self._base_modules()
        embeddings = [name for name, module in modules.items() if peft_layer_kind(module) == "embedding"]
        rank, combined = weighted_lora_factors(factors, weights, combination_type, embeddings=embeddings)
        first = self._spec(adapters[0])["adapter_kwargs"]
        kwargs = {
            "rank": rank,
            "alpha": float(rank),
            **{k: first[k] for k in ("dropout", "use_rslora") if k in first},
        }
        layers = [name for name in modules if name in combined]
        self._add_named(adapter_name, layers, kwargs, {}, [], rngs)
        arrays = {
            f"adapted_model.{layer}.{part}": array
            for layer in layers
            for part, array in zip(_FACTORS, combined[layer], strict=True)
        }
        self._load_named(adapter_name, arrays, where=f"add_weighted_adapter({list(adapters)})")

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None) -> nnx.Module:
        """Merge the adapters ``adapter_names`` (default: the active ones) into the base kernels,
        in that order as PEFT does, and return the base model without any adapter: the twin of
        ``torch_impl.AdaptedModel.merge_and_unload``."""
        from .merge import _unwrap_all, merge_and_unload

        if (
            adapter_names is None
            and not self.named_adapter_specs
            and self.default_adapter_name == DEFAULT_ADAPTER
        ):
            return merge_and_unload(self)
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        self._check_known(names)
        slots = [self._slot(name) for name in names]
        layers = self._adapter_layers()
        unmergeable = [type(m).__name__ for m in layers if not isinstance(m, LoRA)]
        if unmergeable and DEFAULT_ADAPTER in slots:
            raise AdapterError(f"the default adapter is a {unmergeable[0]}, which cannot be merged")
        for layer in layers:
            layer.attach_switch(None, {})
            if isinstance(layer, LoRA):
                chosen = [slot for slot in slots if slot in layer.adapter_names()]
                if chosen:
                    layer.merge_adapters(chosen)
        return _unwrap_all(self.adapted_model)

    def _spec(self, name: str) -> dict[str, Any]:
        """What built adapter ``name``: class, kwargs, layers and per-layer kwargs."""
        if name == self.default_adapter_name:
            return {
                "adapter_class": self.adapter_class,
                "adapter_kwargs": self.adapter_kwargs,
                "layers": self.replace_layers,
                "layer_adapter_kwargs": self.layer_adapter_kwargs,
            }
        return self.named_adapter_specs[name]

    def adapter_state_dict(self, adapter_name: str) -> dict[str, Any]:
        """The tensors of one adapter in PyTorch names and layouts, keyed as a one-adapter
        model's (``adapted_model.<layer>.adapter_down_proj.weight``): the default's with the
        unfrozen layers, an added one's without, whether active or not."""
        self._check_known([adapter_name])
        params = [path for path, _ in nnx.to_flat_state(nnx.state(self, nnx.Param))]
        if adapter_name == self.default_adapter_name:
            filter_ = self._filter(default=True, named=())
            paths = [p for p in params if filter_(p, nnx.Param(0))]
            return _torch_arrays(_entries_at(self, [*paths, *self._unfrozen_buffer_paths()]))
        filter_ = self._filter(default=False, named=(adapter_name,))
        arrays = _torch_arrays(_entries_at(self, [p for p in params if filter_(p, nnx.Param(0))]))
        marker = f".named_adapters.{adapter_name}."
        return {key.replace(marker, "."): value for key, value in arrays.items()}

    def _check_new_name(self, name: object) -> None:
        if (
            not isinstance(name, str)
            or not name
            or "." in name
            or name == BASE_ADAPTER
            or name == DEFAULT_ADAPTER
        ):
            raise AdapterError(
                f"adapter name {name!r} is not allowed: a non-empty string without '.', not {BASE_ADAPTER!r} "
                f"or {DEFAULT_ADAPTER!r}"
            )
        if name in self.adapters:
            raise AdapterError(f"this model already holds an adapter named {name!r}: {self.adapters}")

    def _check_known(self, names: Iterable[str]) -> None:
        unknown = [name for name in names if name not in self.adapters]
        if unknown:
            raise AdapterError(f"no adapter named {unknown[0]!r}; this model holds {self.adapters}")

    def _slot(self, name: str) -> str:
        return DEFAULT_ADAPTER if name == self.default_adapter_name else name

    def _base_modules(self) -> dict[str, Any]:
        """The base model's modules by name, each adapter's wrapped layer in its place."""
        out: dict[str, Any] = {}
        inside: tuple[str, ...] = ()
        for name, module in named_modules(self.adapted_model):
            if inside and name.startswith(inside):
                continue
            kind = adapter_of(module)
            if kind is not None:
                out[name] = getattr(module, kind.wrapped)
                inside = (*inside, f"{name}." if name else "")
            else:
                out[name] = module
        return out

    def _adapter_layers(self) -> list[Any]:
        return [
            m
            for _, m in named_modules(self.adapted_model)
            if adapter_of(m) is not None and hasattr(m, "attach_switch")
        ]

    def _active_before(self, deleted: str) -> list[str]:
        """The active set read from the switch, whose columns still include ``deleted``."""
        switch = vars(self).get("_adapter_switch")
        if switch is None:
            return [self.default_adapter_name]
        values = jax.device_get(switch.get_value())
        return [
            name for name, value in zip(self.switch_names, values, strict=True) if value and name != deleted
        ]

    def _refresh_switch(
        self, *, active: Sequence[str], keep: bool = False, rebuild: bool = False
    ) -> AdapterSwitch | None:
        """Write the ``active`` set into the shared switch (values only, when its columns are
        the same: no graph changes); create it, or drop it when the model is back to one adapter
        active alone (``keep``: hold it anyway, for a mask or ``disable_adapter``)."""
        names = tuple(self.adapters)
        values = jnp.asarray([1.0 if n in active else 0.0 for n in names], jnp.float32)
        switch = vars(self).get("_adapter_switch")
        one = not self.named_adapter_specs and list(active) == [self.default_adapter_name]
        if one and not keep:
            if switch is not None:
                for layer in self._adapter_layers():
                    layer.attach_switch(None, {})
                del self._adapter_switch
                del self.switch_names
            return None
        if switch is None or rebuild or vars(self).get("switch_names") != names:
            switch = AdapterSwitch(values)
            self._adapter_switch = switch
            self.switch_names = names
            columns = {self._slot(n): i for i, n in enumerate(names)}
            for layer in self._adapter_layers():
                layer.attach_switch(switch, {n: columns[n] for n in layer.adapter_names()})
        else:
            switch.set_value(values)
        return switch

    def _add_named(
        self,
        adapter_name: str,
        layers: Sequence[str],
        kwargs: Mapping[str, Any],
        layer_kwargs: Mapping[str, Mapping[str, Any]],
        patterns: Sequence[str],
        rngs: nnx.Rngs,
    ) -> None:
        """Build the LoRA branches of a new adapter on ``layers`` (all before changing any layer),
        then put them in place, inactive."""
        unfrozen = [
            layer
            for layer in layers
            if any(layer == u or layer.startswith(f"{u}.") or not u for u in self.unfrozen_module_names)
        ]
        if unfrozen:
            raise AdapterInsertionError(
                f"layers {unfrozen[:8]} are unfrozen (trained in place); an adapter on them would freeze them"
            )
        built: list[tuple[str, Any, bool]] = []
        for layer in layers:
            module = get_submodule(self.adapted_model, layer)
            options = {**kwargs, **layer_kwargs.get(layer, {})}
            try:
                if isinstance(module, LoRA):
                    built.append(
                        (layer, LoRABranch(LoRA(module.pretrained_module, **options, rngs=rngs)), True)
                    )
                elif adapter_of(module) is not None:
                    raise AdapterInsertionError(
                        f"layer {layer!r} holds a {type(module).__name__}; only LoRA layers hold several adapters"
                    )
                else:
                    new = LoRA(cast(Any, module), **options, rngs=rngs)
                    new.keep_only_named(adapter_name)
                    built.append((layer, new, False))
            except (ValueError, TypeError) as exc:
                raise _with_message(
                    exc,
                    f"cannot add adapter {adapter_name!r} on layer {layer!r} ({type(module).__name__}): {exc}",
                ) from exc
        for layer, built_module, beside in built:
            if beside:
                holder = cast(LoRA, get_submodule(self.adapted_model, layer))
                holder.add_named_adapter(adapter_name, cast(LoRABranch, built_module))
            else:
                replace_module(self.adapted_model, layer, built_module)
        self.named_adapter_specs[adapter_name] = {
            "adapter_class": LoRA,
            "adapter_kwargs": dict(kwargs),
            "layers": list(layers),
            "layer_adapter_kwargs": {k: dict(v) for k, v in layer_kwargs.items()},
            "target_layers": list(patterns),
        }
        self._refresh_switch(active=self._active_before(adapter_name), rebuild=True)

    def _load_named(self, adapter_name: str, arrays: Mapping[str, Any], *, where: str) -> None:
        """Load one-adapter keys (torch names and layouts) into the added adapter ``adapter_name``;
        every key and shape checked before anything is assigned."""
        layers = sorted(self.named_adapter_specs[adapter_name]["layers"], key=len, reverse=True)
        mapped = {}
        for key, value in arrays.items():
            layer = next((name for name in layers if key.startswith(f"adapted_model.{name}.")), None)
            if layer is None:
                mapped[key] = value
                continue
            rest = key[len(f"adapted_model.{layer}.") :]
            mapped[f"adapted_model.{layer}.named_adapters.{adapter_name}.{rest}"] = value
        report, assignments = _plan_load(self, mapped, strict=False)
        marker = f".named_adapters.{adapter_name}."
        missing = [key for key in report.missing if marker in key]
        unexpected = report.unexpected + [
            key for key in mapped if marker not in key and key not in report.unexpected
        ]
        if unexpected or report.mismatched or missing:
            raise CheckpointError(
                f"adapter {where!r} does not fit adapter {adapter_name!r} of this model: unexpected keys "
                f"{unexpected[:8]}, mis-shaped keys {report.mismatched[:8]}, missing keys {missing[:8]}"
            )
        _assign(assignments)

    def _filter(self, *, default: bool, named: Sequence[str]) -> TrainableFilter:
        """The parameters of the default adapter (and the unfrozen layers) if ``default``, and of
        the added adapters ``named``."""
        adapters = self.replace_layers if (self.adapters_inserted and default) else []
        include = {_path_under_model(name) for name in adapters}
        if default:
            include |= {_path_under_model(name) for name in self.unfrozen_module_names}
        exclude = {_path_under_model(name) for name in self.wrapped_layer_names}
        reinclude = set()
        for name, spec in self.named_adapter_specs.items():
            for layer in spec["layers"]:
                exclude.add((*_path_under_model(layer), "named_adapters"))
                if name in named:
                    reinclude.add((*_path_under_model(layer), "named_adapters", name))
        return TrainableFilter(frozenset(include), frozenset(exclude), frozenset(reinclude))

    @property
    def trainable(self) -> TrainableFilter:
        """The NNX filter of the parameters that train: adapters plus ``unfrozen_layers``; with
        named adapters, the active ones only (it follows :meth:`set_adapter`).

        Paths are relative to this ``AdaptedModel``: pass the wrapper itself (not
        ``adapted_model``) to ``nnx.Optimizer``, ``nnx.grad`` and ``nnx.state``. With named
        adapters, read it outside a jitted step and close over it (inside, the active set is
        data: see :meth:`set_adapter`); a new active set is a new filter, hence a new step.
        """
        if not self.named_adapter_specs and self.default_adapter_name == DEFAULT_ADAPTER:
            adapters = self.replace_layers if self.adapters_inserted else []
            include = {_path_under_model(name) for name in (*adapters, *self.unfrozen_module_names)}
            exclude = {_path_under_model(name) for name in self.wrapped_layer_names}
            return TrainableFilter(frozenset(include), frozenset(exclude))
        active = self.active_adapters
        return self._filter(default=self.default_adapter_name in active, named=active)

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
        metadata.update(layer_kwargs_entry(self.layer_adapter_kwargs))  # PEFT's rank/alpha patterns
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
        check_recorded_layer_kwargs(metadata, self.layer_adapter_kwargs, where=where)
        report, assignments = _plan_load(self, arrays, strict=False)
        trainable = {entry.key for entry in _entries_at(self, self._trainable_paths())}
        missing = [key for key in report.missing if key in trainable]
        if report.unexpected or report.mismatched or missing:
            raise CheckpointError(misfit_message(where, report, missing))
        _assign(assignments)

    def parameter_transfer(self, path: str) -> None:
        """Load parameters for transfer (SpeechBrain's Pretrainer hook); same as ``loader``."""
        self.loader(path, True)

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        *,
        selected_adapters: Sequence[str] | None = None,
        base_model_name_or_path: str | None = None,
        task_type: str | None = None,
    ) -> str | dict[str, str]:
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

        With several adapters, PEFT's multi-adapter layout (the default at the root, others in
        ``<name>/``; ``selected_adapters``: only those), returning ``{name: format}``.

        Example
        -------
        >>> import tempfile
        >>> from flax_impl import HoulsbyAdapterLinear
        >>> model = AdaptedModel(nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0))), HoulsbyAdapterLinear,
        ...                      target_layers="layers.0", adapter_kwargs={"projection_size": 2}, rngs=nnx.Rngs(1))
        >>> model.save_pretrained(tempfile.mkdtemp() + "/houlsby")
        'peft-twins'
        """
        from .pretrained import save_adapters, save_pretrained

        if (
            not self.named_adapter_specs
            and self.default_adapter_name == DEFAULT_ADAPTER
            and (selected_adapters is None or list(selected_adapters) == [DEFAULT_ADAPTER])
        ):
            return save_pretrained(
                self, directory, base_model_name_or_path=base_model_name_or_path, task_type=task_type
            )
        return save_adapters(
            self,
            directory,
            self.adapters if selected_adapters is None else list(selected_adapters),
            base_model_name_or_path=base_model_name_or_path,
            task_type=task_type,
        )

    @classmethod
    def from_pretrained(
        cls,
        base_model: nnx.Module,
        directory: str | os.PathLike[str],
        *,
        rngs: nnx.Rngs,
        adapter_name: str = DEFAULT_ADAPTER,
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

        if (
            not isinstance(adapter_name, str)
            or not adapter_name
            or "." in adapter_name
            or adapter_name == BASE_ADAPTER
        ):
            raise AdapterError(
                f"adapter_name {adapter_name!r} is not allowed: a non-empty string without '.'"
            )
        model = from_pretrained(cls, base_model, directory, rngs=rngs)
        model.default_adapter_name = adapter_name
        return model

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


def _training(module: Any) -> bool:
    """Whether ``module`` is a dropout in training mode (``model.train()``)."""
    return isinstance(module, nnx.Dropout) and not module.deterministic


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
