"""The test zoo: every model the tests build, written once, PyTorch models beside their Flax twins.

A class in ``torch_models.py`` and its namesake in ``flax_models.py`` are twins: the same dotted
names (a ``state_dict`` converts onto the twin key for key) and the same function once the
weights are converted. A model without a namesake belongs to one framework only.

- ``torch_models``: the PyTorch halves (``SeedMLP``, ``MLP``, ``CNN``, ``ConvGeometryNet``,
  ``SpeechEncoder``, ``TokenNet``, ``Conv1dNormNet``) and the torch-only models built for
  ``torch_impl`` and SpeechBrain (``seed_model``, ``MixedConvNet``, ``AttentionModel``,
  ``transformer``, ``NestedModel``, ``ChannelsLastConvBlock``), each with an
  ``*_input()`` where tests need one. Imports torch only.
- ``flax_models``: the Flax halves, the Flax-only models (``StackedLinears``,
  ``Conv2dBatchNormNet``, ``PartitionedMLP``, ``MixedDtypeLayers``, ``BareGainNet``) and the
  layer builders with PyTorch's semantics (``layer_norm``, ``conv``, ``gelu``, zero-initialised
  ``ZeroLinear`` ...). Imports jax and flax only.
- ``layers``: one twin layer per layer kind (``torch_layer``, ``flax_layer``, ``layer_input``,
  ``LAYER_KINDS``, ``DTYPES``) and the inputs of ``TokenNet`` and ``Conv1dNormNet``.
- ``pairs``: the equivalence pairs (``MLP``, ``CNN``, ``SPEECH``, ``BERT``, ``PAIRS``), each with
  a batch, a way to run each half and its adapter cases (``AdapterCase``).
- ``bert``: BERT on both sides (``transformers.BertModel`` and ``flax_impl.models.BertModel``),
  a small random config and the real all-MiniLM-L6-v2, read offline.
- ``arrays``: not models, the helpers to fill, read and compare twins as numpy
  (``randomize_torch``, ``randomize_flax``, ``torch_arrays``, ``flax_arrays``, ``same_bits``,
  ``torch_output``, ``flax_output``).

Nothing is imported here, so a torch-only test that imports ``tests.zoo.torch_models`` loads
no jax. Harnesses that run models stay with their tests (``tests/torch_impl/twins.py`` compares
ours with SpeechBrain's ``AdaptedModel``; ``tests/equivalence/harness.py`` runs the pairs).
"""
