"""LoReFT (Wu et al. 2024, "ReFT: Representation Finetuning for Language Models"; pyreft's
``LoreftIntervention``) on TransformerLens hooks: at ``blocks.{l}.hook_resid_post`` of the
chosen layers, at the LAST PROMPT POSITION of each sequence::

    h <- h + R^T (W h + b - R h)

with ``R`` (``rank x d_model``) of orthonormal rows, ``W`` (``rank x d_model``) and ``b``
(``rank``) learned per layer. ``R = Q^T`` where ``Q`` is the orthonormal factor of the QR
decomposition of a free ``d_model x rank`` matrix (initialised orthogonal, as pyreft's
``torch.nn.init.orthogonal_``); ``W`` and ``b`` start as ``nn.Linear(d_model, rank)`` does
(U(+-1/sqrt(d_model))), so the edit is not the identity at initialisation, as in pyreft.
pyreft applies its dropout to the whole edited output; here there is none.

Parameters per layer: ``rank * d_model`` (R) + ``rank * d_model`` (W) + ``rank`` (b).

Where the last prompt position is, in each forward (no change to the trainer or the
evaluators is needed):

- training: ``train_reft`` wraps the objectives in ``PromptEndObjective``, which publishes
  each row's last prompt index (rows are right-padded ``prompt + answer``) around every
  forward it runs (``prompt_ends``, a ``ContextVar`` like ``lofit_lens.eval.positions``);
- multiple-choice scoring over full sequences (right-padded, ``lofit_lens.eval.positions``
  publishes the answer positions): the position just before each row's first answer token;
- everything else: a forward that starts a sequence (no KV cache yet) edits its last
  position, which is every row's last prompt token in a left-padded generation prefill and
  in MC scoring's prompt pass; a forward that continues a KV cache (decoding steps, the
  answer pass of shared-prefix MC scoring) edits nothing, its prompt already having been
  edited in the cache. The cache length is read by a forward pre-hook on the HF model the
  bridge wraps (TL 3.x: on the HookedTransformer, its ``past_kv_cache``).

Why not pyreft itself: it pins transformers 4.45.1 (this project runs 5.x) and intervenes
through pyvene's wrappers of the HF model, not through TransformerLens hook points, so it
would edit a different object from the one every other method here edits; its LoReFT is a
dozen lines, reimplemented (not copied) here and checked against the formula in the tests.
"""

from __future__ import annotations

import contextlib
import functools
import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, NamedTuple, Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from lofit_lens.backends.hooked import attached_hooks, model_device, uses_bridge
from lofit_lens.config import LoFiTConfig
from lofit_lens.errors import ModelMismatchError
from lofit_lens.eval.positions import current_answer_index, position_dependent_edit
from lofit_lens.history import TrainingHistory
from lofit_lens.intervention import register_intervention
from lofit_lens.methods.base import Method, MethodOptions, MethodRun, RunContext, register_method
from lofit_lens.methods.jola import DelegatingObjective
from lofit_lens.tasks.base import Task
from lofit_lens.training import TrainingSet, train_intervention


class ResidualDims(NamedTuple):
    n_layers: int
    d_model: int


def residual_dims(model) -> ResidualDims:
    return ResidualDims(int(model.cfg.n_layers), int(model.cfg.d_model))


def resid_post_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


# ---------------------------------------------------------------------- positions
_PROMPT_ENDS: ContextVar[Optional[Tensor]] = ContextVar("prompt_ends", default=None)


@contextlib.contextmanager
def prompt_ends(last: Int[Tensor, " batch"]) -> Iterator[None]:
    """Publish each row's last prompt index for the forwards inside."""
    token = _PROMPT_ENDS.set(last)
    try:
        yield
    finally:
        _PROMPT_ENDS.reset(token)


def _cache_length(kwargs: dict[str, Any]) -> int:
    """How many positions the KV cache handed to a forward already holds (0: none)."""
    for key in ("past_key_values", "cache"):
        past = kwargs.get(key)
        if past is not None and hasattr(past, "get_seq_length"):
            return int(past.get_seq_length())
    past = kwargs.get("past_kv_cache")  # TL 3.x HookedTransformer
    if past is not None:
        try:
            return int(past[0].past_keys.shape[1])
        except (AttributeError, IndexError, TypeError):
            return 0
    return 0


def edit_positions(batch: int, width: int, device: torch.device,
                   cache_length: int) -> tuple[Int[Tensor, " batch"], Float[Tensor, " batch"]]:
    """(position, 1.0 or 0.0) per row: where this forward's last prompt token is, and
    whether the row is edited at all (see the module docstring for the rules)."""
    rows = torch.arange(batch, device=device)
    published = _PROMPT_ENDS.get()
    if published is not None:
        if tuple(published.shape) != (batch,):
            raise RuntimeError(f"{batch} rows in this forward, {len(published)} prompt ends published")
        last = published.to(device)
        return last, (last < width).float()
    index = current_answer_index()
    if index is not None and tuple(index.shape) == (batch, width) and bool((index >= 0).any()):
        first = (index.to(device) == 0).float().argmax(dim=1)  # each row's first answer token
        has = (index.to(device) == 0).any(dim=1) & (first > 0)
        return (first - 1).clamp(min=0), has.float()
    if cache_length > 0:
        return torch.zeros_like(rows), torch.zeros(batch, device=device)
    return torch.full_like(rows, width - 1), torch.ones(batch, device=device)


# ---------------------------------------------------------------------- the intervention
@register_intervention
class LoReFT(nn.Module):
    """LoReFT on the residual stream of ``layers`` at the last prompt position."""

    kind: ClassVar[str] = "loreft"

    def __init__(self, dims: ResidualDims, layers: Sequence[int], rank: int = 4,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.dims = ResidualDims(*dims)
        self.layers = sorted({int(l) for l in layers})
        if not self.layers or not all(0 <= l < self.dims.n_layers for l in self.layers):
            raise ValueError(f"ReFT layers {list(layers)} outside the model's {self.dims.n_layers} layers")
        if not 1 <= rank <= self.dims.d_model:
            raise ValueError(f"ReFT rank {rank} must be in [1, d_model={self.dims.d_model}]")
        self.rank = rank
        n, d = len(self.layers), self.dims.d_model
        basis = torch.stack([_orthogonal(d, rank, generator) for _ in range(n)])
        bound = 1 / math.sqrt(d)
        self.rotation = nn.Parameter(basis)  # [n, d, rank]; R = qr(rotation).Q^T
        self.weight = nn.Parameter((torch.rand(n, rank, d, generator=generator) * 2 - 1) * bound)
        self.source_bias = nn.Parameter((torch.rand(n, rank, generator=generator) * 2 - 1) * bound)
        self._cache_length = 0

    @classmethod
    def for_model(cls, model, layers: Optional[Sequence[int]] = None, **kwargs) -> "LoReFT":
        dims = residual_dims(model)
        return cls(dims, range(dims.n_layers) if layers is None else layers, **kwargs)

    # ------------------------------------------------------------------ the protocol
    def trainable(self) -> list[nn.Parameter]:
        return [self.rotation, self.weight, self.source_bias]

    def l1_parameters(self) -> list[nn.Parameter]:
        return []

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable())

    def first_layer(self) -> int:
        return self.layers[0]  # blocks.{l}.hook_resid_post: the residual entering l is untouched

    def spec(self) -> dict[str, Any]:
        return {"dims": list(self.dims), "layers": self.layers, "rank": self.rank}

    def state_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).detach() for name in ("rotation", "weight", "source_bias")}

    @classmethod
    def from_saved(cls, spec: dict[str, Any], tensors: dict[str, Tensor]) -> "LoReFT":
        module = cls(ResidualDims(*spec["dims"]), spec["layers"], spec["rank"])
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(module, name).copy_(value)
        return module.eval()

    # ------------------------------------------------------------------ applying
    def projection(self, i: int) -> Float[Tensor, "rank d_model"]:
        """R of the ``i``-th edited layer: orthonormal rows."""
        q, _ = torch.linalg.qr(self.rotation[i])
        return q.T

    def edit(self, h: Float[Tensor, "batch d_model"], i: int) -> Float[Tensor, "batch d_model"]:
        """``h + R^T (W h + b - R h)`` for the ``i``-th edited layer (fp32)."""
        r = self.projection(i)
        x = h.float()
        low = x @ self.weight[i].T + self.source_bias[i] - x @ r.T  # [batch, rank]
        return x + low @ r

    def hooks(self) -> list[tuple[str, Callable]]:
        def hook_fn(resid: Float[Tensor, "batch pos d_model"], hook, i: int) -> Tensor:
            batch, width = resid.shape[:2]
            pos, on = edit_positions(batch, width, resid.device, self._cache_length)
            if not bool(on.any()):
                return resid
            rows = torch.arange(batch, device=resid.device)
            pos = pos.clamp(max=width - 1)
            picked = resid[rows, pos]  # [batch, d_model]
            delta = (self.edit(picked, i) - picked.float()) * on[:, None]
            at = torch.zeros(batch, width, device=resid.device, dtype=delta.dtype)
            at[rows, pos] = 1.0
            return resid + (at[..., None] * delta[:, None, :]).to(resid.dtype)

        return [(resid_post_name(layer), functools.partial(hook_fn, i=i))
                for i, layer in enumerate(self.layers)]

    @contextlib.contextmanager
    def attach(self, model) -> Iterator["LoReFT"]:
        """Apply LoReFT to ``model`` inside the ``with`` body (hooks removed after)."""
        if residual_dims(model) != self.dims:
            raise ModelMismatchError(f"ReFT built for {self.dims}, model has {residual_dims(model)}: "
                                     "apply it to a model of that shape (the one it "
                                     "was trained on)")
        self.to(model_device(model))
        top = model.original_model if uses_bridge(model) else model

        def before(module, args, kwargs):
            self._cache_length = _cache_length(kwargs)

        def after(module, args, kwargs, output):
            self._cache_length = 0

        handles = [top.register_forward_pre_hook(before, with_kwargs=True),
                   top.register_forward_hook(after, with_kwargs=True)]
        try:  # it edits a prompt's last token: prompts run whole, never split at a shared start
            with position_dependent_edit(), attached_hooks(model, self.hooks()):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self._cache_length = 0


def _orthogonal(d: int, rank: int, generator: Optional[torch.Generator]) -> Tensor:
    """A ``d x rank`` matrix with orthonormal columns (the Q of a Gaussian's QR, signs fixed
    by R's diagonal, i.e. Haar-distributed, as ``torch.nn.init.orthogonal_``)."""
    q, r = torch.linalg.qr(torch.randn(d, rank, generator=generator))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(rank))


# ---------------------------------------------------------------------- training
class PromptEndObjective(DelegatingObjective):
    """An SFT or DPO objective whose forwards publish each row's last prompt index."""

    def _ends(self, indices: Sequence[int]) -> Tensor:
        inner = self.inner
        if hasattr(inner, "chosen"):  # DPO: a forward holds the chosen rows, then the rejected
            pairs = [inner.chosen[i] for i in indices] + [inner.rejected[i] for i in indices]
        else:
            pairs = [inner.pairs[i] for i in indices]
        return torch.tensor([len(prompt) - 1 for prompt, _ in pairs])

    def loss(self, model, indices: Sequence[int]) -> Tensor:
        with prompt_ends(self._ends(list(indices))):
            return self.inner.loss(model, indices)

    def check_value(self, model, indices: Sequence[int]) -> Tensor:
        with prompt_ends(self._ends(list(indices))):
            return self.inner.check_value(model, indices)

    @torch.no_grad()
    def compute_reference(self, model) -> None:
        """The DPO reference log-probs with the prompt ends published (as ``DPOObjective``'s
        own, batch by batch)."""
        inner, size = self.inner, self.inner.ref_batch_size
        parts = []
        for start in range(0, len(inner), size):
            rows = list(range(start, min(start + size, len(inner))))
            with prompt_ends(self._ends(rows)):
                parts.append(inner._logprobs(model, rows))
        inner.reference = torch.cat(parts) if parts else torch.zeros(0, 2)


def train_reft(model, task: Task, cfg: LoFiTConfig, *, rank: int, layers: Optional[Sequence[int]],
               lr: float, progress: bool = True,
               data: Optional[TrainingSet] = None) -> tuple[LoReFT, TrainingHistory]:
    """LoReFT trained on the run's data in LoFiT's loop (``cfg.epochs_bias`` epochs, AdamW,
    linear decay, no penalty)."""
    data = data or TrainingSet.build(model, task, cfg)
    reft = LoReFT.for_model(model, layers, rank=rank,
                            generator=torch.Generator().manual_seed(cfg.seed))
    train = PromptEndObjective(data.train)
    val = PromptEndObjective(data.val) if data.val is not None else None
    history = train_intervention(
        model, reft, train, val, epochs=cfg.epochs_bias, lr=lr, l1_lambda=0.0,
        batch_size=cfg.batch_size, seed=cfg.seed + 1, weight_decay=cfg.weight_decay,
        adam_eps=cfg.adam_eps, max_grad_norm=cfg.max_grad_norm,
        prefix_budget_mb=cfg.prefix_cache_mb, desc="ReFT", progress=progress)
    history.data_hash, history.n_train = data.data_hash, len(data.train)
    history.trainable_parameters = reft.num_trainable_parameters()
    return reft, history


@dataclass(frozen=True)
class ReFTOptions(MethodOptions):
    """LoReFT's settings (``compare(reft_rank=...)``, ``--reft-rank``)."""

    rank: int = field(default=4, metadata={"help": "rank of R and W per edited layer"})
    layers: Optional[tuple[int, ...]] = field(default=None, metadata={
        "help": "the layers whose residual stream is edited (default: all)"})
    lr: float = field(default=4e-3, metadata={"help": "learning rate (epochs: the run's epochs_bias)"})


def run_reft(ctx: RunContext, options: ReFTOptions) -> MethodRun:
    """LoReFT on the residual stream at the last prompt position."""
    module, _ = train_reft(ctx.model, ctx.task, ctx.cfg, rank=options.rank, layers=options.layers,
                           lr=options.lr, progress=ctx.progress)
    return MethodRun(module, module.num_trainable_parameters(), None,
                     {"layers": module.layers, "rank": module.rank})


register_method(Method("reft", run_reft, ReFTOptions))
