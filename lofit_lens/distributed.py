"""Data-parallel training: N processes, each with the frozen model and a shard of every batch.

Launch with accelerate (``accelerate launch --num_processes N -m lofit_lens.cli run ...``),
torchrun (``torchrun --nproc-per-node N -m lofit_lens.cli run ...``) or
``lofit-lens run --num-processes N`` (which starts torchrun). Each process reads ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the environment the
launcher sets; ``init_from_env`` joins the process group (NCCL on GPUs, one per process;
gloo on CPUs).

While a process group of more than one process is initialised, ``train_intervention`` runs
data-parallel: every process draws the same global batch (same seed, same shuffle) and
computes the loss on its shard only (``shard``). Both losses are means (SFT: over the
batch's target tokens; DPO: over its pairs), so each shard's loss is weighted by its share
of the global batch (``loss_weight``) and the weighted gradients are summed over the
processes (``all_reduce_gradients``, one collective per step): every process then holds
exactly the single-process gradient of the global batch, clips it and steps the same
optimiser, so the parameters stay identical everywhere (``tests/test_distributed.py``: the
same heads and the same v, atol 1e-6, as one process). Only rank 0 writes results and
checkpoints (``lofit_lens.cli``).
"""

from __future__ import annotations

import datetime
import os
from typing import Sequence

import torch
import torch.distributed as dist

from lofit_lens.objectives import DPOObjective, SFTObjective

TIMEOUT = datetime.timedelta(hours=2)
"""How long a process waits at a collective: rank 0 evaluates alone (zero-shot, before
training) while the others wait at the first step."""


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """Whether a process group of more than one process is initialised (training is then
    data-parallel)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes results, checkpoints and progress."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def process_device() -> str:
    """This process's device: its own GPU (``cuda:LOCAL_RANK``) when there are GPUs, else the CPU."""
    return f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group a launcher described in the environment; ``False`` (and
    nothing done) for a plain single process."""
    if not launched():
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=TIMEOUT)
    return True


def shutdown(finished: bool = True) -> None:
    """Leave the process group. ``finished``: this rank's work ended normally, so first wait
    for every rank (a rank that left while another still ran collectives or saved could
    die in gloo's teardown: "terminate called without an active exception"); after a
    failure, leave at once."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def shard(indices: Sequence[int], rank_: int, world: int) -> list[int]:
    """Process ``rank_``'s contiguous part of a global batch (sizes differ by at most one; a
    batch smaller than the world leaves the last processes empty)."""
    indices = list(indices)
    base, extra = divmod(len(indices), world)
    start = rank_ * base + min(rank_, extra)
    return indices[start:start + base + (rank_ < extra)]


def loss_weight(objective, indices: Sequence[int]) -> int:
    """What ``objective.loss(model, indices)`` averages over: SFT, the target tokens of the
    rows (``sft_loss`` is a mean over continuation tokens); DPO, the pairs. An objective may
    say it itself with a ``loss_weight(indices)`` method; otherwise a mean over rows is
    assumed."""
    own = getattr(objective, "loss_weight", None)
    if callable(own):
        return int(own(indices))
    if isinstance(objective, SFTObjective):
        return sum(len(objective.pairs[i][1]) for i in indices)
    if isinstance(objective, DPOObjective):
        return len(indices)
    return len(indices)


def all_reduce_gradients(params: Sequence[torch.Tensor], loss: torch.Tensor) -> float:
    """Sum every parameter's gradient and ``loss`` (this shard's weighted loss) over the
    processes, in one collective; returns the summed loss (the global batch's). A parameter
    without a gradient (an empty shard) contributes zeros."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    device = grads[0].device if grads else loss.device
    flat = torch.cat([g.detach().reshape(-1).float() for g in grads]
                     + [loss.detach().reshape(1).float().to(device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
    return float(flat[-1])


def all_reduce_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """``values`` summed element-wise over the processes (as they are with one process)."""
    if not is_distributed():
        return list(values)
    if dist.get_backend() == "nccl":
        device = process_device()
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier() -> None:
    if is_distributed():
        dist.barrier()
