"""ITI's per-head linear probes (Li et al. 2023), fitted once per run (``RunContext.probes``)
and read by ``iti`` and the ``iti_heads`` and ``probe_layers`` selectors.

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
  of the fold's three CSVs (all 817, test included), true and false alike (``end_q_statements``).
Its probe answers come from HF's ``truthful_qa`` multiple-choice set, which is not here
offline; the CSV's correct and incorrect answers stand in for them (docs/protocol.md).
``clean``: the 4:1 split, sigma over the probe data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import einops
import numpy as np
import torch
from jaxtyping import Float, Int
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from lofit_lens.backends.hooked import hook_z_name, model_dims
from lofit_lens.intervention import Head, top_heads
from lofit_lens.methods.activations import last_token_activations
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

