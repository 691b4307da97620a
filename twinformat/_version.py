"""The one place the version lives: the distribution's metadata (pyproject's dynamic version), every
package's ``__version__``, ``--version`` and the ``library_version`` recorded in files all read it."""

__version__ = "0.2.0"
