"""Moved to :mod:`twinformat.format` (the checkpoint format both twins read and write); this
module keeps the old import path working."""

from twinformat.format import *  # noqa: F403
from twinformat.format import FORMAT_VERSION, __all__  # noqa: F401
