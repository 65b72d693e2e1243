"""Where the cells of a sweep run: one after another in this process (``"local"``, the
default, no Ray needed) or as Ray tasks (``"ray"``) on this machine or a Ray cluster.

``transfer_matrix``, ``k_sweep``, ``data_efficiency``, ``compare`` and the analysis modules
(``--executor ray [--ray-address ADDR]``) take ``executor=``: ``"local"``, ``"ray"``, an
``Executor`` or ``None`` (the process default, ``set_default_executor``; ``"local"`` unless
changed). ``executor.map(fn, model, items)`` returns ``[fn(model, item) for item in items]``:

- local: in this process, on ``model`` itself.
- Ray: one task per item, asking for one GPU when the cluster has GPUs and one CPU slot
  otherwise (``RayExecutor(gpus_per_cell=...)`` for a model split over several). A worker
  loads the model once with ``model.lofit_loader`` (``load_model`` sets it: the same name,
  dtype and device map, on the worker's device) and keeps it for its next cells. A task whose
  worker dies (killed, out of memory, a node lost) is rerun by Ray (``max_retries``); cells
  write their results to the on-disk cell cache (``lofit_lens.analysis.cells``) as they
  finish, so a rerun or a resumed sweep recomputes only what is missing. Put ``cache_dir``
  on a path every node sees (NFS, a shared home): a cluster then resumes what a laptop
  started, and the other way round. See docs/scale.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar, Union, runtime_checkable

logger = logging.getLogger(__name__)

T = TypeVar("T")
Cell = Callable[[Any, Any], T]
"""``fn(model, item)``: a module-level function (Ray pickles it by reference) and picklable items."""


@runtime_checkable
class Executor(Protocol):
    name: str
    in_process: bool
    """True when ``fn`` runs in this process on the caller's model (shared in-memory state,
    such as an encoded training set, may then go into the items)."""

    def map(self, fn: Cell, model, items: Sequence[Any], desc: Optional[str] = None,
            progress: bool = False) -> list: ...


class LocalExecutor:
    """Every cell in this process, one after another, in order."""

    name = "local"
    in_process = True

    def map(self, fn: Cell, model, items: Sequence[Any], desc: Optional[str] = None,
            progress: bool = False) -> list:
        from tqdm.auto import tqdm

        return [fn(model, item) for item in tqdm(items, desc=desc, disable=not progress or len(items) < 2)]


class RayExecutor:
    """Every cell as a Ray task (results in the order of ``items``).

    ``address``: a running cluster (``"auto"``, ``"ray://head:10001"``, ``"10.0.0.1:6379"``);
    ``None``: the cluster ``ray.init`` finds or starts (a local instance on this machine).
    ``gpus_per_cell``: GPUs each task asks for (default: 1 when the cluster has GPUs, else 0
    and one CPU slot). ``max_retries``: reruns of a task whose worker died (application
    errors are not retried: they would fail again). ``init``: more ``ray.init`` keywords.
    """

    name = "ray"
    in_process = False

    def __init__(self, address: Optional[str] = None, gpus_per_cell: Optional[float] = None,
                 cpus_per_cell: float = 1, max_retries: int = 3, **init: Any):
        self.address, self.gpus_per_cell, self.cpus_per_cell = address, gpus_per_cell, cpus_per_cell
        self.max_retries, self.init = max_retries, init

    def _ray(self):
        try:
            import ray
        except ImportError as err:
            raise ImportError("executor='ray' needs Ray: pip install 'lofit-lens[ray]' (or "
                              "pip install ray); the default executor='local' does not") from err
        if not ray.is_initialized():
            init = dict(self.init)
            if self.address is None:  # a local instance: its workers import this checkout
                env = dict(init.pop("runtime_env", None) or {})
                env_vars = dict(env.get("env_vars") or {})
                package_root = str(Path(__file__).resolve().parents[1])
                paths = [package_root, env_vars.get("PYTHONPATH") or os.environ.get("PYTHONPATH", "")]
                env_vars["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
                init["runtime_env"] = {**env, "env_vars": env_vars}
            init.setdefault("log_to_driver", False)
            ray.init(address=self.address, **init)
        return ray

    def resources(self) -> dict[str, float]:
        """What each cell asks of the cluster: one GPU when it has GPUs, else one CPU slot."""
        ray = self._ray()
        gpus = self.gpus_per_cell
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        return {"num_gpus": gpus, "num_cpus": self.cpus_per_cell}

    def map(self, fn: Cell, model, items: Sequence[Any], desc: Optional[str] = None,
            progress: bool = False) -> list:
        from tqdm.auto import tqdm

        items = list(items)
        if not items:
            return []
        ray = self._ray()
        loader = model_loader(model)
        key = _loader_key(loader)
        loader_ref = ray.put(loader)
        task = ray.remote(_run_cell).options(max_retries=self.max_retries,
                                             retry_exceptions=False, **self.resources())
        refs = [task.remote(key, loader_ref, fn, item) for item in items]
        with tqdm(total=len(refs), desc=f"{desc} (ray)" if desc else "ray",
                  disable=not progress) as bar:
            waiting = list(refs)
            while waiting:  # a failed task raises here, after Ray's retries
                done, waiting = ray.wait(waiting, num_returns=1)
                ray.get(done)
                bar.update(len(done))
        return ray.get(refs)


ExecutorLike = Union[None, str, Executor]
_default: Executor = LocalExecutor()


def set_default_executor(executor: ExecutorLike, address: Optional[str] = None) -> Executor:
    """Make ``executor`` what ``executor=None`` means in this process (the analysis modules'
    ``--executor`` / ``--ray-address`` set it); returns it."""
    global _default
    _default = get_executor(executor or "local", address)
    return _default


def get_executor(executor: ExecutorLike = None, address: Optional[str] = None) -> Executor:
    """``None``: the process default; ``"local"``; ``"ray"`` (at ``address``); an
    ``Executor`` as it is."""
    if executor is None:
        return _default
    if isinstance(executor, str):
        if executor == "local":
            return LocalExecutor()
        if executor == "ray":
            return RayExecutor(address)
        raise ValueError(f"executor={executor!r}: expected 'local' or 'ray'")
    if isinstance(executor, Executor):
        return executor
    raise TypeError(f"executor={executor!r}: expected 'local', 'ray' or an Executor")


# ---------------------------------------------------------------------- Ray workers
def model_loader(model) -> Callable[[], Any]:
    """The picklable zero-argument callable that rebuilds ``model`` in a worker:
    ``model.lofit_loader`` (``load_model`` sets it; set it yourself for a model built another
    way, to a module-level function or a ``functools.partial`` of one)."""
    loader = getattr(model, "lofit_loader", None)
    if loader is None:
        raise ValueError(
            f"{type(model).__name__} has no lofit_loader: a Ray worker cannot rebuild it. Load it "
            "with lofit_lens.load_model(...), or set model.lofit_loader to a picklable "
            "callable that returns the same model")
    return loader


def _loader_key(loader) -> str:
    import cloudpickle

    return hashlib.sha256(cloudpickle.dumps(loader)).hexdigest()[:16]


_worker_model: dict[str, Any] = {}
"""The model this worker process holds (one at a time), by loader key."""


def worker_model(key: str, loader: Callable[[], Any]):
    """The model of ``loader`` in this worker, loaded once (a worker holds one model)."""
    if key not in _worker_model:
        _worker_model.clear()
        _worker_model[key] = loader()
    return _worker_model[key]


def _run_cell(key: str, loader: Callable[[], Any], fn: Cell, item: Any):
    return fn(worker_model(key, loader), item)
