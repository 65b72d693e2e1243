"""Data-parallel training (lofit_lens.distributed): the sharded, weighted, all-reduced gradient
is the single-process gradient of the global batch, and two processes over gloo learn the
same heads and the same v (atol 1e-6) as one process with the same global batch and seed."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from lofit_lens import distributed
from lofit_lens.objectives import build_objective
from lofit_lens.tasks.base import PreferenceExample, SFTExample

TESTS = Path(__file__).resolve().parent
SETTINGS = dict(k=3, epochs_select=2, epochs_bias=2, max_train_examples=21, max_val_examples=8,
                batch_size=4, lr_select=5e-2, lr_bias=5e-2, l1_lambda=1e-3, max_grad_norm=1.0,
                eval_splits=())
"""21 rows in batches of 4: the last global batch has one row, so rank 1 gets an empty
shard; prompts and answers of different lengths give shards of unequal token counts."""


# ---------------------------------------------------------------------- sharding
def test_shard_covers_the_batch_in_order():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = [distributed.shard(range(n), r, world) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_single_process_is_not_distributed():
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    assert not distributed.init_from_env() or distributed.launched()


def _sft(model, n=7):
    rows = [SFTExample(f"{'ab' * (i % 3 + 1)}:", "c" * (i % 4 + 1) + ".") for i in range(n)]
    return build_objective(model, rows, 0.1, "official")


def _dpo(model, n=7):
    rows = [PreferenceExample(f"{'xy' * (i % 3 + 1)}?", " yes" * (i % 2 + 1), " no")
            for i in range(n)]
    return build_objective(model, rows, 0.1, "clean")


def _grad(model, intervention, objective, indices, weight=None):
    intervention.zero_grad(set_to_none=True)
    with intervention.attach(model):
        loss = objective.loss(model, indices)
        (loss * (1.0 if weight is None else weight)).backward()
    return intervention.bias.grad.clone()


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_weighted_shards_sum_to_the_full_batch_gradient(tiny_model, kind):
    """What the all-reduce sums, computed here shard by shard in one process."""
    from lofit_lens.intervention import HeadIntervention

    objective = (_sft if kind == "sft" else _dpo)(tiny_model)
    iv = HeadIntervention.for_model(tiny_model, use_scale=False).set_heads(None)
    iv.init_normal(0.1, torch.Generator().manual_seed(0))
    batch = [6, 1, 3, 0, 5]
    full = _grad(tiny_model, iv, objective, batch)
    total = distributed.loss_weight(objective, batch)
    expected = sum(len(objective.pairs[i][1]) for i in batch) if kind == "sft" else len(batch)
    assert total == expected
    for world in (2, 3):
        summed = torch.zeros_like(full)
        for rank in range(world):
            mine = distributed.shard(batch, rank, world)
            summed += _grad(tiny_model, iv, objective, mine,
                            distributed.loss_weight(objective, mine) / total)
        torch.testing.assert_close(summed, full, atol=1e-7, rtol=1e-5)
        if kind == "sft":  # unweighted (a plain mean of shard means) would differ
            plain = sum(_grad(tiny_model, iv, objective, distributed.shard(batch, r, world)) / world
                        for r in range(world))
            assert (plain - full).abs().max() > 1e-5


# ---------------------------------------------------------------------- two processes
def _tiny(folder: Path):
    """The conftest's tiny Llama (same seed: same weights) as a bridge, and a task file."""
    import json

    sys.path.insert(0, str(TESTS))
    from conftest import _reverse_rows, char_tokenizer, tiny_llama
    from lofit_lens.backends.hf import finish
    from lofit_lens.backends.tl3 import (
        _convert_with_hf_config, _hooked_transformer_class, use_hooked_transformer,
    )

    if (folder / "tok").exists():  # written once by the parent: two ranks writing it race
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder / "tok")
    else:
        tok = char_tokenizer(folder / "tok")
    hf = tiny_llama(tok)
    if use_hooked_transformer():
        model = _convert_with_hf_config(_hooked_transformer_class(), hf, tok, "cpu",
                                        torch.float32, prepend_bos=False)
    else:
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tok,
                                                    device="cpu", dtype=torch.float32)
    model.cfg.default_prepend_bos = False
    model = finish(model, "tiny-llama", tok)
    task = folder / "reverse.jsonl"
    if not task.exists():
        rows = _reverse_rows(40)
        for i, row in enumerate(rows):
            row["split"] = "train" if i < 24 else ("val" if i < 32 else "test")
        task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, task


def _train(model, task) -> dict:
    from lofit_lens.training import select_heads, tune_biases

    selection = select_heads(model, str(task), progress=False, **SETTINGS)
    heads = selection.top(SETTINGS["k"])
    tuning = tune_biases(model, str(task), heads, progress=False, **SETTINGS)
    return {"scores": selection.scores, "heads": heads, "bias": tuning.bias,
            "select_loss": selection.history.step_loss, "tune_loss": tuning.history.step_loss,
            "val_loss": tuning.history.val_loss}


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, task = _tiny(Path(folder))
        out = _train(model, task)
        if distributed.is_main():
            torch.save(out, Path(folder) / "ddp.pt")
    except BaseException:
        distributed.shutdown(finished=False)
        raise
    distributed.shutdown()  # every rank waits for the others before leaving


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.tl3
def test_two_processes_learn_what_one_process_learns(tmp_path):
    import torch.multiprocessing as mp

    model, task = _tiny(tmp_path)  # the task file first, so both workers read it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _train(model, task)
    finally:
        torch.set_num_threads(threads)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    assert ddp["heads"] == single["heads"]
    torch.testing.assert_close(ddp["scores"], single["scores"], atol=1e-6, rtol=0)
    torch.testing.assert_close(ddp["bias"], single["bias"], atol=1e-6, rtol=0)
    assert ddp["bias"].abs().max() > 1e-3  # v moved: the comparison is not of two inits
    for key in ("select_loss", "tune_loss", "val_loss"):
        assert len(ddp[key]) == len(single[key])
        assert max(abs(a - b) for a, b in zip(ddp[key], single[key])) < 1e-5, key


# ---------------------------------------------------------------------- models split by device_map
def test_each_layer_meets_hook_z_on_its_device():
    """A layer's A and v are sent to the device of that layer's hook_z (here the meta device:
    the one device besides the CPU a CPU machine has), in its dtype."""
    from lofit_lens.intervention import HeadIntervention

    iv = HeadIntervention((3, 4, 8), use_scale=True).set_heads([(1, 2)])
    for device, dtype in (("meta", torch.float32), ("meta", torch.bfloat16), ("cpu", torch.bfloat16)):
        z = torch.zeros(2, 5, 4, 8, device=device, dtype=dtype)
        out = iv.edit(z, layer=1)
        assert out.device == z.device and out.dtype == dtype
    assert iv.bias.device.type == "cpu" and iv.bias.dtype == torch.float32


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    sys.path.insert(0, str(TESTS))
    from conftest import char_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("tiny-hf")
    tiny_llama(char_tokenizer(folder)).save_pretrained(folder)
    return folder


EVERY_MODULE = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(3)},
                "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("placement", ["every module named", "layer 1 offloaded to disk"])
def test_a_device_mapped_model_trains_and_evaluates_as_the_plain_one(hf_folder, tmp_path,
                                                                     placement, tiny_task_file):
    """``load_model(device_map=...)`` through accelerate's big-model loading under the bridge.
    A map naming every module goes through the same path as a multi-GPU split; with one layer
    on "disk", accelerate dispatches the model with its hooks (``hf_device_map``; that layer's
    weights live on the meta device between forwards), as it does across GPUs."""
    from lofit_lens import load_model
    from lofit_lens.eval.evaluate import evaluate
    from lofit_lens.intervention import HeadIntervention
    from lofit_lens.tasks import get_task
    from lofit_lens.training import tune_biases

    plain = load_model(str(hf_folder), device="cpu")
    device_map = dict(EVERY_MODULE)
    if placement.startswith("layer 1"):
        device_map["model.layers.1"] = "disk"
    split = load_model(str(hf_folder), device_map=device_map, offload_folder=tmp_path / "offload")
    if placement.startswith("layer 1"):
        assert split.original_model.hf_device_map["model.layers.1"] == "disk"
        assert any(p.device.type == "meta" for p in split.original_model.model.layers[1].parameters())
    assert split.lofit_loader.keywords["device_map"] == device_map
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(split(tokens), plain(tokens), atol=1e-6, rtol=0)

    seen = []
    original_edit = HeadIntervention.edit

    def spy(self, z, layer):
        out = original_edit(self, z, layer)
        seen.append((layer, z.device, out.device))
        return out

    task = get_task(str(tiny_task_file))
    settings = dict(epochs_bias=1, batch_size=4, max_train_examples=8, max_val_examples=2,
                    lr_bias=5e-2, progress=False)
    heads = [(1, 2), (2, 3), (2, 0)]  # none in layer 0: the frozen-prefix cache is used
    a = tune_biases(plain, task, heads, **settings)
    HeadIntervention.edit = spy
    try:
        b = tune_biases(split, task, heads, **settings)
    finally:
        HeadIntervention.edit = original_edit
    assert {layer for layer, _, _ in seen} == {1, 2}
    assert all(z == out for _, z, out in seen)
    assert a.history.frozen_prefix_layer == b.history.frozen_prefix_layer == 1
    torch.testing.assert_close(b.bias, a.bias, atol=1e-6, rtol=0)
    assert a.bias.abs().max() > 1e-3
    examples = task.eval_examples("test", 2)
    ma, pa = evaluate(plain, task, examples, a.intervention, progress=False)
    mb, pb = evaluate(split, task, examples, b.intervention, progress=False)
    assert ma == mb and [r["prediction"] for r in pa] == [r["prediction"] for r in pb]


def test_device_map_and_device_exclude_each_other(hf_folder):
    from lofit_lens import load_model

    with pytest.raises(ValueError, match="exclude each other"):
        load_model(str(hf_folder), device="cpu", device_map=EVERY_MODULE)


# ---------------------------------------------------------------------- README figures
def _measured(command: list[str], env: dict) -> dict:
    """Wall time and peak memory (RSS summed over the process tree, Ray's processes included)
    of ``command``."""
    import subprocess
    import threading
    import time

    psutil = pytest.importorskip("psutil")
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak, done = [0], threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    done.set()
    thread.join()
    assert proc.returncode == 0, output[-3000:]
    return {"seconds": round(time.perf_counter() - start, 1), "peak_mib": round(peak[0] / 2**20)}


SWEEP = """
import sys, json, torch, lofit_lens as ll
model = ll.load_model("smollm2-135m", device="cpu")
frame = ll.k_sweep(model, "clutrr", [0.03, 0.1], cache_dir=sys.argv[2], progress=False,
                   executor=sys.argv[1], max_train_examples=16, epochs_select=1, epochs_bias=1,
                   max_eval_examples=8, max_val_examples=0)
print(json.dumps(frame[["method", "k", "accuracy"]].to_dict("records")))
"""


@pytest.mark.benchmark
def test_measure_modes(tmp_path, data_dir):
    """The README's figures, in one run on this machine: the main job (SmolLM2, CLUTRR, 16
    training / 8 test examples) in one process and in two (``--num-processes 2``, gloo), and
    a two-cell ``k_sweep`` (plus its selection and zero-shot cells) local and on a local Ray
    instance of 2 CPUs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    job = [sys.executable, "-m", "lofit_lens.cli", "run", "--task", "clutrr", "--model",
           "smollm2-135m", "--max-train-examples", "16", "--epochs", "1", "2",
           "--max-eval-examples", "8", "--max-val-examples", "0", "--quiet", "--overwrite"]
    figures = {
        "one process": _measured(job + ["--out", str(tmp_path / "one")], env),
        "two processes": _measured(job + ["--out", str(tmp_path / "two"), "--num-processes", "2"], env),
        "sweep local": _measured([sys.executable, "-c", SWEEP, "local", str(tmp_path / "cl")], env),
        "sweep ray": _measured([sys.executable, "-c", SWEEP, "ray", str(tmp_path / "cr")], env),
    }
    import lofit_lens as ll

    one, two = (ll.LoFiTResult.load(tmp_path / d) for d in ("one", "two"))
    assert one.selected_heads == two.selected_heads
    figures["two processes: v max |diff| vs one"] = float((one.bias - two.bias).abs().max())
    for a, b in (("two processes", "one process"), ("sweep ray", "sweep local")):
        figures[f"{a} / {b}"] = {k: round(figures[a][k] / figures[b][k], 2)
                                 for k in ("seconds", "peak_mib")}
    print(json.dumps(figures, indent=1))


@pytest.mark.slow
def test_cli_num_processes_matches_one_process(hf_folder, tiny_task_file, tmp_path, monkeypatch):
    """``lofit-lens run --num-processes 2`` (torchrun, gloo) writes one result, from rank 0,
    equal to one process's (v atol 1e-6); a rerun resumes from rank 0's checkpoint."""
    from lofit_lens.cli import main
    from lofit_lens.result import LoFiTResult

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    args = ["run", "--task", str(tiny_task_file), "--model", str(hf_folder), "--k", "3",
            "--epochs", "1", "2", "--batch-size", "4", "--max-train-examples", "12",
            "--max-eval-examples", "2", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "one"), "--device", "cpu"]) == 0
    assert main(args + ["--out", str(tmp_path / "two"), "--num-processes", "2"]) == 0
    one, two = LoFiTResult.load(tmp_path / "one"), LoFiTResult.load(tmp_path / "two")
    assert one.selected_heads == two.selected_heads
    torch.testing.assert_close(two.bias, one.bias, atol=1e-6, rtol=0)
    phases = sorted(p.name.split("-")[0] for p in (tmp_path / "two" / "checkpoint").glob("*.json"))
    assert phases == ["evaluate", "evaluate", "select", "tune"]  # rank 0's only: one per phase
    assert main(args + ["--out", str(tmp_path / "two"), "--num-processes", "2"]) == 0  # resumes
