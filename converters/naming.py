"""Moved to :mod:`twinformat.names` (the rules both twins share live below them); this module
keeps the old import path working."""

from twinformat.names import *  # noqa: F403
from twinformat.names import NoMatchError, __all__  # noqa: F401
