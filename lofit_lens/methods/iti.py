"""Inference-time intervention (ITI, Li et al. 2023): a fixed shift ``alpha * sigma * theta``
on the ``hook_z`` of the K heads whose probes (``methods/probes.py``) validate best.

Under the ``official`` protocol on TruthfulQA, as honest_llama (the copy lo-fit bundles) does,
the shift is added on answer tokens only during MC scoring, from the position honest_llama
computes as "context + 4" (the second answer token when "\nA:" is three tokens), and on the
last position of each forward pass during generation; ``clean``: at every position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from lofit_lens.backends.hooked import ModelDims, hf_tokenizer
from lofit_lens.eval.positions import current_answer_index
from lofit_lens.intervention import Head, HeadIntervention, register_intervention
from lofit_lens.methods.base import Method, MethodOptions, MethodRun, RunContext, register_method
from lofit_lens.methods.probes import Probes


@dataclass(frozen=True)
class ITIOptions(MethodOptions):
    """ITI's settings (``compare(iti_alpha=...)``, ``--iti-alpha``)."""

    alpha: float = field(default=15.0, metadata={"help": "shift strength: alpha * sigma * theta per head"})


Where = Literal["all", "last", "answer"]


@register_intervention
class ITIShift(HeadIntervention):
    """ITI's frozen shift at ``hook_z``, applied ``where`` honest_llama applies it:
    ``all`` positions, the ``last`` position of each forward (generation), or ``answer``
    tokens of MC scoring from index ``answer_offset`` on (``lofit_lens.eval.positions``)."""

    kind: ClassVar[str] = "iti_shift"

    def __init__(self, dims: ModelDims, where: Where = "all", answer_offset: int = 0):
        super().__init__(dims, use_scale=False, use_bias=True)
        if where not in ("all", "last", "answer"):
            raise ValueError(f"where must be 'all', 'last' or 'answer', got {where!r}")
        self.where, self.answer_offset = where, answer_offset

    def spec(self) -> dict[str, Any]:
        return {"dims": list(self.dims), "where": self.where, "answer_offset": self.answer_offset}

    @classmethod
    def from_saved(cls, spec: dict[str, Any], tensors: dict[str, Tensor]) -> "ITIShift":
        module = cls(ModelDims(*spec["dims"]), spec["where"], spec["answer_offset"])
        with torch.no_grad():
            module.bias.copy_(tensors["bias"])
            module.head_mask.copy_(tensors["head_mask"].bool())
        return module

    @property
    def acts_at_chosen_positions(self) -> bool:  # type: ignore[override]
        return self.where != "all"

    def edit(self, z: Float[Tensor, "batch pos head d_head"], layer: int) -> Float[Tensor, "batch pos head d_head"]:
        if self.where == "all":
            return super().edit(z, layer)
        offset = (self.bias[layer] * self.head_mask[layer, :, None]).to(z.dtype)  # [head, d_head]
        if self.where == "last":
            at = torch.zeros(z.shape[:2], dtype=torch.bool, device=z.device)
            at[:, -1] = True
        else:
            index = current_answer_index()
            if index is None or tuple(index.shape) != tuple(z.shape[:2]):
                raise RuntimeError("An ITI shift on answer tokens needs multiple-choice scoring "
                                   "(lofit_lens.eval.mc_scoring) to say where the answers are")
            at = index.to(z.device) >= self.answer_offset
        return z + einops.einsum(at.to(z.dtype), offset, "b p, head d -> b p head d")


def honest_llama_answer_offset(tokenizer, prompt: str) -> int:
    """Where honest_llama's MC shift starts within the answer: it edits from "context + 4",
    the context being the prompt without its final "\nA:", on the belief that "\nA: " is
    4 tokens. With "\nA:" as c tokens that is answer index 4 - c (1 on Llama and SmolLM2)."""
    if not prompt.endswith("\nA:"):
        return 0
    c = len(tokenizer(prompt).input_ids) - len(tokenizer(prompt[:-3]).input_ids)
    return max(0, 4 - c)


def iti_intervention(dims: ModelDims, probes: Probes, heads: Sequence[Head], alpha: float,
                     where: Where = "all", answer_offset: int = 0) -> ITIShift:
    """The ITI shift as a frozen bias at ``hook_z`` (0 trainable parameters)."""
    intervention = ITIShift(dims, where, answer_offset).set_heads(heads)
    shift = alpha * probes.sigma[..., None] * probes.direction
    with torch.no_grad():
        intervention.bias.copy_(shift * intervention.head_mask[..., None])
    intervention.bias.requires_grad_(False)
    return intervention


def run_iti(ctx: RunContext, options: ITIOptions) -> MethodRun:
    """ITI: a fixed shift on the K heads whose probes validate best (0 trained params)."""
    probes = ctx.probes()
    heads = probes.top(ctx.k)
    where, offset = "all", 0
    if ctx.task.protocol == "official":  # honest_llama: answer tokens in MC, last token in generation
        if ctx.task.kind == "multiple_choice":
            prompt = ctx.task.eval_examples("test", 1)[0].prompt
            where, offset = "answer", honest_llama_answer_offset(hf_tokenizer(ctx.model), prompt)
        else:
            where = "last"
    shift = iti_intervention(ctx.dims, probes, heads, options.alpha, where, offset)
    return MethodRun(shift, 0, heads,
                     {"probe_parameters": ctx.dims.total_heads * probes.parameters_per_probe(),
                      "uses_probes": True})


register_method(Method("iti", run_iti, ITIOptions))
