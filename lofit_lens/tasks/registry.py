"""Task lookup by name or file path; ``register_task`` adds your own factories."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from lofit_lens.tasks.base import Task
from lofit_lens.tasks.clutrr import Clutrr
from lofit_lens.tasks.file_task import FileTask
from lofit_lens.tasks.mquake import MQuAKE
from lofit_lens.tasks.truthfulqa import TruthfulQA

TaskFactory = Callable[..., Task]
"""Called as ``factory(data_dir=..., **options)``, with ``protocol=`` too when it takes one."""

FILE_SUFFIXES = (".jsonl", ".json", ".csv")

_REGISTRY: dict[str, TaskFactory] = {
    "clutrr": Clutrr,
    "mquake": MQuAKE,
    "truthfulqa": TruthfulQA,
}


def register_task(name: str, factory: TaskFactory, *, overwrite: bool = False) -> None:
    """Make ``get_task(name, data_dir=..., **options)`` call ``factory``."""
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"Task {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[key] = factory


def list_tasks() -> list[str]:
    return sorted(_REGISTRY)


def get_task(
    name_or_path: Union[str, Path, Task, Mapping[str, Union[str, Path]]],
    data_dir: Optional[Union[str, Path]] = None,
    **options: Any,
) -> Task:
    """A task by registered name (``"truthfulqa"``, options like ``fold=1``), by the path of a
    .jsonl/.json/.csv file (or a ``{"train": ..., "val": ..., "test": ...}`` dict of them),
    or a ``Task`` passed through unchanged. Relative file paths are tried from the cwd, then
    under ``data_dir``; other ``options`` go to ``FileTask``."""
    if isinstance(name_or_path, Task):
        if options:
            raise ValueError(f"Options {sorted(options)} cannot apply to an existing Task")
        return name_or_path
    from lofit_lens.errors import ConfigError

    def located(path: Union[str, Path], found: Optional[Path] = None) -> Path:
        found = _locate(path, data_dir) if found is None else found
        if found.is_dir():  # named as such, not "not found" / "unknown task"
            raise ConfigError(f"Task path {str(path)!r} is a directory, expected a "
                              f"{'/'.join(FILE_SUFFIXES)} task file")
        return found

    if isinstance(name_or_path, Mapping):
        return FileTask({k: located(p) for k, p in name_or_path.items()}, **options)
    text = str(name_or_path)
    if text.lower() not in _REGISTRY:
        located(text, Path(text))
    if text.lower().endswith(FILE_SUFFIXES):
        return FileTask(located(text), **options)
    factory = _REGISTRY.get(text.lower())
    if factory is None:
        raise ValueError(f"Unknown task {text!r}: registered tasks are {list_tasks()}, or give "
                         f"the path of a {'/'.join(FILE_SUFFIXES)} file")
    protocol = options.pop("protocol", None)
    if protocol is not None and _takes_protocol(factory):
        options["protocol"] = protocol
    task = factory(data_dir=data_dir, **options)
    if protocol is not None and getattr(task, "protocol", protocol) != protocol:
        raise ValueError(f"Task {text!r} was asked for protocol={protocol!r}, but its factory "
                         f"takes no protocol and built a {task.protocol!r} task")
    return task


def _takes_protocol(factory: TaskFactory) -> bool:
    params = inspect.signature(factory).parameters.values()
    return any(p.name == "protocol" or p.kind is p.VAR_KEYWORD for p in params)


def _locate(path: Union[str, Path], data_dir: Optional[Union[str, Path]]) -> Path:
    """``path`` if it exists, else ``data_dir / path`` if that exists."""
    path = Path(path)
    if not path.exists() and data_dir is not None and not path.is_absolute():
        candidate = Path(data_dir) / path
        if candidate.exists():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"Task file not found: {path}"
                                + (f" (nor under {data_dir})" if data_dir is not None else ""))
    return path
