"""Inference-time intervention (ITI, Li et al. 2023): per-head linear probes, then a fixed
shift ``alpha * sigma * theta`` on the top-K heads' ``hook_z``.

Probe data, from the task's TRAINING examples, with the prompt the trainer uses
(``task.training_examples``; for TruthfulQA the short ``"Q: {question} A:"`` as in ITI's
code) and the answer appended, read at the last answer token:

- multiple choice: every true choice (label 1) and every false choice (label 0);
- generation: the gold target (1) and, as the false answer, the target of another training
  example drawn with the seed among those whose answer is not accepted for this prompt (0).

Questions are split 4:1 (seeded) into probe train/val; heads rank by validation accuracy.
theta (mean true - mean false, unit length) uses all probe data, as ITI's code does.

Under the ``official`` protocol on TruthfulQA, as honest_llama (the copy lo-fit bundles) does:
- probes train on the fold's train CSV and validate on its val CSV; theta uses both;
- sigma is the std of the projections of last-token activations of
  ``"Q: {q} A: {answer} Q: {random other question}"`` over every answer of every question
  of the fold's three CSVs (all 817, test included), true and false alike;
- the shift is added on answer tokens only during MC scoring, from the position honest_llama
  computes as "context + 4" (the second answer token when "\nA:" is three tokens), and on
  the last position of each forward pass during generation.
Its probe answers come from HF's ``truthful_qa`` multiple-choice set, which is not here
offline; the CSV's correct and incorrect answers stand in for them (docs/protocol.md).
``clean``: the 4:1 split, sigma over the probe data, the shift at every position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Sequence

import einops
import numpy as np
import torch
from jaxtyping import Float, Int
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from lofit_lens.baselines.activations import last_token_activations
from lofit_lens.backends.hooked import ModelDims, hook_z_name, model_dims
from lofit_lens.intervention import Head, HeadIntervention, register_intervention, top_heads
from lofit_lens.eval.positions import current_answer_index
from lofit_lens.tasks.base import ChoiceExample, Example, GenerationExample, Task

VAL_FRACTION = 0.2


@dataclass
class Statements:
    """(prompt, answer) pairs with a truth label and the question each comes from."""

    pairs: list[tuple[str, str]]
    labels: Int[Tensor, " n"]
    groups: Int[Tensor, " n"]


@dataclass
class Probes:
    """Per-head probe validation accuracy, ITI direction theta and its spread sigma."""

    accuracy: Float[Tensor, "layer head"]
    direction: Float[Tensor, "layer head d_head"]
    sigma: Float[Tensor, "layer head"]

    def top(self, k: int) -> list[Head]:
        return top_heads(self.accuracy, k)

    def parameters_per_probe(self) -> int:
        return self.direction.shape[-1] + 1


def statements(task: Task, examples: Sequence[Example], seed: int) -> Statements:
    """True and false answers of ``examples`` (see the module doc)."""
    prompts = [t.prompt for t in task.training_examples(examples)]
    rng = random.Random(seed)
    pairs, labels, groups = [], [], []
    for q, (ex, prompt) in enumerate(zip(examples, prompts)):
        if isinstance(ex, ChoiceExample):
            found = [(" " + c, 1) for c in ex.true_choices] + [(" " + c, 0) for c in ex.false_choices]
        else:
            found = [(ex.target, 1)] + [(a, 0) for a in _other_answer(ex, examples, rng)]
        for answer, label in found:
            pairs.append((prompt, answer))
            labels.append(label)
            groups.append(q)
    return Statements(pairs, torch.tensor(labels), torch.tensor(groups))


def _other_answer(ex: GenerationExample, examples: Sequence[Example], rng: random.Random) -> list[str]:
    """The target of a random other example whose answer ``ex`` does not accept (or none)."""
    accepted = {a.strip().lower() for a in ex.answers}
    wrong = [o.target for o in examples if o.target.strip().lower() not in accepted]
    return [rng.choice(wrong)] if wrong else []


def head_activations(model, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                     joint: bool = False) -> Float[Tensor, "n layer head d_head"]:
    """``hook_z`` of every head at the last token of prompt + answer (right-padded batches;
    ``joint``: the two tokenised as one string, as honest_llama does)."""
    names = [hook_z_name(layer) for layer in range(model_dims(model).n_layers)]
    return last_token_activations(model, pairs, names, batch_size, joint, what="ITI probe")


def fit_probes(acts: Float[Tensor, "n layer head d_head"], labels: Int[Tensor, " n"],
               groups: Int[Tensor, " n"], seed: int, is_val: Optional[np.ndarray] = None,
               sigma_acts: Optional[Float[Tensor, "m layer head d_head"]] = None) -> Probes:
    """A logistic-regression probe per head, trained on the rows not in ``is_val`` (default:
    a seeded 4:1 split of the groups, i.e. questions) and scored on the rest. sigma: the std
    of ``sigma_acts`` (default: ``acts``) projected on theta."""
    is_val = _val_rows(groups, seed) if is_val is None else is_val
    if is_val.all() or not is_val.any():
        raise ValueError("ITI probes need at least two questions (a train and a val part)")
    y = labels.numpy()
    n_layers, n_heads, _ = acts.shape[1:]
    accuracy = torch.zeros(n_layers, n_heads)
    for layer in range(n_layers):
        for head in range(n_heads):
            x = acts[:, layer, head].numpy()
            probe = LogisticRegression(max_iter=1000, random_state=seed)
            probe.fit(x[~is_val], y[~is_val])
            accuracy[layer, head] = float(probe.score(x[is_val], y[is_val]))
    direction = acts[labels == 1].mean(0) - acts[labels == 0].mean(0)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    spread = acts if sigma_acts is None else sigma_acts
    projected = einops.einsum(spread, direction, "n layer head d, layer head d -> n layer head")
    return Probes(accuracy, direction, projected.std(dim=0, unbiased=False))


def _val_rows(groups: Int[Tensor, " n"], seed: int) -> np.ndarray:
    """True for rows whose group falls in the seeded 1/5 validation part."""
    unique = sorted(set(groups.tolist()))
    random.Random(seed).shuffle(unique)
    held = set(unique[:max(1, round(VAL_FRACTION * len(unique)))])
    return np.array([g in held for g in groups.tolist()])


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


def end_q_statements(examples: Sequence[ChoiceExample], seed: int) -> list[tuple[str, str]]:
    """honest_llama's sigma rows: ``("Q: {q} A:", " {answer} Q: {random question}")`` for
    every answer of every example (read at the last token)."""
    rng = np.random.default_rng(seed)
    questions = [ex.meta["question"] for ex in examples]
    rows = []
    for ex in examples:
        for answer in ex.choices:
            other = questions[int(rng.integers(len(questions)))]
            rows.append((f"Q: {ex.meta['question']} A:", f" {answer} Q: {other}"))
    return rows

