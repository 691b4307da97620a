"""Moved to :mod:`interchange.format` (the checkpoint format both twins read and write); this
module keeps the old import path working."""

from interchange.format import *  # noqa: F403
from interchange.format import FORMAT_VERSION, __all__  # noqa: F401
