"""The Flax NNX side of a conversion: ``flax_impl.interchange``, imported only when a conversion
touches Flax (a PyTorch-only install converts files without jax)."""

from __future__ import annotations

from flax_impl.interchange import assign, layer_kind, model_state

__all__ = ["assign", "layer_kind", "model_state"]
