"""Named errors lofit-lens raises on purpose (each says what is wrong and where to read more)."""

from __future__ import annotations

GOTCHAS = "docs/gotchas.md"


class LoFiTLensError(Exception):
    """Base of the errors lofit-lens raises on purpose."""


class BrokenEnvironmentError(LoFiTLensError, RuntimeError):
    """The installed packages do not compute what lofit-lens relies on (``doctor`` failed):
    every number this environment printed would be wrong."""
