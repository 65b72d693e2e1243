"""Named errors lofit-lens raises on purpose (each says what is wrong and where to read more)."""

from __future__ import annotations

GOTCHAS = "docs/gotchas.md"


class LoFiTLensError(Exception):
    """Base of the errors lofit-lens raises on purpose."""


class BrokenEnvironmentError(LoFiTLensError, RuntimeError):
    """The installed packages do not compute what lofit-lens relies on (``doctor`` failed):
    every number this environment printed would be wrong."""


class ConfigError(LoFiTLensError, ValueError):
    """A setting is out of range or of the wrong type (raised before any model work)."""


class ArtifactError(LoFiTLensError, ValueError):
    """A saved folder is damaged, incomplete, of an unknown format version, or does not
    match its card (checksum): nothing is loaded from it."""


class OutputLockedError(LoFiTLensError, RuntimeError):
    """Another process is writing to the same output folder."""


class ResultExistsError(LoFiTLensError, FileExistsError):
    """The output folder holds a different result; pass ``overwrite=True`` / ``--overwrite``."""


class TrainingDivergedError(LoFiTLensError, RuntimeError):
    """The training loss became non-finite or rose far above its start: the phase stopped
    and nothing from it was saved (earlier phases are kept)."""


class PromptTooLongError(LoFiTLensError, ValueError):
    """A prompt does not fit the model's context length."""


class UnsupportedModelError(LoFiTLensError, TypeError):
    """The object is not a hooked model lofit-lens can attach to."""
