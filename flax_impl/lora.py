"""LoRA on an ``nnx.Linear``, ``nnx.Conv`` or ``nnx.Embed``, with PEFT's options (dropout, rsLoRA,
DoRA) and exact merging: the twin of ``torch_impl.lora``.

The options are keyword-only and compute what ``torch_impl.LoRA`` (and PEFT) compute with the
same weights: ``use_rslora`` (``scaling = alpha / sqrt(rank)``), ``dropout`` (on the low-rank
branch's input, when not ``deterministic``; ignored on embeddings, as PEFT does), ``use_dora``
(a trainable ``adapter_magnitude`` per output feature, initialised to the kernel's column norms;
output ``m / ||W + s down up|| * (W x + s up(down(x))) + b``, the norm under ``stop_gradient``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from twinformat.adapters import LORA, AdapterKind
from twinformat.errors import AdapterError, AdapterInsertionError, MergeError

from . import fused, kernels
from ._factors import (
    TORCH_DEFAULT_KERNEL_INIT,
    check_size,
    kernel_spec,
    layer_kwargs,
    place_like,
    sharding_kwargs,
)

__all__ = ["BASE_ADAPTER", "DEFAULT_ADAPTER", "AdapterSwitch", "LoRA", "LoRABranch"]

#: PEFT's names: the adapter the constructor builds, and "no adapter" in a mixed batch.
DEFAULT_ADAPTER = "default"
BASE_ADAPTER = "__base__"


class AdapterSwitch(nnx.Variable):
    """How much of each adapter a layer holding several adds, as data (not a parameter, never
    trained): shape ``(n_adapters,)`` (the active set, 1.0 or 0.0 each, in ``model.adapters``
    order) or ``(batch, n_adapters)`` (one adapter per sample). One variable shared by every layer
    of an ``AdaptedModel``: changing it (``set_adapter``, a mixed batch) changes no graph, so a
    jitted step is not traced again."""


class SwitchColumns(Mapping[str, int]):
    """Adapter name -> its column of the :class:`AdapterSwitch`, as a layer holding several keeps
    it: an immutable, hashable mapping, because an NNX graphdef holds it as static data and
    ``jax.jit`` hashes a graphdef given as a static argument (a plain ``dict`` made
    ``WhisperForConditionalGeneration.generate`` fail on a model holding two adapters)."""

    __slots__ = ("_items",)

    def __init__(self, columns: Mapping[str, int]) -> None:
        self._items = tuple(dict(columns).items())

    def __getitem__(self, name: str) -> int:
        for key, column in self._items:
            if key == name:
                return column
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SwitchColumns) and self._items == other._items

    def __repr__(self) -> str:
        return f"SwitchColumns({dict(self._items)})"


# Never read from the wrapped layer: the wrapper's own children and options.
_NOT_FORWARDED = frozenset(
    {"pretrained_module", "adapter_down_proj", "adapter_up_proj", "adapter_magnitude", "adapter_dropout"}
)


class LoRA(nnx.Module):
    """LoRA adapter: 'LoRA: Low-Rank Adaptation of Large Language Models'
    (https://arxiv.org/abs/2106.09685).

    Output: ``pretrained_module(x) + adapter_up_proj(adapter_down_proj(x)) * scaling`` with
    ``scaling = alpha / rank``. The up projection starts at zero, so a fresh adapter changes
    nothing. For ``nnx.Conv`` (1, 2 or 3 spatial dims) the down projection copies the
    pretrained conv's geometry (kernel_size, strides, padding, input and kernel dilation) and
    the up projection is pointwise. For ``nnx.Embed`` the down projection is an
    ``nnx.Embed(num, rank)`` and the up projection an ``nnx.Linear(rank, features)``. Factors
    follow the wrapped kernel's dtype, the layer's ``dtype`` and ``precision``, and the kernel's
    sharding: the down factor is partitioned like the kernel's input axis, the up factor (and
    DoRA's magnitude) like its output axis, the rank axis never.

    Arguments
    ---------
    target_module: nnx.Linear, nnx.Conv or nnx.Embed
        The pretrained layer this adapter wraps; it is frozen under
        :attr:`AdaptedModel.trainable`.
    rank: int
        Rank of the update (at least 1).
    alpha: float
        Scaling numerator: ``scaling = alpha / rank``.
    dropout: float
        Keyword-only. Dropout probability on the low-rank branch's input (PEFT's
        ``lora_dropout``); off under ``model.eval()``. Default 0.
    use_rslora: bool
        Keyword-only. Rank-stabilised scaling ``alpha / sqrt(rank)`` (PEFT's ``use_rslora``).
    use_dora: bool
        Keyword-only. Weight-decomposed LoRA (PEFT's ``use_dora``), Linear and Conv only.
    rngs: nnx.Rngs
        Random streams for the down projection's initial kernel (and the dropout masks).

    Example
    -------
    >>> x = jnp.ones((8, 60, 64))
    >>> base_linear = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
    >>> adapt = LoRA(base_linear, 64, 4, rngs=nnx.Rngs(1))
    >>> adapt(x).shape
    (8, 60, 64)

    >>> x = jnp.ones((8, 100, 16))                       # channels last
    >>> base_conv = nnx.Conv(16, 32, kernel_size=(3,), strides=2, padding=[(0, 0)],
    ...                      rngs=nnx.Rngs(0))
    >>> adapt = LoRA(base_conv, rank=4, rngs=nnx.Rngs(1))
    >>> adapt(x).shape == base_conv(x).shape
    True

    >>> dora = LoRA(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), rank=2, use_dora=True, use_rslora=True,
    ...             rngs=nnx.Rngs(1))
    >>> dora.adapter_magnitude.shape, round(dora.scaling, 4), dora.in_features
    ((5,), 0.7071, 6)
    """

    adapter_kind: ClassVar[AdapterKind] = LORA

    def __init__(
        self,
        target_module: nnx.Linear | nnx.Conv | nnx.Embed,
        rank: int = 16,
        alpha: float = 1.0,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        if not isinstance(target_module, (nnx.Linear, nnx.Conv, nnx.Embed)):
            raise ValueError(
                "LoRA supports nnx.Linear, nnx.Conv (1, 2 or 3 spatial dims) and nnx.Embed layers, "
                f"but instead got {type(target_module)}."
            )
        check_size("rank", rank)
        _check_options(dropout, use_rslora, use_dora)
        self.pretrained_module = target_module
        if isinstance(target_module, nnx.Embed):
            if use_dora:
                raise AdapterError(
                    "use_dora=True is not supported on embeddings (nnx.Embed("
                    f"{target_module.num_embeddings}, {target_module.features})); DoRA wraps nnx.Linear "
                    "and nnx.Conv layers"
                )
            self._init_embedding(target_module, rank, rngs)
        else:
            self._init_projections(target_module, rank, rngs)
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.merged = False
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.use_dora = bool(use_dora)
        self._merged_norm: tuple[float, ...] | None = None
        if dropout > 0.0:
            self.adapter_dropout = nnx.Dropout(dropout, rngs=rngs)
        if use_dora:
            assert not isinstance(target_module, nnx.Embed)  # refused above
            kernel = target_module.kernel
            norm = _column_norm(kernel[...].astype(jnp.promote_types(kernel.dtype, jnp.float32)))
            self.adapter_magnitude = nnx.Param(_placed_like_output(kernel, norm.astype(kernel.dtype)))

    def _init_projections(self, target_module: nnx.Linear | nnx.Conv, rank: int, rngs: nnx.Rngs) -> None:
        kernel = target_module.kernel
        spec = kernel_spec(kernel) or (None,) * kernel.ndim
        down_spec = (*spec[:-1], None)
        up_spec = (None,) * (kernel.ndim - 1) + (spec[-1],)
        layer = layer_kwargs(target_module)
        if isinstance(target_module, nnx.Conv):
            _check_conv(target_module)
            spatial = len(target_module.kernel_size)
            self.adapter_down_proj: nnx.Linear | nnx.Conv | nnx.Embed = nnx.Conv(
                target_module.in_features,
                rank,
                kernel_size=target_module.kernel_size,
                strides=target_module.strides,
                padding=target_module.padding,
                input_dilation=target_module.input_dilation,
                kernel_dilation=target_module.kernel_dilation,
                use_bias=False,
                kernel_init=TORCH_DEFAULT_KERNEL_INIT,
                **layer,
                **sharding_kwargs(kernel, down_spec),
                rngs=rngs,
            )
            self.adapter_up_proj: nnx.Linear | nnx.Conv = nnx.Conv(
                rank,
                target_module.out_features,
                kernel_size=(1,) * spatial,
                padding="VALID",
                use_bias=False,
                kernel_init=nnx.initializers.zeros,
                **layer,
                **sharding_kwargs(kernel, up_spec),
                rngs=rngs,
            )
        else:
            input_size, output_size = kernel.shape
            self.adapter_down_proj = nnx.Linear(
                input_size,
                rank,
                use_bias=False,
                kernel_init=TORCH_DEFAULT_KERNEL_INIT,
                **layer,
                **sharding_kwargs(kernel, down_spec),
                rngs=rngs,
            )
            self.adapter_up_proj = nnx.Linear(
                rank,
                output_size,
                use_bias=False,
                kernel_init=nnx.initializers.zeros,
                **layer,
                **sharding_kwargs(kernel, up_spec),
                rngs=rngs,
            )
        place_like(kernel, self.adapter_down_proj, down_spec)
        place_like(kernel, self.adapter_up_proj, up_spec)

    def _init_embedding(self, target_module: nnx.Embed, rank: int, rngs: nnx.Rngs) -> None:
        # Normal init for the looked-up factor (PyTorch's nn.Embedding default), zero for the up one.
        table = target_module.embedding
        dtype = table[...].dtype
        down = self.adapter_down_proj = nnx.Embed(
            target_module.num_embeddings,
            rank,
            dtype=target_module.dtype,
            param_dtype=dtype,
            embedding_init=nnx.initializers.normal(1.0),
            rngs=rngs,
        )
        up = self.adapter_up_proj = nnx.Linear(
            rank,
            target_module.features,
            use_bias=False,
            kernel_init=nnx.initializers.zeros,
            dtype=target_module.dtype,
            param_dtype=dtype,
            rngs=rngs,
        )
        sharding = getattr(table.get_value(), "sharding", None)
        if sharding is not None:
            spec = kernel_spec(table) or (None, None)
            for variable, axes in (
                (down.embedding, (spec[0], None)),
                (up.kernel, (None, spec[1])),
            ):
                placed = (
                    NamedSharding(sharding.mesh, PartitionSpec(*axes))
                    if isinstance(sharding, NamedSharding)
                    else sharding
                )
                variable.set_value(jax.device_put(variable.get_value(), placed))

    # --- forward ---------------------------------------------------------------------------

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the pretrained layer plus the scaled low-rank update (DoRA: rescaled columns)."""
        if vars(self).get("adapter_switch") is not None and not self.merged:
            return self._multi_call(x)
        layers = (self.pretrained_module, self.adapter_down_proj, self.adapter_up_proj)
        plain = not (self.merged or self.use_dora or self._dropping())
        if plain and kernels.can_use(*layers, x):
            linears = cast(tuple[nnx.Linear, nnx.Linear, nnx.Linear], layers)
            return kernels.lora_linear(*linears, self.scaling, x)  # opt-in Pallas kernels (CUDA)
        if not (self.merged or self.use_dora) and fused.can_fuse_linear(*layers):
            # (``cast``: can_fuse_linear found all three plain nnx.Linear.) Same values, a leaner
            # backward; with active dropout the low-rank branch reads dropout(x), drawn here as
            # the plain formula draws it.
            linears = cast(tuple[nnx.Linear, nnx.Linear, nnx.Linear], layers)
            x_low = self.adapter_dropout(x) if self._dropping() else None
            return fused.lora_linear(*linears, self.scaling, x, x_low)
        x_pretrained = self.pretrained_module(x)
        if self.merged:
            return x_pretrained
        if isinstance(self.pretrained_module, nnx.Embed):
            return x_pretrained + self.adapter_up_proj(self.adapter_down_proj(x)) * self.scaling
        dropping = self._dropping()
        x_lora_in = self.adapter_dropout(x) if dropping else x
        x_lora = self.adapter_up_proj(self.adapter_down_proj(x_lora_in))
        if not self.use_dora:
            return x_pretrained + x_lora * self.scaling
        bias = self.pretrained_module.bias
        scale = self.adapter_magnitude[...] / self._dora_norm()  # (out,), norm under stop_gradient
        if dropping:
            # PEFT's order with active dropout: the rescaling term sees the dropped input too.
            base = self.pretrained_module(x_lora_in)
            base = base - bias[...] if bias is not None else base
            return x_pretrained + (scale - 1) * base + scale * x_lora * self.scaling
        base = x_pretrained - bias[...] if bias is not None else x_pretrained
        out = scale.astype(base.dtype) * (base + x_lora * self.scaling)
        return out + bias[...].astype(out.dtype) if bias is not None else out

    def _dropping(self, branch: Any = None) -> bool:
        dropout = vars(self if branch is None else branch).get("adapter_dropout")
        return dropout is not None and not dropout.deterministic

    # --- named adapters (PEFT's multi-adapter layers) ---------------------------------------
    # The "default" adapter keeps its factors where a one-adapter LoRA has them; further adapters
    # are LoRABranch modules in ``named_adapters`` (an nnx.Dict), created only when one is added.
    # Which adapters add, and how much, is the shared AdapterSwitch's data: ``switch_columns``
    # (static) maps each adapter this layer holds to its column.

    def adapter_names(self) -> list[str]:
        """The adapters this layer holds: ``'default'`` (unless wrapped for another adapter
        only) and the named ones, in the order they were added."""
        named = list(vars(self)["named_adapters"].keys()) if "named_adapters" in vars(self) else []
        return ([DEFAULT_ADAPTER] if vars(self).get("has_default", True) else []) + named

    def add_named_adapter(self, name: str, branch: LoRABranch) -> None:
        """Hold ``branch`` as the adapter ``name``."""
        if name in self.adapter_names():
            raise AdapterInsertionError(f"this LoRA layer already holds an adapter named {name!r}")
        if "named_adapters" not in vars(self):
            self.named_adapters: Any = nnx.Dict()
        self.named_adapters[name] = branch

    def remove_named_adapter(self, name: str) -> None:
        """Drop the adapter ``name`` (not the default, whose parameters are the layer's own)."""
        del self.named_adapters[name]
        if not len(self.named_adapters):
            del self.named_adapters

    def keep_only_named(self, name: str) -> None:
        """Turn this fresh LoRA's own factors into the named adapter ``name`` (the layer is
        wrapped for that adapter only: no default factors in its state)."""
        branch = LoRABranch(self)
        for attribute in ("adapter_down_proj", "adapter_up_proj", "adapter_magnitude", "adapter_dropout"):
            if attribute in vars(self):
                delattr(self, attribute)
        self.has_default = False
        self.add_named_adapter(name, branch)

    def attach_switch(self, switch: AdapterSwitch | None, columns: dict[str, int]) -> None:
        """Read the shared ``switch`` (None: back to a one-adapter layer), column per adapter."""
        if switch is None:
            for attribute in ("adapter_switch", "switch_columns"):
                if attribute in vars(self):
                    delattr(self, attribute)
            return
        self.adapter_switch = switch
        self.switch_columns = SwitchColumns(columns)

    def branch(self, name: str) -> Any:
        """The module holding the factors of adapter ``name`` (``self`` for the default)."""
        if name == DEFAULT_ADAPTER and vars(self).get("has_default", True):
            return self
        return self.named_adapters[name]

    def _multi_call(self, x: jax.Array) -> jax.Array:
        """PEFT's order: the base layer, then each held adapter's term times its switch weight
        (0 or 1 for the whole batch, or one weight per sample): ``x + 0 * d`` is ``x`` exactly.

        A layer holding several plain LoRA adapters takes ``_mixed_delta``'s one GEMM pair for
        any switch (batch-wide too: the active set is data, so the loop below would run every
        held adapter's GEMMs on every step, active or not); the others loop."""
        result = self.pretrained_module(x)
        switch = self.adapter_switch[...]
        if len(self.switch_columns) > 1 and self._can_mix():
            return result + self._mixed_delta(x, switch).astype(result.dtype)
        for name in self.adapter_names():
            weight = switch[..., self.switch_columns[name]]
            delta = self._delta(self.branch(name), x)
            if weight.ndim:  # one weight per sample: (batch,) against (batch, ..., out)
                weight = weight.reshape(weight.shape + (1,) * (delta.ndim - 1))
            result = result + weight.astype(delta.dtype) * delta
        return result

    def _can_mix(self) -> bool:
        """Whether a mixed batch can take the one-GEMM-pair path: a dense layer, every adapter it
        holds plain LoRA (no DoRA, no active dropout) with plain ``nnx.Linear`` factors of one
        dtype and precision."""
        if type(self.pretrained_module) is not nnx.Linear:
            return False
        factors = []
        for name in self.adapter_names():
            branch = self.branch(name)
            if branch.use_dora or self._dropping(branch):
                return False
            factors += [branch.adapter_down_proj, branch.adapter_up_proj]
        return all(fused._plain_linear(f) and f.bias is None for f in factors) and (
            len({(f.dtype, f.precision) for f in factors}) == 1
        )

    def _mixed_delta(self, x: jax.Array, switch: jax.Array) -> jax.Array:
        """The active adapters' terms (``switch`` of shape ``(adapters,)``) or every sample's own
        (``(batch, adapters)``) in one adapter's kernels (the twin of
        ``torch_impl.LoRA._mixed_delta``): the down kernels of all the adapters this layer holds
        concatenated (``R`` = the sum of their ranks) in one GEMM, each sample's columns weighted
        by its switch entry times that adapter's scaling (0 for the others: an exact zero), the
        up kernels concatenated in a second (with many rows a sample, the weights scale each
        sample's copy of the up kernels in a batched GEMM instead of scaling the activations).
        The loop of ``_multi_call`` computes every adapter on every sample instead (n GEMM pairs
        for n adapters); the sums are the same within
        rounding (the scaling multiplies the rank-R activations or the up kernels instead of the
        output)."""
        names = self.adapter_names()
        branches = [self.branch(name) for name in names]
        downs = [b.adapter_down_proj for b in branches]
        ups = [b.adapter_up_proj for b in branches]
        # Each rank column's switch column and scaling, as constants: a gather, not a matmul
        # (a float32 matmul may run in bf16 passes on accelerators and round the scaling).
        columns = [
            self.switch_columns[n]
            for n, d in zip(names, downs, strict=True)
            for _ in range(d.kernel.shape[-1])
        ]
        scalings = [
            float(b.scaling) for b, d in zip(branches, downs, strict=True) for _ in range(d.kernel.shape[-1])
        ]
        weights = jnp.take(switch, jnp.asarray(columns), axis=-1) * jnp.asarray(scalings, switch.dtype)
        down = jnp.concatenate([d.kernel[...] for d in downs], axis=-1)  # (in, R)
        up = jnp.concatenate([u.kernel[...] for u in ups], axis=0)  # (R, out)
        dtype, precision = downs[0].dtype, downs[0].precision
        lhs, down = downs[0].promote_dtype((x, down), dtype=dtype)
        h = jax.lax.dot_general(lhs, down, (((lhs.ndim - 1,), (0,)), ((), ())), precision=precision)
        rank = h.shape[-1]
        tokens = h.size // (h.shape[0] * rank) if h.ndim > 1 and h.shape[0] else 0  # rows per sample
        if tokens >= rank:
            # Every sample's weights in its own copy of the up kernels, one batched GEMM: XLA
            # fuses the weighting and the concatenation into that GEMM's operand, where weighting
            # ``h`` took a separate kernel for each layer and the concatenation another (BERT-base,
            # simulated H100: 3 extra kernels a transformer layer, 0 this way). The GEMM reads
            # the up kernels once per sample, ``batch * R * out`` elements, no more than the
            # ``batch * tokens * out`` it writes while ``tokens >= R``; a decoding step (one
            # token a sample) takes the branch below, which reads them once.
            if weights.ndim == 1:  # the batch-wide switch: the same weights for every sample
                weights = jnp.broadcast_to(weights, h.shape[:1] + weights.shape)
            up = weights[:, :, None].astype(up.dtype) * up  # (batch, R, out)
            h, up = ups[0].promote_dtype((h.reshape(h.shape[0], tokens, rank), up), dtype=dtype)
            out = jax.lax.dot_general(h, up, (((2,), (1,)), ((0,), (0,))), precision=precision)
            return out.reshape(lhs.shape[:-1] + out.shape[-1:])
        if weights.ndim == 2:  # one row per sample: (batch, R) against (batch, ..., R)
            weights = weights.reshape(weights.shape[:1] + (1,) * (h.ndim - 2) + weights.shape[1:])
        h = h * weights.astype(h.dtype)
        h, up = ups[0].promote_dtype((h, up), dtype=dtype)
        return jax.lax.dot_general(h, up, (((h.ndim - 1,), (0,)), ((), ())), precision=precision)

    def _delta(self, branch: Any, x: jax.Array) -> jax.Array:
        """What adapter ``branch`` adds to the base layer's output for ``x`` (PEFT's per-adapter
        term; DoRA: ``(m/||W + s A B|| - 1) W x' + m/||.|| s B A x'``, ``x'`` the dropped input)."""
        pretrained = self.pretrained_module
        down, up = branch.adapter_down_proj, branch.adapter_up_proj
        if isinstance(pretrained, nnx.Embed):
            return up(down(x)) * branch.scaling
        x = branch.adapter_dropout(x) if self._dropping(branch) else x
        lora = up(down(x))
        if not branch.use_dora:
            return lora * branch.scaling
        kernel = pretrained.kernel[...]
        norm = jax.lax.stop_gradient(_column_norm(kernel + self._update(kernel.dtype, branch)))
        scale = branch.adapter_magnitude[...] / norm
        base = pretrained(x)
        base = base - pretrained.bias[...] if pretrained.bias is not None else base
        return (scale - 1) * base + scale * lora * branch.scaling

    def _dora_norm(self) -> jax.Array:
        """``||W + s down @ up||`` per output feature, under ``stop_gradient`` (as PEFT detaches it)."""
        pretrained = self.pretrained_module
        assert not isinstance(pretrained, nnx.Embed)  # DoRA is refused on embeddings at construction
        kernel = pretrained.kernel[...]
        return jax.lax.stop_gradient(_column_norm(kernel + self._update(kernel.dtype)))

    def _update(self, dtype: Any, branch: Any = None) -> jax.Array:
        """``scaling * down @ up`` in the wrapped kernel's layout, in ``dtype`` (``branch``: a
        named adapter's factors; default: this layer's own)."""
        branch = self if branch is None else branch
        up = branch.adapter_up_proj.kernel[...]  # (rank, out) or (1, ..., 1, rank, out)
        down_proj = branch.adapter_down_proj
        if isinstance(down_proj, nnx.Embed):  # the pretrained layer is an embedding
            down = down_proj.embedding[...]  # (num, rank)
        else:
            down = down_proj.kernel[...]  # (in, rank) or (*k, in, rank)
        compute = jnp.promote_types(jnp.promote_types(down.dtype, up.dtype), dtype)
        up = up.reshape(up.shape[-2:]).astype(compute)
        delta = jnp.matmul(down.astype(compute), up, precision=jax.lax.Precision.HIGHEST)
        return (delta * branch.scaling).astype(dtype)

    # --- the wrapped layer's attributes -----------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        """The wrapped layer's attributes (``in_features``, ``strides``, ``bias``, ...). Not its
        ``kernel``/``embedding``: code computing with them would silently drop the adapter."""
        if name.startswith("_") or name in _NOT_FORWARDED:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        wrapped = vars(self).get("pretrained_module")
        if wrapped is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if name in ("kernel", "embedding"):
            raise AttributeError(
                f"a LoRA layer has no {name!r}: the wrapped layer's would leave out the adapter; read "
                f"pretrained_module.{name} (the frozen base) or merged_{name}() (base plus update)"
            )
        return getattr(wrapped, name)

    def merged_kernel(self) -> jax.Array:
        """The effective kernel (embeddings: table), in the wrapped layer's layout and dtype: the
        base plus ``delta_weight()``, DoRA's columns rescaled; differentiable."""
        table = self._table()[...]
        if self.merged:
            return table
        combined = table + self._update(table.dtype)
        if not self.use_dora:
            return combined
        return combined * (self.adapter_magnitude[...] / self._dora_norm()).astype(table.dtype)

    merged_embedding = merged_kernel

    # --- merging ----------------------------------------------------------------------------

    def delta_weight(self) -> jax.Array:
        """``scaling * down @ up`` in the wrapped kernel's layout (``(in, out)``,
        ``(*k, in, out)``, embeddings ``(num, features)``), in float32 (or wider)."""
        table = self._table()[...]
        return self._update(jnp.promote_types(table.dtype, jnp.float32))

    def merge(self) -> None:
        """Fold the update into the wrapped kernel, so inference costs the base layer's time
        (DoRA: ``kernel <- m / ||kernel + delta|| * (kernel + delta)``)."""
        if self.merged:
            raise AdapterInsertionError("this LoRA layer is already merged")
        if "named_adapters" in vars(self) or not vars(self).get("has_default", True):
            raise MergeError(
                f"this LoRA layer holds the adapters {self.adapter_names()}: merge the ones you want with "
                "AdaptedModel.merge_and_unload(adapter_names=[...])"
            )
        table = self._table()
        combined = table[...].astype(jnp.promote_types(table.dtype, jnp.float32)) + self.delta_weight()
        if self.use_dora:
            norm = _column_norm(combined)
            combined = combined * (self.adapter_magnitude[...].astype(combined.dtype) / norm)
            self._merged_norm = tuple(float(v) for v in jax.device_get(norm))
        self._write(combined)
        self.merged = True

    def merge_adapters(self, names: list[str]) -> None:
        """Fold the adapters ``names`` this layer holds into the wrapped kernel, one after the
        other as PEFT's ``merge(adapter_names=...)`` does (DoRA rescales the kernel merged so
        far); for ``merge_and_unload``, which then drops the wrapper."""
        table = self._table()
        value = table[...].astype(jnp.promote_types(table.dtype, jnp.float32))
        for name in names:
            branch = self.branch(name)
            combined = value + self._update(value.dtype, branch)
            if branch.use_dora:
                combined = combined * (
                    branch.adapter_magnitude[...].astype(combined.dtype) / _column_norm(combined)
                )
            value = combined
        self._write(value)

    def unmerge(self) -> None:
        """Take the update back out of the wrapped kernel (inverse of :meth:`merge`)."""
        if not self.merged:
            raise AdapterInsertionError("this LoRA layer is not merged")
        table = self._table()
        value = table[...].astype(jnp.promote_types(table.dtype, jnp.float32))
        if self.use_dora:
            norm = jnp.asarray(self._merged_norm, dtype=value.dtype)
            value = value / (self.adapter_magnitude[...].astype(value.dtype) / norm)
        self._write(value - self.delta_weight())
        self._merged_norm = None
        self.merged = False

    def _table(self) -> nnx.Variable:
        module = self.pretrained_module
        return module.embedding if isinstance(module, nnx.Embed) else module.kernel

    def _write(self, value: jax.Array) -> None:
        variable = self._table()
        old = variable[...]
        new = value.astype(old.dtype)
        sharding = getattr(old, "sharding", None)
        variable.set_value(jax.device_put(new, sharding) if sharding is not None else new)


class LoRABranch(nnx.Module):
    """One named adapter's factors in a :class:`LoRA` layer that holds several (PEFT's
    ``lora_A[name]``/``lora_B[name]``): ``adapter_down_proj``, ``adapter_up_proj`` and, for DoRA,
    ``adapter_magnitude``, laid out as the default adapter's, with its own ``scaling``,
    ``dropout``, ``use_rslora`` and ``use_dora``. Built from a fresh ``LoRA`` on the same layer,
    so a named adapter is initialised exactly as a default one of the same kwargs. The twin of
    ``torch_impl.lora.LoRABranch``.

    Example
    -------
    >>> layer = LoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    >>> branch = LoRABranch(LoRA(layer.pretrained_module, rank=1, alpha=2.0, rngs=nnx.Rngs(2)))
    >>> layer.add_named_adapter("other", branch)
    >>> layer.adapter_names(), branch.adapter_down_proj.kernel.shape, branch.scaling
    (['default', 'other'], (4, 1), 2.0)
    """

    def __init__(self, source: LoRA) -> None:
        self.adapter_down_proj = source.adapter_down_proj
        self.adapter_up_proj = source.adapter_up_proj
        if source.use_dora:
            self.adapter_magnitude = source.adapter_magnitude
        if "adapter_dropout" in vars(source):
            self.adapter_dropout = source.adapter_dropout
        self.scaling = source.scaling
        self.dropout = source.dropout
        self.use_rslora = source.use_rslora
        self.use_dora = source.use_dora


def _check_options(dropout: object, use_rslora: object, use_dora: object) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise AdapterError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    for name, value in (("use_rslora", use_rslora), ("use_dora", use_dora)):
        if not isinstance(value, bool):
            raise AdapterError(f"{name} must be True or False, got {value!r}")


def _column_norm(kernel: jax.Array) -> jax.Array:
    """The L2 norm over every axis but the last (output) one of an ``(in, out)`` or
    ``(*k, in, out)`` kernel: PyTorch's per-row norm of ``(out, in, *k)``."""
    flat = kernel.reshape(-1, kernel.shape[-1])
    return jnp.sqrt(jnp.sum(jnp.square(flat), axis=0))


def _placed_like_output(kernel: nnx.Variable, value: jax.Array) -> jax.Array:
    """``value`` (one entry per output feature) partitioned like the kernel's output axis."""
    sharding = getattr(kernel.get_value(), "sharding", None)
    if sharding is None:
        return value
    if isinstance(sharding, NamedSharding):
        spec = kernel_spec(kernel) or (None,) * kernel.ndim
        return jax.device_put(value, NamedSharding(sharding.mesh, PartitionSpec(spec[-1])))
    return jax.device_put(value, sharding)


def _check_conv(conv: nnx.Conv) -> None:
    """Refuse the convs whose low-rank update LoRA cannot express or the PyTorch twin lacks."""
    if conv.feature_group_count != 1:
        raise ValueError(
            "LoRA does not support convolutions with feature_group_count != 1, "
            f"got feature_group_count={conv.feature_group_count} for {_describe_conv(conv)}."
        )
    if len(conv.kernel_size) not in (1, 2, 3):
        raise ValueError(
            "LoRA supports nnx.Conv with 1, 2 or 3 spatial dims, "
            f"got kernel_size={conv.kernel_size} for {_describe_conv(conv)}."
        )
    if conv.mask is not None:
        raise ValueError(
            "LoRA does not support masked convolutions (its update would ignore the mask), "
            f"got a mask for {_describe_conv(conv)}."
        )


def _describe_conv(conv: nnx.Conv) -> str:
    return (
        f"nnx.Conv(in_features={conv.in_features}, out_features={conv.out_features}, "
        f"kernel_size={conv.kernel_size}, feature_group_count={conv.feature_group_count})"
    )
