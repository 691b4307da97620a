"""Flax NNX twins of well-known PyTorch models, with PyTorch's module names.

A twin's dotted module names equal the PyTorch model's ``named_modules()`` names, so a torch
``state_dict`` converts onto it key for key (``converters.torch_to_flax``) and one list of glob
patterns targets the same layers in both frameworks.

>>> from flax import nnx
>>> from flax_impl.models import BertConfig, BertModel
>>> config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
...                     num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
>>> model = BertModel(config, rngs=nnx.Rngs(0))
>>> type(model.encoder.layer[0].attention.self.query).__name__
'Linear'
"""

from .bert import BertConfig, BertModel, extended_attention_mask

__all__ = ["BertConfig", "BertModel", "extended_attention_mask"]
