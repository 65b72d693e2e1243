"""One store for everything lofit-lens saves: settings keys, atomic writes, folder locks, and
artifacts (tensors as safetensors plus a JSON card with the versions and a checksum).

Every saved object (a ``LoFiTResult``, a phase checkpoint, an analysis cell, a baseline's
intervention) is an *artifact*: ``<name>.safetensors`` and a card ``<name>.json`` (the file
names can be chosen). The card is written last and holds the SHA-256 of the tensor file, of
any companion files it lists, and of the card itself, so a reader never takes a half-written,
mismatched or edited artifact for a valid one: a changed byte anywhere is an
``ArtifactError`` naming the file. Cards of format 1 (lofit-lens 0.1.0) have no checksum and
load unchecked; format 2 cards check the tensors only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from lofit_lens.disk import raise_write_error, staged
from lofit_lens.errors import ArtifactError, OutputLockedError
from lofit_lens.versions import library_versions

FORMAT_VERSION = 3
"""1: lofit-lens 0.1.0 (no checksum). 2: ``tensors_sha256`` and ``kind`` on every card.
3: also ``card_sha256`` (the card itself) and ``files_sha256`` (companion files)."""
SUPPORTED_FORMATS = (1, 2, 3)
CARD_CHECKSUM = "card_sha256"
LOCK_NAME = ".lofit-lens.lock"
WRITE_LOCK_NAME = ".lofit-lens.write.lock"
LOCK_NAMES = (LOCK_NAME, WRITE_LOCK_NAME)


# ---------------------------------------------------------------------- keys and names
def settings_key(settings: Mapping[str, Any]) -> str:
    """12 hex digits of the SHA-256 of ``settings`` as canonical JSON."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def slug(text: str) -> str:
    """A folder-safe form of a model id or task name (``org/name`` -> ``org__name``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.replace("/", "__"))


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples -> lists, paths -> strings)."""
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------- atomic files
def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` atomically: readers see the old file or the new one, never a part. A
    failed write (a full disk, a read-only folder: ``OutputNotWritableError``) leaves
    neither a truncated file nor its ``.partial``."""
    path = Path(path)
    with staged(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically, as ``write_bytes``."""
    return write_bytes(path, text.encode("utf-8"))


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; a damaged file is an ``ArtifactError`` that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON (damaged or truncated): {err}") from err


def card_sha256(card: Mapping[str, Any]) -> str:
    """SHA-256 of a card's canonical JSON, less its own ``card_sha256``."""
    body = {k: v for k, v in card.items() if k != CARD_CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------- locks
_held: dict[str, tuple[int, int]] = {}  # real path -> (fd, depth): re-entrant per process


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder``'s write lock (created if needed) for the ``with`` body.

    Another process holding it raises ``OutputLockedError`` at once (two runs writing one
    folder would mix their files). Re-entrant within a process.
    """
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
    else:
        fd = _locked(folder)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _held[key] = (fd, 1)
    try:
        yield folder
    finally:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
        else:
            del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextlib.contextmanager
def shared_write_lock(folder: str | Path) -> Iterator[Path]:
    """A short lock for writers that share ``folder`` (parallel workers, several runs on one
    cache): one writes at a time, the others wait for it. Unlike ``folder_lock``, which
    marks a folder as one run's and refuses a second, it never raises for a busy folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / WRITE_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise_write_error(folder / WRITE_LOCK_NAME, err)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _locked(folder: Path) -> int:
    """A descriptor of ``folder``'s lock file, locked (the folder and file made if needed)."""
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise_write_error(folder, err)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(
                f"{folder} is in use by another lofit-lens process (it holds {LOCK_NAME}); "
                "give this run another output folder, or wait for the other to finish"
            ) from None
        try:  # the file still at its path: not removed by remove_unused_folder meanwhile
            if os.path.samestat(os.fstat(fd), os.stat(folder / LOCK_NAME)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holds_nothing(folder: Path) -> bool:
    """Whether ``folder`` holds only lock files and folders that hold nothing."""
    return all((p.name in LOCK_NAMES and p.is_file()) or
               (p.is_dir() and not p.is_symlink() and _holds_nothing(p))
               for p in folder.iterdir())


def remove_unused_folder(folder: str | Path, remove_folder: bool = True,
                         existing: Collection[str] = ()) -> bool:
    """Remove ``folder``'s lock file, and with ``remove_folder`` the folder too, when nothing
    else was written there: what a run that stopped before writing anything leaves. Entries
    named in ``existing`` (what was there before) are kept and do not count; subfolders that
    hold only lock files or nothing are removed with it. A folder in use by another
    process, or holding any other file, is left as it is. Returns whether something was
    removed."""
    folder = Path(folder)
    remove_folder = remove_folder and not existing
    if os.path.realpath(folder) in _held or not (folder / LOCK_NAME).is_file():
        return False
    try:
        fd = _locked(folder)
    except (OutputLockedError, OSError):
        return False
    try:
        new = [p for p in folder.iterdir() if p.name not in existing and p.name != LOCK_NAME]
        if not all(p.is_dir() and not p.is_symlink() and _holds_nothing(p) for p in new):
            return False
        for sub in new:
            shutil.rmtree(sub, ignore_errors=True)
        (folder / LOCK_NAME).unlink()  # held meanwhile: a waiting process retries (_locked)
        if remove_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()
        return True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ---------------------------------------------------------------------- artifacts
def save_artifact(folder: str | Path, tensors: Mapping[str, Tensor], card: Mapping[str, Any], *,
                  kind: str, name: Optional[str] = None, card_name: Optional[str] = None,
                  tensors_name: Optional[str] = None, files: Sequence[str] = ()) -> Path:
    """Write ``tensors`` (fp32, contiguous) and ``card`` under ``folder``; returns the card path.

    Files: ``<name>.safetensors`` and ``<name>.json``, or ``tensors_name`` / ``card_name``.
    ``files``: companion files already written in ``folder`` (say ``predictions.jsonl``) whose
    checksums the card keeps. The card gains ``format_version``, ``kind``, ``versions``,
    ``tensors_file``, ``tensors_sha256``, ``files_sha256`` and, last, ``card_sha256``; it is
    written after the tensors, both atomically.
    """
    folder = Path(folder)
    card_path = folder / (card_name or f"{name}.json")
    tensor_path = folder / (tensors_name or f"{name}.safetensors")
    # Serialised in memory, written as any file (the umask's mode: a shared cache stays
    # readable) and hashed from the same bytes, not read back.
    data = save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()})
    write_bytes(tensor_path, data)
    checksum = hashlib.sha256(data).hexdigest()
    full = {"format_version": FORMAT_VERSION, "kind": kind, **dict(card),
            "versions": dict(card.get("versions") or library_versions()),
            "tensors_file": tensor_path.name, "tensors_sha256": checksum,
            "files_sha256": {f: file_sha256(folder / f) for f in files}}
    full = jsonable(full)
    full[CARD_CHECKSUM] = card_sha256(full)
    write_text(card_path, json.dumps(full, indent=2))
    return card_path


def load_card(card_path: str | Path, kind: Optional[str] = None,
              required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A card, checked: valid JSON, a supported format version, the expected ``kind`` and the
    ``required`` keys, or an ``ArtifactError`` that says which."""
    card_path = Path(card_path)
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path} does not exist")
    card = read_json(card_path)
    if not isinstance(card, dict):
        raise ArtifactError(f"{card_path}: expected a JSON object, found {type(card).__name__}")
    version = card.get("format_version", 1)
    if version not in SUPPORTED_FORMATS:
        raise ArtifactError(
            f"{card_path} has format_version {version!r}; this lofit-lens "
            f"({library_versions().get('lofit-lens', '?')}) reads {list(SUPPORTED_FORMATS)}. "
            "Upgrade lofit-lens to load it")
    if kind is not None and card.get("kind", kind) != kind:
        raise ArtifactError(f"{card_path} holds a {card['kind']!r}, not a {kind!r}")
    if version >= 3 and card.get(CARD_CHECKSUM) != card_sha256(card):
        raise ArtifactError(
            f"{card_path} does not match its own checksum ({CARD_CHECKSUM}): the card was "
            "edited or damaged after it was saved. Recompute the result (or restore the file)")
    missing = [key for key in required if key not in card]
    if missing:
        raise ArtifactError(f"{card_path} lacks {', '.join(map(repr, missing))}: "
                            "the card is incomplete or damaged")
    return card


def load_tensors(path: str | Path, checksum: Optional[str] = None) -> dict[str, Tensor]:
    """The tensors in ``path``, verified against ``checksum`` when the card has one."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: its card says it was saved")
    if checksum is not None and file_sha256(path) != checksum:
        raise ArtifactError(
            f"{path} does not match the SHA-256 in its card: the file was changed or damaged "
            "after it was saved, or belongs to another run")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path} is not a readable safetensors file ({err})") from err


def load_artifact(folder: str | Path, *, kind: Optional[str] = None, name: Optional[str] = None,
                  card_name: Optional[str] = None, tensors_name: Optional[str] = None,
                  required: tuple[str, ...] = ()) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, card)`` of an artifact written by ``save_artifact`` (or by 0.1.0)."""
    folder = Path(folder)
    card = load_card(folder / (card_name or f"{name}.json"), kind, required)
    tensor_file = card.get("tensors_file") or tensors_name or f"{name}.safetensors"
    tensors = load_tensors(folder / tensor_file, card.get("tensors_sha256"))
    for file, checksum in (card.get("files_sha256") or {}).items():
        if not (folder / file).is_file() or file_sha256(folder / file) != checksum:
            raise ArtifactError(
                f"{folder / file} is missing or does not match the SHA-256 in "
                f"{folder / (card_name or f'{name}.json')}: it was changed or damaged after "
                "it was saved")
    return tensors, card


def artifact_exists(folder: str | Path, *, name: Optional[str] = None,
                    card_name: Optional[str] = None) -> bool:
    return (Path(folder) / (card_name or f"{name}.json")).is_file()
