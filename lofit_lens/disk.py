"""Disk faults, named: which OS errors mean a full disk or a read-only folder
(``write_error``), a writability probe run before expensive work (``check_writable``), and
staged writes (``staged``: a ``.partial`` sibling renamed into place, removed by ``discard``
when the write fails).

It imports only ``lofit_lens.errors``, so the lowest layer (``backends``: the model cache)
uses it as the store (``--out``) does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, NoReturn, Optional

from safetensors import SafetensorError

from lofit_lens.errors import OutputNotWritableError


def discard(path: Path) -> None:
    """Remove ``path`` (a ``.partial`` file or folder) if it is there; never raises."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
WRITE_FIX = ("free space on that disk, or choose another folder (CLI: --out; the model "
             "cache: $LOFIT_LENS_CACHE)")


def _errno_of(err: BaseException) -> Optional[int]:
    """The OS error number of ``err``: an ``OSError``'s, or the one a ``SafetensorError``
    quotes ("... (os error 28)")."""
    if isinstance(err, OSError):
        return err.errno
    if isinstance(err, SafetensorError):
        found = re.search(r"os error (\d+)", str(err))
        return int(found.group(1)) if found else None
    return None


def write_error(path: str | Path, err: BaseException, fix: str = WRITE_FIX) -> BaseException:
    """``OutputNotWritableError`` naming ``path`` when ``err`` says its disk is full or it is
    read-only; else ``err`` itself (other failures keep their own error)."""
    number = _errno_of(err)
    if number in FULL:
        why = "the disk is full"
    elif number in READ_ONLY:
        why = "the folder is read-only (or not this user's to write)"
    else:
        return err
    detail = getattr(err, "strerror", None) or str(err)
    return OutputNotWritableError(f"Cannot write {path}: {why} ({detail}); {fix}")


def raise_write_error(path: str | Path, err: BaseException, fix: str = WRITE_FIX) -> NoReturn:
    """Raise ``err`` as ``OutputNotWritableError`` naming ``path`` when it is a full disk or a
    read-only folder (chained to ``err``), else ``err`` itself. Call it in an ``except``."""
    named = write_error(path, err, fix)
    if named is err:
        raise err
    raise named from err


def partial_path(path: Path) -> Path:
    """``<path>.<pid>.partial``: the sibling this process writes ``path`` in before renaming
    it into place (the pid keeps two writers of one path apart)."""
    return path.with_name(f"{path.name}.{os.getpid()}.partial")


@contextlib.contextmanager
def staged(path: Path, fix: str = WRITE_FIX) -> Iterator[Path]:
    """Yield ``partial_path(path)``, cleared, for the ``with`` body to write and rename into
    place. On any failure it is removed, and a full disk or a read-only folder is raised as
    ``OutputNotWritableError`` naming ``path`` and ``fix``."""
    tmp = partial_path(path)
    discard(tmp)  # a leftover of an earlier process that had this pid
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
    except BaseException as err:
        discard(tmp)
        raise_write_error(path, err, fix)


def check_writable(folder: str | Path, need_bytes: int = 0, fix: str = WRITE_FIX) -> None:
    """Raise ``OutputNotWritableError`` unless a file can be written in ``folder`` (or, if it
    does not exist yet, in the folder it would be made in) and its disk has ``need_bytes``
    free. Writes and removes one small probe file; makes no folder."""
    folder = Path(folder).absolute()
    where = folder
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise OutputNotWritableError(f"Cannot write in {folder}: {where} is a file, not a "
                                     f"folder; {fix}")
    probe = where / f".lofit-lens-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
    except OSError as err:
        raise_write_error(folder, err, fix)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    stats = os.statvfs(where)
    free = stats.f_bavail * stats.f_frsize
    if stats.f_blocks and free < need_bytes:  # f_blocks 0: the file system tells no sizes
        raise OutputNotWritableError(
            f"Cannot write {folder}: its disk has {free / 2**20:.0f} MiB free and this needs "
            f"about {need_bytes / 2**20:.0f} MiB; {fix}")
