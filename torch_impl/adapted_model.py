"""``AdaptedModel``: wrap a model, put adapters on the layers the patterns select, freeze the rest.

A drop-in for ``speechbrain.nnet.adapters.AdaptedModel`` (1.1.x): same names, signatures,
attribute names, ``state_dict`` keys, initialisation order and forward math, so checkpoints cross
both ways and a seeded run reproduces after the swap. Where SpeechBrain has bugs we depart on
purpose (see the README's "Departures" list): a single string is one pattern, patterns that
match nothing raise, a second ``insert_adapters()`` raises, ``__getattr__`` does not shadow the
wrapper's own attributes, and adapted ``nn.TransformerEncoderLayer`` linears work in eval mode.

Authors of the original: Titouan Parcollet, Peter Plantinga (SpeechBrain, 2024).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from twinformat.adapters import LORA, adapter_class_name, adapter_of
from twinformat.errors import AdapterError, AdapterInsertionError, CheckpointError, NoMatchError
from twinformat.format import adapter_metadata
from twinformat.names import (
    as_patterns,
    check_all_matched,
    check_flags,
    check_layer_kwargs_names,
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
from twinformat.report import compare_keys, misfit_message

from . import _speechbrain, distributed
from .checkpoint import load_state_dict_file, save_state_dict_file
from .interchange import layer_kind
from .lora import BASE_ADAPTER, DEFAULT_ADAPTER, LoRA, LoRABranch

__all__ = ["MHA_WARNING", "AdaptedModel", "is_layer_adaptable", "replace_module"]

MHA_WARNING = """
Torch's native multi-head attention is not adaptable since it accesses layer
weights directly to pass to highly optimized fused kernels. We are excluding
all native Torch MHA layers from the list of layers to adapt.
"""

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: A LoRA adapter's factors, as one-adapter keys name them after the layer.
_FACTORS = ("adapter_down_proj.weight", "adapter_up_proj.weight")


class AdaptedModel(nn.Module):
    """Wrap a model and replace its target layers with adapters, keeping their parameters.

    Every parameter of ``model_to_adapt`` is frozen; adapters and the layers matched by
    ``unfrozen_layers`` train.

    Arguments
    ---------
    model_to_adapt: nn.Module
        The base PyTorch model to add adapters to.
    adapter_class: class
        An (uninitialized) adapter class, e.g. :class:`LoRA` or :class:`HoulsbyAdapterLinear`.
    all_linear: bool
        Whether to add the adapter to all linear layers (default: False).
    all_conv: bool
        Whether to add the adapter to all conv layers (default: False).
    target_layers: list of str
        Names of the modules to replace; shell-style wildcards ``(*, ?, [seq], [!seq])``.
        A single string is one pattern. A pattern that matches no layer raises ``ValueError``.
    unfrozen_layers: list of str
        Names of layers to unfreeze for training, with the same wildcards.
    adapter_kwargs: dict
        Keyword arguments given to the adapter class.
    manual_adapter_insertion: bool
        When True, call :meth:`insert_adapters` yourself (e.g. after loading pretrained
        parameters); otherwise adapters are inserted now.
    layer_adapter_kwargs: dict
        Layer name -> keyword arguments that replace ``adapter_kwargs``' for that layer (PEFT's
        ``rank_pattern``/``alpha_pattern``: ``{"encoder.0.fc": {"rank": 32}}``); every name
        must be a layer the model adapts. Keyword only; not in SpeechBrain's signature.

    Example
    -------
    >>> from collections import OrderedDict
    >>> from torch_impl import LoRA
    >>> model = torch.nn.Sequential(
    ...   OrderedDict([
    ...     ("layer1", torch.nn.Linear(10, 20)),
    ...     ("layer2", torch.nn.Linear(20, 20)),
    ...     ("layer3", torch.nn.Linear(20, 10)),
    ...   ])
    ... )
    >>> lora_model = AdaptedModel(
    ...   model_to_adapt=model,
    ...   adapter_class=LoRA,
    ...   target_layers=["layer[13]"],
    ...   unfrozen_layers=["layer2"],
    ...   adapter_kwargs={"rank": 2},
    ... )
    >>> lora_model
    AdaptedModel(
      (adapted_model): Sequential(
        (layer1): LoRA(
          (pretrained_module): Linear(in_features=10, out_features=20, bias=True)
          (adapter_down_proj): Linear(in_features=10, out_features=2, bias=False)
          (adapter_up_proj): Linear(in_features=2, out_features=20, bias=False)
        )
        (layer2): Linear(in_features=20, out_features=20, bias=True)
        (layer3): LoRA(
          (pretrained_module): Linear(in_features=20, out_features=10, bias=True)
          (adapter_down_proj): Linear(in_features=20, out_features=2, bias=False)
          (adapter_up_proj): Linear(in_features=2, out_features=10, bias=False)
        )
      )
    )
    """

    def __init__(
        self,
        model_to_adapt: nn.Module,
        adapter_class: type[nn.Module],
        all_linear: bool = False,
        all_conv: bool = False,
        target_layers: Iterable[str] | str = (),
        unfrozen_layers: Iterable[str] | str = (),
        adapter_kwargs: Mapping[str, Any] | None = None,
        manual_adapter_insertion: bool = False,
        *,
        layer_adapter_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model_to_adapt, nn.Module):
            raise TypeError(f"model_to_adapt must be an nn.Module instance, got {model_to_adapt!r:.100}")
        if not callable(adapter_class):
            raise TypeError(f"adapter_class must be an adapter class such as LoRA, got {adapter_class!r}")
        check_flags(all_linear=all_linear, all_conv=all_conv)
        target_layers = as_patterns(target_layers)
        unfrozen_layers = as_patterns(unfrozen_layers)

        # Validate before touching the user's model: a refused call leaves it as it was.
        named = list(model_to_adapt.named_modules())
        names = [name for name, _ in named]
        check_all_matched(target_layers, names, argument="target_layers")
        check_all_matched(unfrozen_layers, names, argument="unfrozen_layers")
        if all_linear and not any(isinstance(m, nn.Linear) for _, m in named):
            raise NoMatchError(
                f"all_linear=True but the model has no nn.Linear layer; layers: {_types(named)}"
            )
        if all_conv and not any(isinstance(m, _CONV_TYPES) for _, m in named):
            raise NoMatchError(
                f"all_conv=True but the model has no nn.Conv1d/2d/3d layer; layers: {_types(named)}"
            )

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
        self._active_adapters = [DEFAULT_ADAPTER]
        requires_grad = _requires_grad_flags(model_to_adapt)
        try:
            for param in model_to_adapt.parameters():
                param.requires_grad = False

            # Same walk as SpeechBrain: adaptable layers are queued, other matches are unfrozen.
            self.replace_layers: list[str] = []
            self.unfrozen_module_names: list[str] = []
            for name, module in named:
                if is_layer_adaptable(name, module, all_linear, all_conv, target_layers):
                    parent = model_to_adapt.get_submodule(parent_and_leaf(name)[0]) if name else None
                    if isinstance(parent, nn.MultiheadAttention):
                        warnings.warn(MHA_WARNING, stacklevel=2)
                    else:
                        self.replace_layers.append(name)
                elif matches_unfrozen(name, unfrozen_layers):
                    self.unfrozen_module_names.append(name)
                    for param in module.parameters():
                        param.requires_grad = True

            check_layer_kwargs_names(self.layer_adapter_kwargs, self.replace_layers)
            self.adapters_inserted = False
            _speechbrain.register_if_loaded(type(self))
            if not manual_adapter_insertion:
                self.insert_adapters()
        except BaseException:
            _restore_requires_grad(requires_grad)
            raise

    def insert_adapters(self) -> None:
        """Replace the queued layers with adapters. Call exactly once, before training.

        Raises :class:`AdapterInsertionError` on a second call, which would otherwise wrap
        adapters inside adapters.
        """
        if self.adapters_inserted:
            raise AdapterInsertionError(
                "insert_adapters() was already called on this AdaptedModel; a second call "
                f"would wrap adapters in adapters (layers: {self.replace_layers})"
            )
        # Build every adapter before replacing any layer, so that a layer the adapter class
        # refuses leaves the model unchanged. Creation order (hence the random numbers) is
        # SpeechBrain's: one adapter per queued layer, in named_modules() order.
        requires_grad = _requires_grad_flags(self.adapted_model)
        new_modules = []
        try:
            for name in self.replace_layers:
                module = self.adapted_model.get_submodule(name)
                kwargs = {**self.adapter_kwargs, **self.layer_adapter_kwargs.get(name, {})}
                try:
                    new_modules.append(self.adapter_class(module, **kwargs))
                except (ValueError, TypeError) as exc:
                    adapter_name = getattr(self.adapter_class, "__name__", repr(self.adapter_class))
                    raise _with_message(
                        exc,
                        f"cannot wrap layer {name or '<root>'!r} ({type(module).__name__}) in {adapter_name}: {exc}",
                    ) from exc
        except BaseException:
            _restore_requires_grad(requires_grad)
            raise
        for name, new_module in zip(self.replace_layers, new_modules, strict=True):
            if name:
                replace_module(self.adapted_model, name, new_module)
            else:  # the root itself is the adaptable layer (e.g. a bare nn.Linear)
                self.adapted_model = new_module
        self.adapters_inserted = True
        _disable_transformer_fast_path(self.adapted_model, self.replace_layers)

    def forward(
        self,
        *args: Any,
        adapter_names: Sequence[str] | None = None,
        adapter_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Pass arguments to the adapted model.

        ``adapter_names`` (PEFT's mixed batch): one adapter name per sample of the batch (the
        first axis of every adapted layer's input), ``'__base__'`` for the base model; each
        sample goes through its own adapter, whatever is active. Inference only, as in PEFT.
        ``adapter_mask=model.adapter_mask(names)`` gives the same choice as a tensor, so that a
        CUDA graph captured once serves any mix (copy another mask into it before replaying).
        """
        with self._per_sample(adapter_names, adapter_mask):
            return self.adapted_model(*args, **kwargs)

    def generate(
        self,
        *args: Any,
        adapter_names: Sequence[str] | None = None,
        adapter_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The adapted model's ``generate`` (transformers'), with PEFT's mixed batch:
        ``adapter_names`` gives one adapter per prompt (``'__base__'``: none) for every forward
        of the decoding, as ``PeftModel.generate(..., adapter_names=...)`` does. Where
        ``generate`` repeats each prompt (``num_beams``, ``num_return_sequences``), each copy
        keeps its prompt's adapter, as in PEFT (an encoder that runs on the prompts alone takes
        the names as given). ``adapter_mask`` is the same choice as a tensor.

        Example
        -------
        >>> import transformers
        >>> from torch_impl import LoRA
        >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        >>> model = AdaptedModel(transformers.LlamaForCausalLM(config), LoRA, target_layers=["*q_proj"]).eval()
        >>> model.add_adapter("b", LoRA, ["*v_proj"])
        >>> ids = torch.tensor([[1, 5, 7], [1, 9, 2]])
        >>> model.generate(ids, max_new_tokens=2, do_sample=False, adapter_names=["b", "__base__"]).shape
        torch.Size([2, 5])
        """
        generate = getattr(self.adapted_model, "generate", None)
        if generate is None:
            raise AttributeError(f"{type(self.adapted_model).__name__} has no generate method to call")
        with self._per_sample(adapter_names, adapter_mask):
            return generate(*args, **kwargs)

    @contextlib.contextmanager
    def _per_sample(
        self, adapter_names: Sequence[str] | None, adapter_mask: torch.Tensor | None
    ) -> Iterator[None]:
        """One adapter per sample for the forwards run inside (nothing when both are None)."""
        if adapter_names is not None and adapter_mask is not None:
            raise TypeError("give adapter_names or adapter_mask, not both")
        if adapter_names is None and adapter_mask is None:
            yield
            return
        if adapter_names is not None:
            layers = self._sample_layers(adapter_names)
            adapter_mask = self._mask_rows(adapter_names)
        else:
            layers = self._sample_layers([])
        mask = cast(torch.Tensor, adapter_mask)
        if adapter_names is None and len(layers) != len(self._adapter_layers()):
            # A Houlsby (or other) default adapter cannot take part: read the mask to say so.
            if bool(mask[:, 0].any()):
                self._sample_layers([self.default_adapter_name])  # raises, naming the adapter kind
        if mask.dim() != 2 or mask.shape[1] != len(self.adapters):
            raise AdapterError(
                f"adapter_mask must have shape (batch, {len(self.adapters)}), one column per adapter of "
                f"{self.adapters}; got {tuple(mask.shape)}: make it with model.adapter_mask(names)"
            )
        columns = {self._slot(name): i for i, name in enumerate(self.adapters)}
        if adapter_names is None and not all(layer._can_mix(columns) for layer in layers):
            # A layer that gathers each adapter's samples needs the names: read them from the
            # mask once for the whole forward (a host sync; the concatenated path needs none).
            picked = [row.nonzero().flatten().tolist() for row in mask.detach().cpu()]
            adapter_names = [self.adapters[p[0]] if p else BASE_ADAPTER for p in picked]
        names = (
            None
            if adapter_names is None
            else [self._slot(n) if n != BASE_ADAPTER else n for n in adapter_names]
        )
        # Per-sample weights and expanded masks, computed once per call (a whole generate()).
        shared: dict[Any, torch.Tensor] = {}
        for layer in layers:
            layer.set_sample_adapters(names, mask=mask, columns=columns, shared=shared)
        try:
            yield
        finally:
            for layer in layers:
                layer.set_sample_adapters(None)

    def adapter_mask(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """The per-sample choice of ``adapter_names`` (``'__base__'``: none) as a float32 tensor of
        shape ``(batch, len(self.adapters))`` on the model's device, for ``model(x,
        adapter_mask=...)``: the twin of ``flax_impl.AdaptedModel.adapter_mask``.

        Example
        -------
        >>> from torch_impl import LoRA
        >>> model = AdaptedModel(nn.Sequential(nn.Linear(4, 4)), LoRA, target_layers=["0"]).eval()
        >>> model.add_adapter("b", LoRA, ["0"])
        >>> model.adapter_mask(["b", "__base__", "default"])
        tensor([[0., 1.],
                [0., 0.],
                [1., 0.]])
        """
        self._sample_layers(adapter_names)  # PEFT's checks: known names, eval mode
        return self._mask_rows(adapter_names)

    def _mask_rows(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """:meth:`adapter_mask` without its checks (the caller made them)."""
        names = self.adapters
        rows = [[1.0 if name == column else 0.0 for column in names] for name in adapter_names]
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        return torch.tensor(rows, dtype=torch.float32, device=device).reshape(len(rows), len(names))

    # --- named adapters (PEFT's names and meaning) ----------------------------------------

    @property
    def adapters(self) -> list[str]:
        """The names of the adapters this model holds: the constructor's (``'default'``) first,
        then those added, in order."""
        return [self.default_adapter_name, *self.named_adapter_specs]

    @property
    def active_adapters(self) -> list[str]:
        """The adapters the forward applies (summed, in this order), as PEFT's ``active_adapters``."""
        return list(self._active_adapters)

    def add_adapter(
        self,
        adapter_name: str,
        adapter_class: type[nn.Module],
        target_layers: Iterable[str] | str,
        *,
        adapter_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """Add a LoRA adapter called ``adapter_name`` on the layers ``target_layers`` selects
        (patterns as the constructor's), inactive and frozen until :meth:`set_adapter`, as
        PEFT's ``add_adapter``. It may target other layers, ranks and options (DoRA, rsLoRA,
        dropout) than the others; a layer holding a Houlsby adapter cannot take a second one.
        The default adapter's parameters, keys and files stay as they were.

        Example
        -------
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> model = AdaptedModel(net, LoRA, target_layers="0", adapter_kwargs={"rank": 2})
        >>> model.add_adapter("other", LoRA, ["0", "1"], adapter_kwargs={"rank": 1, "use_rslora": True})
        >>> model.adapters, model.active_adapters
        (['default', 'other'], ['default'])
        >>> model.set_adapter(["default", "other"])
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)[-1]
        'adapted_model.1.named_adapters.other.adapter_up_proj.weight'
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
        self._add_named(adapter_name, layers, dict(adapter_kwargs or {}), {}, list(patterns))

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make ``adapter_name`` the active adapter (a list: several, their updates summed, as
        PEFT does for LoRA). Only active adapters train: ``requires_grad`` follows. An unknown
        name is refused, naming those that exist (PEFT silently activates nothing).
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise AdapterError(f"set_adapter needs at least one adapter name; this model has {self.adapters}")
        self._check_known(names)
        self._active_adapters = list(dict.fromkeys(names))
        self._switch_layers(self._active_adapters)
        for name in self.adapters:
            for param in self._adapter_parameters(name):
                param.requires_grad_(name in self._active_adapters)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter():`` the base model's outputs, exactly (every adapter
        left out of the forward; the active set comes back after). Unfrozen layers are trained in
        place, so a model with any is refused (PEFT keeps an original copy of its modules_to_save)."""
        if self.unfrozen_module_names:
            raise AdapterError(
                f"disable_adapter cannot give the base model's outputs: unfrozen layers {self.unfrozen_module_names[:8]} "
                "are trained in place (no original copy is kept)"
            )
        self._switch_layers([])
        try:
            yield
        finally:
            self._switch_layers(self._active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the added adapter ``adapter_name`` (its parameters and, where it was a layer's
        only adapter, its wrapper). The constructor's adapter cannot be deleted (its parameters
        are the model's own keys). Active adapters lose it; none left means the default."""
        self._check_known([adapter_name])
        if adapter_name == self.default_adapter_name:
            raise AdapterError(
                f"the constructor's adapter {adapter_name!r} cannot be deleted; delete one of {list(self.named_adapter_specs)}"
            )
        spec = self.named_adapter_specs.pop(adapter_name)
        for layer in spec["layers"]:
            module = cast(LoRA, self.adapted_model.get_submodule(layer))
            module.remove_named_adapter(adapter_name)
            if not module.adapter_names():
                replace_module(self.adapted_model, layer, module.pretrained_module)
        remaining = [name for name in self._active_adapters if name != adapter_name]
        self.set_adapter(remaining or [self.default_adapter_name])

    def load_adapter(self, path: str | os.PathLike[str], adapter_name: str) -> None:
        """Add the LoRA adapter saved in ``path`` (a PEFT directory, or ours) as ``adapter_name``,
        inactive, as PEFT's ``load_adapter``: its layers, ranks (rank/alpha patterns too) and
        options as saved. A refused load (a layer the model lacks, a shape that does not fit)
        leaves the model as it was."""
        from .pretrained import read_named_adapter

        self._check_new_name(adapter_name)
        found = read_named_adapter(self, path)
        self._add_named(
            adapter_name, found["layers"], found["adapter_kwargs"], found["layer_adapter_kwargs"], []
        )
        self.named_adapter_specs[adapter_name]["recorded_peft_config"] = found["recorded_peft_config"]
        try:
            self._load_named(adapter_name, found["tensors"], where=found["where"])
        except BaseException:
            self.delete_adapter(adapter_name)
            raise

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
    ) -> None:
        """Add ``adapter_name``, a weighted combination of the LoRA ``adapters``, inactive, with
        PEFT's formulas (``'linear'``: factors summed with ``sqrt(|weight * scaling|)``; ``'cat'``:
        factors stacked along the rank, see :func:`twinformat.adapters.weighted_lora_factors`),
        rank and alpha the new rank, the first adapter's other options. Refused by name: other
        combination types (PEFT's default ``'svd'`` among them), ``'linear'`` over different
        ranks (as PEFT), DoRA adapters (PEFT gives the new magnitude its initial value, which
        depends on the new factors' random initialisation), an existing name (PEFT silently keeps it).
        """
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
                down, up = (
                    state[f"adapted_model.{layer}.{part}"].detach().cpu().numpy() for part in _FACTORS
                )
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
        self._add_named(adapter_name, layers, kwargs, {}, [])
        tensors = {}
        for layer in layers:
            for part, array in zip(_FACTORS, combined[layer], strict=True):
                tensors[f"adapted_model.{layer}.{part}"] = torch.from_numpy(array)
        self._load_named(adapter_name, tensors, where=f"add_weighted_adapter({list(adapters)})")

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Merge the adapters ``adapter_names`` (default: the active ones) into the base weights,
        in that order as PEFT does, and return the base model without any adapter (the others
        dropped). A one-adapter model merges as :func:`torch_impl.merge_and_unload`."""
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

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors of one adapter, keyed as a one-adapter model's ``state_dict()``
        (``adapted_model.<layer>.adapter_down_proj.weight``, ...): the default's with the unfrozen
        layers, an added one's without, whether active or not."""
        self._check_known([adapter_name])
        full = self.state_dict()
        if adapter_name == self.default_adapter_name:
            keys = [key for key in full if self._is_default_key(key)]
            return {key: full[key] for key in keys}
        out = {}
        for layer in self.named_adapter_specs[adapter_name]["layers"]:
            prefix = f"adapted_model.{layer}.named_adapters.{adapter_name}."
            out.update(
                {
                    f"adapted_model.{layer}.{k[len(prefix) :]}": v
                    for k, v in full.items()
                    if k.startswith(prefix)
                }
            )
        return out

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
        """The name a layer knows adapter ``name`` by (the constructor's is always its default)."""
        return DEFAULT_ADAPTER if name == self.default_adapter_name else name

    def _base_modules(self) -> dict[str, nn.Module]:
        """The base model's modules by name, each adapter's wrapped layer in its place."""
        out: dict[str, nn.Module] = {}
        inside: tuple[str, ...] = ()
        for name, module in self.adapted_model.named_modules():
            if inside and name.startswith(inside):
                continue
            kind = adapter_of(module)
            if kind is not None:
                out[name] = getattr(module, kind.wrapped)
                inside = (*inside, f"{name}." if name else "")
            else:
                out[name] = module
        return out

    def _add_named(
        self,
        adapter_name: str,
        layers: Sequence[str],
        kwargs: Mapping[str, Any],
        layer_kwargs: Mapping[str, Mapping[str, Any]],
        patterns: Sequence[str],
    ) -> None:
        """Build the LoRA branches of a new adapter on ``layers`` (all before changing any layer,
        so a refusal leaves the model as it was), then put them in place, inactive."""
        unfrozen = [layer for layer in layers if self._is_unfrozen(layer)]
        if unfrozen:
            raise AdapterInsertionError(
                f"layers {unfrozen[:8]} are unfrozen (trained in place); an adapter on them would freeze them"
            )
        flags = _requires_grad_flags(self.adapted_model)
        built: list[tuple[str, nn.Module, bool]] = []
        try:
            for layer in layers:
                module = self.adapted_model.get_submodule(layer)
                options = {**kwargs, **layer_kwargs.get(layer, {})}
                try:
                    if isinstance(module, LoRA):
                        built.append((layer, LoRABranch(LoRA(module.pretrained_module, **options)), True))
                    elif adapter_of(module) is not None:
                        raise AdapterInsertionError(
                            f"layer {layer!r} holds a {type(module).__name__}; only LoRA layers hold several adapters"
                        )
                    else:
                        new = LoRA(module, **options)
                        new.keep_only_named(adapter_name)
                        built.append((layer, new, False))
                except (ValueError, TypeError) as exc:
                    raise _with_message(
                        exc,
                        f"cannot add adapter {adapter_name!r} on layer {layer!r} ({type(module).__name__}): {exc}",
                    ) from exc
        except BaseException:
            _restore_requires_grad(flags)
            raise
        for layer, built_module, beside in built:
            if beside:
                holder = cast(LoRA, self.adapted_model.get_submodule(layer))
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
        _disable_transformer_fast_path(self.adapted_model, layers)
        self.set_adapter(self._active_adapters)

    def _load_named(self, adapter_name: str, tensors: Mapping[str, torch.Tensor], *, where: str) -> None:
        """Load one-adapter keys (``adapted_model.<layer>.adapter_up_proj.weight``) into the added
        adapter ``adapter_name``; every key and shape checked before anything is loaded."""
        layers = sorted(self.named_adapter_specs[adapter_name]["layers"], key=len, reverse=True)
        mapped = {}
        for key, value in tensors.items():
            layer = next((name for name in layers if key.startswith(f"adapted_model.{name}.")), None)
            rest = key[len(f"adapted_model.{layer}.") :] if layer is not None else key
            mapped[
                f"adapted_model.{layer}.named_adapters.{adapter_name}.{rest}" if layer is not None else key
            ] = value
        current = self.state_dict()
        mine = {k: tuple(v.shape) for k, v in current.items() if f".named_adapters.{adapter_name}." in k}
        report = compare_keys({k: tuple(v.shape) for k, v in mapped.items()}, mine)
        if report.unexpected or report.mismatched or report.missing:
            raise CheckpointError(
                f"adapter {where!r} does not fit adapter {adapter_name!r} of this model: unexpected keys "
                f"{report.unexpected[:8]}, mis-shaped keys {report.mismatched[:8]}, missing keys {report.missing[:8]}"
            )
        self.load_state_dict(mapped, strict=False)

    def _is_unfrozen(self, layer: str) -> bool:
        return any(layer == u or layer.startswith(f"{u}.") or not u for u in self.unfrozen_module_names)

    def _is_default_key(self, key: str) -> bool:
        """Whether ``state_dict`` key ``key`` belongs to the default adapter (or an unfrozen layer)."""
        for layer in self.replace_layers:
            prefix = f"adapted_model.{layer}." if layer else "adapted_model."
            if key.startswith(prefix):
                module = self.adapted_model.get_submodule(layer)
                kind = adapter_of(module)
                rest = key[len(prefix) :]
                return kind is not None and not rest.startswith((f"{kind.wrapped}.", "named_adapters."))
        return key in set(self._unfrozen_keys())

    def _unfrozen_keys(self) -> list[str]:
        keys: list[str] = []
        for name in self.unfrozen_module_names:
            module = self.adapted_model.get_submodule(name)
            prefix = f"adapted_model.{name}." if name else "adapted_model."
            keys.extend(prefix + k for k in module.state_dict())
        return keys

    def _adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        if adapter_name == self.default_adapter_name:
            params: list[nn.Parameter] = []
            for layer in self.replace_layers:
                module = self.adapted_model.get_submodule(layer)
                kind = adapter_of(module)
                if kind is None or not getattr(module, "__dict__", {}).get("_has_default", True):
                    continue
                params.extend(
                    p
                    for n, p in module.named_parameters()
                    if not n.startswith((f"{kind.wrapped}.", "named_adapters."))
                )
            return params
        spec = self.named_adapter_specs[adapter_name]
        return [
            p
            for layer in spec["layers"]
            for p in cast(nn.ModuleDict, self.adapted_model.get_submodule(layer).named_adapters)[
                adapter_name
            ].parameters()
        ]

    def _adapter_layers(self) -> list[LoRA]:
        return [
            cast(LoRA, m)
            for m in self.adapted_model.modules()
            if adapter_of(m) is not None and hasattr(m, "set_active")
        ]

    def _switch_layers(self, names: Sequence[str]) -> None:
        slots = tuple(self._slot(name) for name in names)
        for layer in self._adapter_layers():
            layer.set_active(slots)

    def _sample_layers(self, adapter_names: Sequence[str]) -> list[LoRA]:
        """The LoRA layers to give one adapter per sample, after PEFT's checks."""
        if isinstance(adapter_names, str):
            raise TypeError("adapter_names must be a list of names, one per sample, not a string")
        self._check_known([name for name in adapter_names if name != BASE_ADAPTER])
        if self.training:
            raise AdapterError(
                "adapter_names (a mixed batch) is for inference: call model.eval() first, as PEFT requires"
            )
        layers = self._adapter_layers()
        others = [type(m).__name__ for m in layers if not isinstance(m, LoRA)]
        if others and self.default_adapter_name in adapter_names:
            raise AdapterError(f"a mixed batch needs LoRA adapters; the default adapter is {others[0]}")
        return [m for m in layers if isinstance(m, LoRA)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What :meth:`saver` writes: parameters that require grad, keyed as in ``state_dict()``,
        plus the buffers (e.g. BatchNorm running stats) of ``unfrozen_layers``.

        Under FSDP2 (``fully_shard``) these tensors, and only these, are gathered whole from
        their shards: a collective, so every rank must call it; frozen weights stay sharded.
        """
        full = self.state_dict(keep_vars=True)
        return distributed.gather_full({name: full[name] for name in self._trainable_keys(full)})

    def saver(self, path: str) -> None:
        """Save only the trainable parameters (and buffers of unfrozen layers).

        A path ending in ``.safetensors`` writes the interchange format with metadata: the
        adapter class and kwargs (which :meth:`loader` checks) and the kind of every layer
        written (``layer_kinds``, so that converters can re-lay out unfrozen layers too);
        any other path writes SpeechBrain's ``torch.save`` format. The write is atomic.
        In a process group only rank 0 writes; under FSDP2 every rank must call ``saver``
        (the trainable shards are gathered, the frozen ones never are).
        """
        state_dict = self.trainable_state_dict()
        if distributed.is_writer():
            save_state_dict_file(state_dict, path, self._file_metadata(state_dict))

    def loader(self, path: str, end_of_epoch: bool = False) -> None:
        """Load trained parameters saved by :meth:`saver` (ours or SpeechBrain's).

        The file may lack frozen weights, but every trainable parameter must be there, and an
        unexpected or mis-shaped key raises :class:`CheckpointError` before anything is loaded;
        so does a file that records another adapter class or other adapter kwargs than this
        model's (``alpha=16`` into a model built with the default ``alpha=1`` would scale every
        update wrongly). SpeechBrain's files record nothing and load unchecked.
        In a process group every rank reads the file (DDP replicas must all load it); under
        FSDP2 each rank keeps only its shard of each tensor, with no communication.
        """
        del end_of_epoch
        state_dict, metadata = load_state_dict_file(path)
        self._load_checked(state_dict, metadata, where=str(path))

    def _file_metadata(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
        """The safetensors metadata :meth:`saver` writes for ``state_dict``."""
        metadata = adapter_metadata(
            framework="torch",
            adapter_class=adapter_class_name(self.adapter_class),
            adapter_kwargs=self.adapter_kwargs,
            target_layers=self.target_layers or self.replace_layers,
            unfrozen_layers=self.unfrozen_layers,
        )
        metadata.update(layer_kwargs_entry(self.layer_adapter_kwargs))  # PEFT's rank/alpha patterns
        # The bridge's kinds, from module types (no tensor is touched: safe under FSDP2).
        kinds = {name: kind for name, module in self.named_modules() if (kind := layer_kind(module))}
        metadata["layer_kinds"] = layer_kinds_entry(kinds, state_dict)
        return metadata

    def _load_checked(
        self, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, where: str
    ) -> None:
        """Check ``state_dict`` (and the adapter its ``metadata`` records) against this model,
        then load it; nothing is loaded when a check fails."""
        check_recorded_adapter(
            metadata,
            adapter_class_name(self.adapter_class),
            self.adapter_kwargs,
            where=where,
            class_defaults=signature_defaults(self.adapter_class),
        )
        check_recorded_layer_kwargs(metadata, self.layer_adapter_kwargs, where=where)
        current = self.state_dict()
        expected = {name: tuple(t.shape) for name, t in current.items()}
        report = compare_keys({k: tuple(v.shape) for k, v in state_dict.items()}, expected)
        trainable = set(self._trainable_keys()) - set(self._unfrozen_buffer_keys())
        missing = [key for key in report.missing if key in trainable]
        if report.unexpected or report.mismatched or missing:
            raise CheckpointError(misfit_message(where, report, missing))
        self.load_state_dict(
            {key: distributed.shard_like(value, current[key]) for key, value in state_dict.items()},
            strict=False,
        )

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
        ``peft.PeftModel.from_pretrained(base, directory)`` loads with the same outputs) where
        PEFT can represent the adapters: LoRA with any of its options (``dropout``,
        ``use_rslora``, ``use_dora``, per-layer ranks and alphas as ``rank_pattern``/``alpha_pattern``)
        on named Linear/Conv/Embedding layers, unfrozen layers as ``modules_to_save`` (none holding
        an adapter or a weight tied outside it), convs of dilation 1 and zero padding, no scaled
        embeddings (PEFT multiplies their adapter output by ``embed_scale``). Our format otherwise
        (``peft_twins_adapter.json`` + ``adapters.safetensors``, the :meth:`saver` file). The write
        is atomic. Returns ``'peft'`` or ``'peft-twins'``.

        PEFT's config keeps what the user gave: ``target_modules`` as the PEFT config this model
        was read from said it, else ``target_layers`` as one regular expression (either only where
        it selects exactly the adapted layers, else the list of their names); ``task_type``
        (argument, else the one read); ``base_model_name_or_path`` (argument, else the one read,
        else transformers' ``config._name_or_path``); with no ``task_type``, PEFT's
        ``auto_mapping`` of a transformers base model, so ``peft.AutoPeftModel.from_pretrained``
        rebuilds the base.

        With several adapters (:meth:`add_adapter`), PEFT's multi-adapter layout: the default
        adapter at the root, every other in ``<name>/``, each a one-adapter directory
        (``selected_adapters``: only those); ``PeftModel.from_pretrained`` then ``load_adapter``
        read it. Returns ``{name: format}`` then. A one-adapter model writes what it always has.

        Example
        -------
        >>> import tempfile
        >>> from torch_impl import HoulsbyAdapterLinear
        >>> model = AdaptedModel(nn.Sequential(nn.Linear(4, 4)), HoulsbyAdapterLinear,
        ...                      target_layers="0", adapter_kwargs={"projection_size": 2})
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
        cls, base_model: nn.Module, directory: str | os.PathLike[str], *, adapter_name: str = DEFAULT_ADAPTER
    ) -> AdaptedModel:
        """Wrap ``base_model`` in the adapters saved in ``directory`` (by :meth:`save_pretrained`
        of either twin, or by PEFT's ``save_pretrained`` for LoRA with any option our LoRA
        computes: DoRA, dropout, rsLoRA, embeddings, rank/alpha patterns, ``modules_to_save`` as
        unfrozen layers) and load them.
        Like ``peft.PeftModel.from_pretrained``, the model comes back in eval mode (``.train()``
        to train on).

        ``base_model`` is changed in place, as by the constructor; a refused load (a layer the
        model lacks, a shape that does not fit, a PEFT option our LoRA cannot compute) raises
        and puts it back as it was. See :mod:`torch_impl.pretrained` for an example.
        ``adapter_name`` names the adapter read (PEFT's ``adapter_name``; it is the model's
        default adapter whatever its name); :meth:`load_adapter` adds more.
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
        model = from_pretrained(cls, base_model, directory)
        model.default_adapter_name = adapter_name
        model._active_adapters = [adapter_name]
        return model

    def __getattr__(self, item: str) -> Any:
        """Fall back to the adapted model for attributes the wrapper does not have.

        Except those that would save, load or convert the wrapped model as if it were not
        adapted (``push_to_hub``, ``load_adapter``, ``to_bettertransformer``, ...): they raise
        ``AttributeError`` saying what to use instead (see :func:`twinformat.recorded.is_persistence_name`).
        """
        # nn.Module.__getattr__ resolves the wrapper's own parameters, buffers and submodules.
        try:
            return super().__getattr__(item)
        except AttributeError:
            pass
        model = super().__getattr__("adapted_model")
        if is_persistence_name(item) and hasattr(model, item):
            raise AttributeError(not_forwarded_message(type(self).__name__, type(model).__name__, item))
        return getattr(model, item)

    def _trainable_keys(self, full: Mapping[str, torch.Tensor] | None = None) -> list[str]:
        """Keys of :meth:`trainable_state_dict`, in ``state_dict()`` order, gathering nothing."""
        full = self.state_dict(keep_vars=True) if full is None else full
        keep = {name for name, value in full.items() if value.requires_grad}
        keep.update(key for key in self._unfrozen_buffer_keys() if key in full)
        return [name for name in full if name in keep]

    def _unfrozen_buffer_keys(self) -> list[str]:
        keys: list[str] = []
        for name in self.unfrozen_module_names:
            module = self.adapted_model.get_submodule(name)
            prefix = f"adapted_model.{name}." if name else "adapted_model."
            keys.extend(prefix + buffer_name for buffer_name, _ in module.named_buffers())
        return keys


_speechbrain.mark_hooks(AdaptedModel.saver, AdaptedModel.loader, AdaptedModel.parameter_transfer)


def is_layer_adaptable(
    name: str,
    module: nn.Module,
    all_linear: bool,
    all_conv: bool,
    target_layers: Iterable[str] | str,
) -> bool:
    """Check if a layer is among the layers to be adapted.

    Arguments
    ---------
    name: str
        The dotted name of the module (as in ``named_modules()``).
    module: torch.nn.Module
        The module to check.
    all_linear: bool
        Whether all linear layers should be adapted.
    all_conv: bool
        Whether all conv layers should be adapted.
    target_layers: str or list of str
        Shell-style patterns; a single string is one pattern.

    Returns
    -------
    bool
        Whether the layer is to be adapted.

    Example
    -------
    >>> is_layer_adaptable("layer1", nn.Linear(2, 2), False, False, "layer1")
    True
    >>> is_layer_adaptable("layer2", nn.Linear(2, 2), False, False, "layer1")
    False
    """
    return bool(
        (all_linear and isinstance(module, nn.Linear))
        or (all_conv and isinstance(module, _CONV_TYPES))
        or matches_any(name, as_patterns(target_layers))
    )


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Replace the layer at dotted ``name`` with ``new_module`` by assigning it on its parent.

    Arguments
    ---------
    model: nn.Module
        Model containing the module to be replaced.
    name: str
        Dotted name of the target module (the model itself is the parent of a top-level name).
    new_module: nn.Module
        New module made of the old plus the new parameters.

    Example
    -------
    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> replace_module(model, "0", nn.Identity())
    >>> model
    Sequential(
      (0): Identity()
    )
    """
    parent_name, target_name = parent_and_leaf(name)
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, target_name, new_module)


def _types(named: list[tuple[str, nn.Module]], limit: int = 8) -> str:
    kinds = sorted({type(module).__name__ for _, module in named})
    return ", ".join(kinds[:limit]) + (" ..." if len(kinds) > limit else "")


def _requires_grad_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    return [(param, param.requires_grad) for param in model.parameters()]


def _restore_requires_grad(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for param, flag in flags:
        param.requires_grad_(flag)


def _with_message(exc: Exception, message: str) -> Exception:
    """An exception of ``exc``'s type carrying ``message`` (AdapterInsertionError if the type
    cannot be built from a message alone)."""
    try:
        return type(exc)(message)
    except Exception:
        return AdapterInsertionError(message)


def _disable_transformer_fast_path(model: nn.Module, adapted_names: Iterable[str]) -> None:
    """PyTorch's fused TransformerEncoder(Layer) eval path reads ``linear1.weight`` and friends
    directly, which would skip (or crash on) an adapter. Switch it off above every adapted layer
    (whatever the adapter class)."""
    for name in adapted_names:
        parts = name.split(".") if name else []
        for depth in range(len(parts)):  # the strict ancestors of ``name``, root first
            ancestor = model.get_submodule(".".join(parts[:depth]))
            if isinstance(ancestor, nn.TransformerEncoderLayer):
                # Read only by the fast-path checks; the regular path uses ``self.activation``.
                ancestor.activation_relu_or_gelu = 0
            elif isinstance(ancestor, nn.TransformerEncoder):
                ancestor.use_nested_tensor = False
