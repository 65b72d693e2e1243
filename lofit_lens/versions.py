"""Library versions: recorded in every saved artifact, and checked against the lock.

``requirements/lock.txt`` (made by ``scripts/lock.sh``) is the one tested set of versions.
``check_lock`` (which ``scripts/install.sh`` runs) fails, naming each difference, when the
installed packages are not exactly that set.
"""

from __future__ import annotations

import platform
import re
import sys
from importlib import metadata
from pathlib import Path

TRACKED = ("lofit-lens", "transformer-lens", "torch", "transformers", "datasets")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED:
        versions[name] = installed_version(name) or "not installed"
    return versions


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _public(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: a pin without a local label admits any local build."""
    return version.split("+", 1)[0]


def read_lock(path: str | Path) -> dict[str, str]:
    """``{package: version}`` of every ``name==version`` line of a pip-compile lock file."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[_canonical(match.group(1))] = match.group(2)
    if not pins:
        raise ValueError(f"{path}: no 'name==version' pins found; is this a lock file?")
    return pins


def lock_mismatches(path: str | Path, require_all: bool = False) -> list[str]:
    """One line per locked package whose installed version differs from the lock's (and,
    with ``require_all``, per locked package that is not installed)."""
    problems = []
    for name, want in sorted(read_lock(path).items()):
        have = installed_version(name)
        if have is None:
            if require_all:
                problems.append(f"{name}: not installed (lock: {want})")
        elif _public(have) != _public(want):
            problems.append(f"{name}: installed {have}, lock {want}")
    return problems


def check_lock(path: str | Path, require_all: bool = False) -> None:
    """Exit 1 with every difference when the installed set is not exactly the lock's
    (``require_all``: every locked package must be installed, as after ``install.sh --dev``)."""
    problems = lock_mismatches(path, require_all)
    if problems:
        sys.exit(f"Installed packages differ from {path}:\n  " + "\n  ".join(problems)
                 + "\nReinstall with scripts/install.sh, or refresh the lock with scripts/lock.sh.")
    print(f"versions: the installed set matches {path} ({len(read_lock(path))} pins)")
