"""Suite-wide settings: full float32 precision on both sides, and 8 simulated CPU devices.

XLA_FLAGS must be set before jax is first imported, hence at the top of this file.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

try:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # One intra-op thread per pytest-xdist worker: on 2 cores, 2 workers x 2 threads thrash.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
except ImportError:
    pass

try:
    from hypothesis import settings

    # The same examples on every run (a failure is reproducible, CI is not a lottery); set
    # HYPOTHESIS_PROFILE=explore to draw new ones.
    settings.register_profile("suite", derandomize=True, database=None)
    settings.register_profile("explore", derandomize=False, database=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))
except ImportError:
    pass

try:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
except ImportError:
    pass


def import_speechbrain_adapters():
    """Import ``speechbrain.nnet.adapters`` with torchaudio stubbed out.

    SpeechBrain imports torchaudio at package import, and PyPI's torchaudio does not load beside
    the CPU torch wheel; nothing we test touches audio.
    """
    if "torchaudio" not in sys.modules:
        stub = types.ModuleType("torchaudio")
        stub.__path__ = []
        stub.__version__ = "0.0.0"
        # transformers (imported by peft) calls importlib.util.find_spec("torchaudio").
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None, is_package=True)
        sys.modules["torchaudio"] = stub
    import speechbrain.nnet.adapters as sb_adapters
    from speechbrain.utils.importutils import LazyModule

    # SpeechBrain leaves placeholder modules for optional add-ons (k2, spacy, ...) in
    # sys.modules; Hypothesis scans sys.modules and trips over them in later tests.
    for name in [n for n, m in list(sys.modules.items()) if isinstance(m, LazyModule)]:
        del sys.modules[name]
    return sb_adapters
