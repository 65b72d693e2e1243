"""One store for everything lofit-lens saves: settings keys, atomic writes, folder locks, and
artifacts (tensors as safetensors plus a JSON card with the versions and a checksum).

Every saved object (a ``LoFiTResult``, a phase checkpoint, an analysis cell, a baseline's
intervention) is an *artifact*: ``<name>.safetensors`` and a card ``<name>.json`` (the file
names can be chosen). The card is written last and holds the SHA-256 of the tensor file, so
a reader never takes a half-written or mismatched pair for a valid one: it gets an
``ArtifactError`` naming the file. Cards of format 1 (lofit-lens 0.1.0) have no checksum and
load unchecked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lofit_lens.errors import ArtifactError, OutputLockedError
from lofit_lens.versions import library_versions

FORMAT_VERSION = 2
"""1: lofit-lens 0.1.0 (no checksum). 2: ``tensors_sha256`` and ``kind`` on every card."""
SUPPORTED_FORMATS = (1, 2)
LOCK_NAME = ".lofit-lens.lock"


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
def _partial(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.partial")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _readable_like_any_file(path: Path) -> None:
    """Give ``path`` the mode a plain new file gets (0666 less the umask): safetensors
    writes 0600, which other users of a shared cache folder (a Ray cluster) cannot read."""
    os.chmod(path, 0o666 & ~_umask())


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically: readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=1, default=str))


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; a damaged file is an ``ArtifactError`` that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON (damaged or truncated): {err}") from err


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
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
    else:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(
                f"{folder} is in use by another lofit-lens process (it holds {LOCK_NAME}); "
                "give this run another output folder, or wait for the other to finish"
            ) from None
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


# ---------------------------------------------------------------------- artifacts
def save_artifact(folder: str | Path, tensors: Mapping[str, Tensor], card: Mapping[str, Any], *,
                  kind: str, name: Optional[str] = None, card_name: Optional[str] = None,
                  tensors_name: Optional[str] = None) -> Path:
    """Write ``tensors`` (fp32, contiguous) and ``card`` under ``folder``; returns the card path.

    Files: ``<name>.safetensors`` and ``<name>.json``, or ``tensors_name`` / ``card_name``.
    The card gains ``format_version``, ``kind``, ``versions``, ``tensors_file`` and
    ``tensors_sha256``; it is written after the tensors, both atomically.
    """
    folder = Path(folder)
    card_path = folder / (card_name or f"{name}.json")
    tensor_path = folder / (tensors_name or f"{name}.safetensors")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _partial(tensor_path)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()},
              str(tmp))
    _readable_like_any_file(tmp)
    checksum = file_sha256(tmp)
    os.replace(tmp, tensor_path)
    full = {"format_version": FORMAT_VERSION, "kind": kind, **dict(card),
            "versions": dict(card.get("versions") or library_versions()),
            "tensors_file": tensor_path.name, "tensors_sha256": checksum}
    write_text(card_path, json.dumps(jsonable(full), indent=2))
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
    return load_tensors(folder / tensor_file, card.get("tensors_sha256")), card


def artifact_exists(folder: str | Path, *, name: Optional[str] = None,
                    card_name: Optional[str] = None) -> bool:
    return (Path(folder) / (card_name or f"{name}.json")).is_file()
