"""LoRA (Hu et al. 2022) on W_Q and W_V of every layer, applied through TransformerLens hooks.

``q <- q + dropout(x) @ A_q^T @ B_q^T * alpha / r`` (same for v), with ``x`` the attention
input (``blocks.{l}.ln1.hook_out`` on a bridge, ``ln1.hook_normalized`` on a 3.x
HookedTransformer) and the sum added at ``blocks.{l}.attn.hook_q`` / ``hook_v`` (before
rotary, as HF's ``q_proj``/``v_proj`` outputs). A ~ kaiming-uniform, B = 0 (peft's init).

Why hooks and not peft: the bridge replaces HF's ``q_proj``/``v_proj`` by its own
``LinearBridge`` modules, so peft would wrap TransformerLens internals and modify the model
in place (needing an exact unload afterwards). On hooks, LoRA is one more module that
``attach``es like ``HeadIntervention``, trains in LoFiT's own loop, leaves the model's weights
untouched by construction and works on TL 3.x as well. Parameters per layer:
``r * (d_model + n_heads * d_head)`` for Q plus ``r * (d_model + n_kv_heads * d_head)`` for V
(V is smaller under GQA).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, NamedTuple

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from lofit_lens.config import LoFiTConfig
from lofit_lens.backends.hooked import attached_hooks, model_device, uses_bridge
from lofit_lens.errors import ModelMismatchError
from lofit_lens.intervention import register_intervention
from lofit_lens.methods.base import Method, MethodOptions, MethodRun, RunContext, register_method
from lofit_lens.tasks.base import Task
from lofit_lens.history import TrainingHistory
from lofit_lens.training import TrainingSet, train_intervention


class LoRADims(NamedTuple):
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int


def lora_dims(model) -> LoRADims:
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    return LoRADims(int(cfg.n_layers), int(cfg.d_model), int(cfg.n_heads), int(n_kv), int(cfg.d_head))


@register_intervention
class LoRA(nn.Module):
    """Low-rank updates of W_Q and W_V on all layers; the model's weights never change."""

    kind: ClassVar[str] = "lora"

    def __init__(self, dims: LoRADims, rank: int = 8, alpha: float = 8.0, dropout: float = 0.1,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.dims = LoRADims(*dims)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.dropout = dropout
        n, d = self.dims.n_layers, self.dims.d_model
        bound = 1 / math.sqrt(d)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft
        self.q_a = nn.Parameter((torch.rand(n, rank, d, generator=generator) * 2 - 1) * bound)
        self.v_a = nn.Parameter((torch.rand(n, rank, d, generator=generator) * 2 - 1) * bound)
        self.q_b = nn.Parameter(torch.zeros(n, self.dims.n_heads * self.dims.d_head, rank))
        self.v_b = nn.Parameter(torch.zeros(n, self.dims.n_kv_heads * self.dims.d_head, rank))

    @classmethod
    def for_model(cls, model, **kwargs) -> "LoRA":
        return cls(lora_dims(model), **kwargs)

    def trainable(self) -> list[nn.Parameter]:
        return [self.q_a, self.q_b, self.v_a, self.v_b]

    def l1_parameters(self) -> list[nn.Parameter]:
        return []

    def first_layer(self) -> int:
        return 0  # W_Q and W_V of every layer

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable())

    def spec(self) -> dict[str, Any]:
        return {"dims": list(self.dims), "rank": self.rank, "alpha": self.alpha,
                "dropout": self.dropout}

    def state_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).detach() for name in ("q_a", "q_b", "v_a", "v_b")}

    @classmethod
    def from_saved(cls, spec: dict[str, Any], tensors: dict[str, Tensor]) -> "LoRA":
        module = cls(LoRADims(*spec["dims"]), spec["rank"], spec["alpha"], spec["dropout"])
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(module, name).copy_(value)
        return module.eval()

    def delta(self, x: Float[Tensor, "batch pos d_model"], a: Float[Tensor, "rank d_model"],
              b: Float[Tensor, "d_out rank"]) -> Float[Tensor, "batch pos head d_head"]:
        x = F.dropout(x.to(a.dtype), self.dropout, training=self.training)
        low = einops.einsum(x, a, "batch pos d_model, rank d_model -> batch pos rank")
        out = einops.einsum(low, b, "batch pos rank, d_out rank -> batch pos d_out") * self.scaling
        return einops.rearrange(out, "batch pos (head d_head) -> batch pos head d_head",
                                d_head=self.dims.d_head)

    def hooks(self, input_hook: str) -> list[tuple[str, Callable]]:
        """Per layer: capture the attention input, add the Q and V updates."""
        box: dict[int, Tensor] = {}

        def capture(x: Tensor, hook, layer: int) -> None:
            box[layer] = x

        def add(t: Float[Tensor, "batch pos head d_head"], hook, layer: int, which: str) -> Tensor:
            a, b = (self.q_a, self.q_b) if which == "q" else (self.v_a, self.v_b)
            x = box[layer]  # this layer's device under a device_map: the slices meet it there
            return t + self.delta(x, a[layer].to(x.device), b[layer].to(x.device)).to(t.device, t.dtype)

        hooks: list[tuple[str, Callable]] = []
        for layer in range(self.dims.n_layers):
            hooks += [(f"blocks.{layer}.{input_hook}", functools.partial(capture, layer=layer)),
                      (f"blocks.{layer}.attn.hook_q", functools.partial(add, layer=layer, which="q")),
                      (f"blocks.{layer}.attn.hook_v", functools.partial(add, layer=layer, which="v"))]
        return hooks

    @contextlib.contextmanager
    def attach(self, model) -> Iterator["LoRA"]:
        """Apply LoRA to ``model`` inside the ``with`` body (hooks removed after)."""
        if lora_dims(model) != self.dims:
            raise ModelMismatchError(f"LoRA built for {self.dims}, model has {lora_dims(model)}: "
                                     "apply it to a model of that shape (the one it "
                                     "was trained on)")
        self.to(model_device(model))  # the input device; each layer's slices go to its own
        input_hook = "ln1.hook_out" if uses_bridge(model) else "ln1.hook_normalized"
        with attached_hooks(model, self.hooks(input_hook)):
            yield self


def train_lora(model, task: Task, cfg: LoFiTConfig, *, rank: int, alpha: float, dropout: float,
               lr: float, progress: bool = True) -> tuple[LoRA, TrainingHistory]:
    """LoRA trained on the run's data in LoFiT's loop (``cfg.epochs_bias`` epochs, AdamW,
    linear decay); dropout is on during training only."""
    data = TrainingSet.build(model, task, cfg)
    lora = LoRA.for_model(model, rank=rank, alpha=alpha, dropout=dropout,
                          generator=torch.Generator().manual_seed(cfg.seed))
    history = train_intervention(
        model, lora, data.train, data.val, epochs=cfg.epochs_bias, lr=lr, l1_lambda=0.0,
        batch_size=cfg.batch_size, seed=cfg.seed + 1, weight_decay=cfg.weight_decay,
        adam_eps=cfg.adam_eps, desc="LoRA", progress=progress)
    return lora, history


@dataclass(frozen=True)
class LoRAOptions(MethodOptions):
    """LoRA's settings (``compare(lora_rank=...)``, ``--lora-rank``)."""

    rank: int = field(default=8, metadata={"help": "rank r of the W_Q and W_V updates"})
    alpha: float = field(default=8.0, metadata={"help": "scaling: the update is multiplied by alpha / r"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the adapter's input, in training only"})
    lr: float = field(default=5e-4, metadata={"help": "learning rate (epochs: the run's epochs_bias)"})


def run_lora(ctx: RunContext, options: LoRAOptions) -> MethodRun:
    """LoRA on W_Q and W_V of every layer, trained in LoFiT's loop."""
    adapter, _ = train_lora(ctx.model, ctx.task, ctx.cfg, rank=options.rank, alpha=options.alpha,
                            dropout=options.dropout, lr=options.lr, progress=ctx.progress)
    return MethodRun(adapter, adapter.num_trainable_parameters())


register_method(Method("lora", run_lora, LoRAOptions))
