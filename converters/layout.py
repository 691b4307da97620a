"""Moved to :mod:`twinformat.kinds` (the layer-kind table); this module keeps the old import
path working."""

from twinformat.kinds import *  # noqa: F403
from twinformat.kinds import (
    __all__,  # noqa: F401
    __getattr__,  # noqa: F401  (BUFFERS_WITHOUT_FLAX_TWIN)
)
