"""Executors (lofit_lens.executors): local by default with no Ray; on a local Ray instance
(``ray.init(num_cpus=2)``) the sweeps give the same cells and numbers as local execution, a
cluster resumes from the cell cache a local run wrote, and a cell whose worker is killed is
rerun, not lost."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lofit_lens import executors
from lofit_lens.executors import LocalExecutor, RayExecutor, get_executor, set_default_executor

REPO = Path(__file__).resolve().parents[1]
BUDGET = dict(epochs_select=1, epochs_bias=1, max_train_examples=8, max_val_examples=0,
              max_eval_examples=3, batch_size=4)


# ---------------------------------------------------------------------- no Ray needed
def test_local_is_the_default_and_runs_in_order():
    assert isinstance(get_executor(), LocalExecutor) and get_executor().in_process
    assert isinstance(get_executor("local"), LocalExecutor)
    assert LocalExecutor().map(lambda model, item: (model, item * 2), "m", [1, 2, 3]) == \
        [("m", 2), ("m", 4), ("m", 6)]
    with pytest.raises(ValueError, match="'local' or 'ray'"):
        get_executor("dask")


def test_default_executor_can_be_set(monkeypatch):
    monkeypatch.setattr(executors, "_default", LocalExecutor())
    chosen = set_default_executor("ray", "auto")
    assert isinstance(chosen, RayExecutor) and chosen.address == "auto" and get_executor() is chosen
    set_default_executor(None)
    assert isinstance(get_executor(), LocalExecutor)


def test_ray_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r"lofit-lens\[ray\]"):
        RayExecutor().map(lambda m, i: i, object(), [1])


def test_a_model_without_a_loader_is_refused(tiny_model):
    with pytest.raises(ValueError, match="lofit_loader"):
        executors.model_loader(object())


# ---------------------------------------------------------------------- a local Ray instance
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    paths = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p),
                                       "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folder_model(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama saved as an HF folder and loaded by ``load_model``, so a Ray worker
    rebuilds it with ``model.lofit_loader``."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_llama
    from lofit_lens import load_model

    folder = tmp_path_factory.mktemp("tiny-hf")
    tiny_llama(tiny_tokenizer).save_pretrained(folder)  # not tiny_hf: a bridge wraps that one
    tiny_tokenizer.save_pretrained(folder)
    return load_model(str(folder), device="cpu")


def _same_step_2(a: Path, b: Path) -> None:
    """Two caches hold the same step-2 phases (same keys) with the same v."""
    tunes = sorted(p.name for p in a.glob("tune-*.safetensors"))
    assert tunes and tunes == sorted(p.name for p in b.glob("tune-*.safetensors"))
    for name in tunes:
        torch.testing.assert_close(load_file(str(b / name))["bias"], load_file(str(a / name))["bias"],
                                   atol=1e-6, rtol=0)


def test_transfer_matrix_on_ray_matches_local(ray_local, folder_model, arithmetic_tasks, tmp_path):
    from lofit_lens.analysis.transfer import transfer_matrix

    torch.set_num_threads(1)
    kwargs = dict(k=2, progress=False, n_bootstrap=50, **BUDGET)
    local = transfer_matrix(folder_model, arithmetic_tasks, cache_dir=tmp_path / "local", **kwargs)
    remote = transfer_matrix(folder_model, arithmetic_tasks, cache_dir=tmp_path / "ray", executor="ray", **kwargs)
    assert remote.heads == local.heads
    cols = ["source", "target", "accuracy", "n_eval", "k", "cached"]
    assert remote.cells[cols].equals(local.cells[cols])
    assert not remote.cells["cached"].any()
    assert all(str(tmp_path / "ray") in f for f in remote.cells["file"])
    _same_step_2(tmp_path / "local", tmp_path / "ray")
    # a cluster resumes what a laptop started: every cell of the local cache is read back
    resumed = transfer_matrix(folder_model, arithmetic_tasks, cache_dir=tmp_path / "local", executor="ray",
                              **kwargs)
    assert resumed.cells["cached"].all()
    assert resumed.cells[cols[:-1]].equals(local.cells[cols[:-1]])


def test_sweeps_and_compare_on_ray_match_local(ray_local, folder_model, arithmetic_tasks, tmp_path):
    from lofit_lens.analysis.sweeps import data_efficiency, k_sweep
    from lofit_lens.methods.compare import compare, load_intervention

    torch.set_num_threads(1)
    shown = ["method", "fraction", "k", "accuracy", "n_eval"]
    run = dict(progress=False, **{k: v for k, v in BUDGET.items()})
    local = k_sweep(folder_model, arithmetic_tasks[0], [0.1, 0.5], cache_dir=tmp_path / "l", **run)
    remote = k_sweep(folder_model, arithmetic_tasks[0], [0.1, 0.5], cache_dir=tmp_path / "r",
                     executor="ray", **run)
    assert remote[shown].equals(local[shown])
    run.pop("max_train_examples")
    local = data_efficiency(folder_model, arithmetic_tasks[1], [4, 8], k=2, cache_dir=tmp_path / "l", **run)
    remote = data_efficiency(folder_model, arithmetic_tasks[1], [4, 8], k=2, cache_dir=tmp_path / "r",
                             executor="ray", **run)
    shown = ["method", "size", "n_train", "k", "accuracy"]
    assert remote[shown].equals(local[shown])
    settings = dict(methods=["zero_shot", "random", "lofit"], seeds=[0, 1], k=2, epochs=1,
                    max_train_examples=8, max_eval_examples=3, progress=False,
                    max_val_examples=0, batch_size=4)
    a = compare(folder_model, arithmetic_tasks[0], out=tmp_path / "cl", **settings)
    b = compare(folder_model, arithmetic_tasks[0], out=tmp_path / "cr", executor="ray", **settings)
    numbers = [c for c in a.columns if c.endswith("_mean")] + ["params", "runs"]
    assert b[["method", *numbers]].equals(a[["method", *numbers]])
    for stem in ("random-seed1", "lofit-seed0"):
        remote_v, local_v = (load_intervention(tmp_path / run / "runs" / f"{stem}.json").state_tensors()
                             for run in ("cr", "cl"))
        torch.testing.assert_close(remote_v, local_v, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- a killed worker
@dataclass
class DiesOnce:
    """A cell whose first attempt kills its own worker process (SIGKILL: no cleanup, as an
    OOM kill or a lost node); the marker file tells the retry it is the second attempt."""

    marker: str
    inner: object


def dies_once(model, item: DiesOnce):
    from lofit_lens.analysis.sweeps import run_item

    marker = Path(item.marker)
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return run_item(model, item.inner), int(marker.read_text()), os.getpid()


def test_a_killed_workers_cell_is_rerun(ray_local, folder_model, arithmetic_tasks, tmp_path):
    from lofit_lens.analysis.sweeps import BiasItem, run_item
    from lofit_lens.training import resolve_run

    task, cfg = resolve_run(arithmetic_tasks[0], None, {**BUDGET, "seed": 0})
    item = BiasItem(task, cfg, [(0, 1), (2, 3)], tmp_path / "cache")
    [(record, killed_pid, pid)] = RayExecutor(max_retries=2).map(
        dies_once, folder_model, [DiesOnce(str(tmp_path / "marker"), item)])
    assert killed_pid != pid  # the first worker died; another ran the cell
    assert not record["cached"] and Path(record["path"]).is_file()
    again = run_item(folder_model, item)  # the cell is in the cache, as any finished cell
    assert again["cached"] and again["accuracy"] == record["accuracy"]
    with pytest.raises(Exception):  # without retries, the death is an error, not a lost cell
        (tmp_path / "marker2").unlink(missing_ok=True)
        RayExecutor(max_retries=0).map(dies_once, folder_model,
                                       [DiesOnce(str(tmp_path / "marker2"), item)])
