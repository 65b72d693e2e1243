"""Interventions: what trains (or is fixed) at hook points while the model's weights never change.

``Intervention`` is the protocol every method's intervention satisfies (LoFiT's
``HeadIntervention``, ITI's shift, LoRA): its trainable parameters, which of them carry the
L1 penalty, ``attach`` and its saved form. ``INTERVENTIONS`` maps each ``kind`` to its class so
a saved intervention reloads (``lofit_lens.store``).

``HeadIntervention``: ``z[l, h] <- z[l, h] * (1 + A[l, h]) + v[l, h]`` for the active heads
at ``blocks.{l}.attn.hook_z``, at every position. Its parameters live in the module (fp32),
never in the model.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ClassVar, ContextManager, Iterable, Iterator, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from lofit_lens.backends.hooked import (
    ModelDims, attached_hooks, hook_z_name, model_device, model_dims,
)
from lofit_lens.eval.positions import position_dependent_edit
from lofit_lens.errors import ModelMismatchError

Head = tuple[int, int]


@runtime_checkable
class Intervention(Protocol):
    """What the trainer, the evaluator and the store need of an intervention."""

    kind: ClassVar[str]
    """Registry name (``INTERVENTIONS``), written into saved cards."""

    def trainable(self) -> list[nn.Parameter]:
        """The parameters an optimiser updates."""

    def l1_parameters(self) -> list[nn.Parameter]:
        """The tensors whose absolute sum the L1 term penalises (LoFiT step 1: A)."""

    def num_trainable_parameters(self) -> int:
        """Parameters that actually train (masked entries excluded)."""

    def attach(self, model) -> ContextManager[Any]:
        """Apply to ``model`` inside a ``with`` body; hooks removed after, also on error. An
        edit that acts at chosen positions (a prompt's last token, answer tokens) enters
        ``eval.positions.position_dependent_edit()`` there, so that generation and MC scoring
        run each prompt whole (a batch's shared prompt start run once would move them)."""

    def first_layer(self) -> int:
        """The lowest layer it edits (0 if it may edit the embeddings' output): the frozen
        prefix below it is computed once per training row (``lofit_lens.prefix``)."""

    def spec(self) -> dict[str, Any]:
        """JSON-able constructor settings; with ``state_tensors`` it rebuilds the object."""

    def state_tensors(self) -> dict[str, Tensor]:
        """Every tensor needed to rebuild it (saved as safetensors)."""

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


INTERVENTIONS: dict[str, type] = {}
"""``kind`` -> class with ``from_saved(spec, tensors)``; filled by ``register_intervention``."""


def register_intervention(cls: type) -> type:
    """Class decorator: make ``cls`` (with a ``kind``) reloadable from the store."""
    INTERVENTIONS[cls.kind] = cls
    return cls


def rebuild_intervention(kind: str, spec: dict[str, Any], tensors: dict[str, Tensor]) -> Intervention:
    """The saved intervention of ``kind`` rebuilt from its spec and tensors."""
    if kind not in INTERVENTIONS:
        raise KeyError(f"No intervention kind {kind!r} is registered (known: {', '.join(INTERVENTIONS)}); "
                       "import the module that defines it (e.g. lofit_lens.methods)")
    return INTERVENTIONS[kind].from_saved(spec, tensors)


@register_intervention
class HeadIntervention(nn.Module):
    """Scales A and offsets v, ``[n_layers, n_heads, d_head]`` fp32, plus a head mask.

    Inactive heads are multiplied by zero in the hook, so they receive exactly zero gradient
    and (with weight decay 0) keep their value of zero.
    """

    kind: ClassVar[str] = "head"
    acts_at_chosen_positions: ClassVar[bool] = False
    """Whether ``edit`` acts at chosen positions only (then ``attach`` marks it,
    ``eval.positions.position_dependent_edit``); A and v act at every position."""

    def __init__(self, dims: ModelDims, use_scale: bool = True, use_bias: bool = True):
        super().__init__()
        if not (use_scale or use_bias):
            raise ValueError("An intervention needs a scale, a bias, or both")
        self.dims = ModelDims(*dims)
        shape = (self.dims.n_layers, self.dims.n_heads, self.dims.d_head)
        self.use_scale = use_scale
        self.use_bias = use_bias
        self.scale = nn.Parameter(torch.zeros(shape), requires_grad=use_scale)
        self.bias = nn.Parameter(torch.zeros(shape), requires_grad=use_bias)
        self.register_buffer("head_mask", torch.zeros(shape[:2], dtype=torch.bool))

    # ------------------------------------------------------------------ set-up
    @classmethod
    def for_model(cls, model, **kwargs) -> "HeadIntervention":
        return cls(model_dims(model), **kwargs)

    def set_heads(self, heads: Iterable[Head] | None) -> "HeadIntervention":
        """Activate ``heads`` (``None``: every head) and deactivate the rest."""
        mask = torch.zeros_like(self.head_mask)
        if heads is None:
            mask[:] = True
        else:
            for layer, head in heads:
                if not (0 <= layer < self.dims.n_layers and 0 <= head < self.dims.n_heads):
                    raise ValueError(f"Head L{layer}H{head} is outside the model's {self.dims}")
                mask[layer, head] = True
        self.head_mask.copy_(mask)
        return self

    @torch.no_grad()
    def init_normal(self, std: float, generator: torch.Generator | None = None) -> "HeadIntervention":
        """N(0, std) on the active heads' trainable parameters, zero elsewhere (LoFiT: 1e-3)."""
        keep = self.head_mask[..., None].to(self.scale.dtype)
        for param in self.trainable():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_(noise.to(param.device) * keep)
        return self

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in (self.scale, self.bias) if p.requires_grad]

    def l1_parameters(self) -> list[nn.Parameter]:
        return [self.scale] if self.use_scale else []

    # ------------------------------------------------------------------ saving
    def spec(self) -> dict[str, Any]:
        return {"dims": list(self.dims), "use_scale": self.use_scale, "use_bias": self.use_bias}

    def state_tensors(self) -> dict[str, Tensor]:
        return {"scale": self.scale.detach(), "bias": self.bias.detach(),
                "head_mask": self.head_mask.float()}

    @classmethod
    def from_saved(cls, spec: dict[str, Any], tensors: dict[str, Tensor]) -> "HeadIntervention":
        extra = {k: v for k, v in spec.items() if k not in ("dims", "use_scale", "use_bias")}
        module = cls(ModelDims(*spec["dims"]), use_scale=spec["use_scale"],
                     use_bias=spec["use_bias"], **extra)
        with torch.no_grad():
            module.scale.copy_(tensors["scale"])
            module.bias.copy_(tensors["bias"])
            module.head_mask.copy_(tensors["head_mask"].bool())
        return module

    # ------------------------------------------------------------------ reading
    @property
    def active_heads(self) -> list[Head]:
        return [(int(l), int(h)) for l, h in self.head_mask.nonzero().tolist()]

    @property
    def active_layers(self) -> list[int]:
        return [int(l) for l in self.head_mask.any(dim=1).nonzero().flatten().tolist()]

    def first_layer(self) -> int:
        """The lowest layer it edits: the residual stream entering it is the model's own."""
        return min(self.active_layers, default=0)

    def num_trainable_parameters(self) -> int:
        """Parameters that actually train: active heads x d_head per trainable tensor."""
        return int(self.head_mask.sum()) * self.dims.d_head * len(self.trainable())

    def scale_norms(self) -> Float[Tensor, "layer head"]:
        return self.scale.detach().norm(dim=-1)

    def bias_norms(self) -> Float[Tensor, "layer head"]:
        return self.bias.detach().norm(dim=-1)

    # ------------------------------------------------------------------ applying
    def edit(self, z: Float[Tensor, "batch pos head d_head"], layer: int) -> Float[Tensor, "batch pos head d_head"]:
        """The edited head outputs of ``layer`` (vectorised over heads and positions)."""
        if z.ndim != 4 or tuple(z.shape[-2:]) != (self.dims.n_heads, self.dims.d_head):
            raise ValueError(
                f"blocks.{layer}.attn.hook_z has shape {tuple(z.shape)}; expected "
                f"[batch, pos, {self.dims.n_heads}, {self.dims.d_head}] (per-head outputs). "
                "Is this model's hook_z split per head?"
            )
        # This layer's slice meets hook_z on hook_z's device, in its dtype (a model split by
        # device_map runs each layer on its own device; autograd returns the gradient to the
        # fp32 parameters). A bf16 model gets bf16 offsets; the parameters stay fp32. Each
        # edit is one small tensor op on the parameters and one on z: this runs at every
        # layer of every forward, decoding steps included.
        mask = self.head_mask[layer, :, None]  # [head, 1]
        if self.use_scale:
            factor = (1 + self.scale[layer] * mask).to(z.device, z.dtype)  # [head, d_head]
            z = z * factor  # [batch, pos, head, d_head]
        if self.use_bias:
            offset = (self.bias[layer] * mask).to(z.device, z.dtype)  # [head, d_head]
            z = z + offset  # [batch, pos, head, d_head]
        return z

    def hooks(self) -> list[tuple[str, Callable]]:
        """One hook per layer that has an active head (the layer is bound, not parsed from
        the hook's name: on a bridge, hook_z is an alias of ``attn.o.hook_in``)."""

        def hook_fn(z: Float[Tensor, "batch pos head d_head"], hook, layer: int) -> Tensor:
            return self.edit(z, layer=layer)

        return [(hook_z_name(layer), functools.partial(hook_fn, layer=layer))
                for layer in self.active_layers]

    @contextlib.contextmanager
    def attach(self, model) -> Iterator["HeadIntervention"]:
        """Apply the intervention to ``model`` inside the ``with`` body (hooks removed after,
        also on error; other hooks on the model are left alone)."""
        dims = model_dims(model)
        if dims != self.dims:
            raise ModelMismatchError(f"Intervention built for {self.dims}, model has {dims}: "
                                     "apply it to a model of that shape (the one it "
                                     "was trained on)")
        # The parameters live on the model's input device (cfg.device: the embeddings', also
        # under a device_map), where the optimiser steps; ``edit`` sends each layer's slice
        # to that layer's hook_z device. Not ``next(model.parameters())``: under a
        # device_map that may be any device, or the meta device of an offloaded module.
        device = model_device(model)
        if self.head_mask.device != device:
            self.to(device)
        marked = position_dependent_edit() if self.acts_at_chosen_positions else contextlib.nullcontext()
        with marked, attached_hooks(model, self.hooks()):
            yield self


def top_heads(scores: Float[Tensor, "layer head"], k: int) -> list[Head]:
    """The ``k`` highest-scoring heads, best first (ties broken by position, stably)."""
    n_heads = scores.shape[1]
    order = torch.argsort(scores.flatten(), descending=True, stable=True)[:k]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]
