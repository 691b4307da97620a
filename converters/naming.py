"""Moved to :mod:`interchange.names` (the rules both twins share live below them); this module
keeps the old import path working."""

from interchange.names import *  # noqa: F403
from interchange.names import NoMatchError, __all__  # noqa: F401
