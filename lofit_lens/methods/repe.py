"""A RepE-style reading vector (Zou et al. 2023, "Representation Engineering"), added to the
residual stream: a baseline with nothing trained, like ITI.

Reading (RepE's PCA reader with ``n_difference=1`` and ``rep_token=-1``):

1. Contrasting pairs from the task's TRAINING examples, built as ITI's probe data
   (``probes.statements``): the prompt with a true answer and the same prompt with a false one
   (multiple choice: its true and false choices, paired in order; generation: the gold target
   and another example's answer that this prompt does not accept).
2. ``blocks.{l}.hook_resid_post`` of every layer at the last token of prompt + answer.
3. Per layer, the differences true - false, each with a seeded random sign (RepE shuffles the
   order within each pair), centred; the reading vector ``u_l`` is their first principal
   component (unit norm), signed so that the true member projects higher on most pairs.
4. Questions are split 4:1 (seeded) as for ITI's probes: the vectors are read on the 4/5;
   on the held-out 1/5 each layer scores the share of pairs whose true member projects
   higher. The ``repe_layers`` best layers (a count, or a fraction of the layers) are used.

Control: ``h_l <- h_l + coeff * sigma_l * u_l`` at ``blocks.{l}.hook_resid_post`` of the
chosen layers, at every position (prompt and generated tokens), as RepE's ``rep-control``
with a reading vector adds it. ``sigma_l`` is the standard deviation of all reading
activations projected on ``u_l`` (RepE adds ``coeff * u_l`` in the model's raw units; the
spread makes one coefficient mean the same on models of different scale, as ITI's
``alpha * sigma``). The reading vectors hold ``n_layers * (d_model + 1)`` numbers (reported in
``info``, as ITI reports its probes); none is trained.
"""

from __future__ import annotations

import contextlib
import functools
import random
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence, Union

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

from lofit_lens.backends.hooked import attached_hooks, model_device
from lofit_lens.errors import ModelMismatchError
from lofit_lens.intervention import register_intervention
from lofit_lens.methods.activations import last_token_activations
from lofit_lens.methods.base import Method, MethodOptions, MethodRun, RunContext, register_method
from lofit_lens.methods.probes import Statements, VAL_FRACTION, statements
from lofit_lens.methods.reft import ResidualDims, residual_dims, resid_post_name
from lofit_lens.tasks.base import Example, Task


@dataclass
class Reading:
    """Per layer: the reading vector, its held-out pair accuracy and the activations' spread
    along it."""

    direction: Float[Tensor, "layer d_model"]
    accuracy: Float[Tensor, " layer"]
    sigma: Float[Tensor, " layer"]
    n_pairs: int

    def top_layers(self, n: int) -> list[int]:
        order = torch.argsort(self.accuracy, descending=True, stable=True)[:n]
        return sorted(int(i) for i in order)


# ---------------------------------------------------------------------- reading
def residual_activations(model, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                         joint: bool = False) -> Float[Tensor, "n layer d_model"]:
    """``hook_resid_post`` of every layer at the last token of prompt + answer (right-padded
    batches; ``joint``: tokenised as one string, as the official protocol does)."""
    names = [resid_post_name(layer) for layer in range(residual_dims(model).n_layers)]
    return last_token_activations(model, pairs, names, batch_size, joint, what="RepE reading")


def contrast_pairs(found: Statements) -> list[tuple[int, int, int]]:
    """(true row, false row, question) for every question: its true and false statements
    paired in order (as many pairs as the shorter list)."""
    by_question: dict[int, tuple[list[int], list[int]]] = {}
    for row, (label, group) in enumerate(zip(found.labels.tolist(), found.groups.tolist())):
        by_question.setdefault(group, ([], []))[0 if label == 1 else 1].append(row)
    return [(t, f, q) for q, (trues, falses) in sorted(by_question.items())
            for t, f in zip(trues, falses)]


def held_out_questions(questions: Sequence[int], seed: int) -> set[int]:
    """The seeded 1/5 of the questions that score the layers (ITI's split rule)."""
    unique = sorted(set(questions))
    random.Random(seed).shuffle(unique)
    return set(unique[:max(1, round(VAL_FRACTION * len(unique)))])


def read_directions(acts: Float[Tensor, "n layer d_model"], pairs: Sequence[tuple[int, int, int]],
                    seed: int) -> Reading:
    """RepE's PCA reader per layer (steps 3 and 4 of the module docstring)."""
    if len({q for _, _, q in pairs}) < 2:
        raise ValueError("RepE needs contrasting pairs from at least two questions "
                         "(a reading part and a held-out part)")
    held = held_out_questions([q for _, _, q in pairs], seed)
    fit = [(t, f) for t, f, q in pairs if q not in held]
    test = [(t, f) for t, f, q in pairs if q in held]
    true_fit, false_fit = acts[[t for t, _ in fit]], acts[[f for _, f in fit]]
    diffs = true_fit - false_fit  # [pairs, layer, d]
    signs = torch.randint(0, 2, (len(fit),), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    shuffled = diffs * signs[:, None, None].float()
    centred = shuffled - shuffled.mean(dim=0, keepdim=True)
    direction = torch.zeros(acts.shape[1], acts.shape[2])
    for layer in range(acts.shape[1]):
        _, _, vh = torch.linalg.svd(centred[:, layer].double(), full_matrices=False)
        u = vh[0].float()
        wins = (einops.einsum(diffs[:, layer], u, "n d, d -> n") > 0).float().mean()
        direction[layer] = u if wins >= 0.5 else -u
    true_test, false_test = acts[[t for t, _ in test]], acts[[f for _, f in test]]
    gap = einops.einsum(true_test - false_test, direction, "n layer d, layer d -> n layer")
    accuracy = (gap > 0).float().mean(dim=0)
    used = sorted({r for t, f, _ in pairs for r in (t, f)})
    projected = einops.einsum(acts[used], direction, "n layer d, layer d -> n layer")
    return Reading(direction, accuracy, projected.std(dim=0, unbiased=False), len(fit))


def repe_reading(model, task: Task, examples: Sequence[Example], seed: int,
                 batch_size: int = 16) -> Reading:
    """Reading vectors of every layer from ``examples`` (the run's training examples)."""
    found = statements(task, examples, seed)
    pairs = contrast_pairs(found)
    if not pairs:
        raise ValueError(f"{task.name}: no true/false answer pairs to read a direction from")
    used = sorted({r for t, f, _ in pairs for r in (t, f)})
    rows = residual_activations(model, [found.pairs[r] for r in used], batch_size,
                                joint=task.protocol == "official")
    acts = torch.zeros(len(found.pairs), rows.shape[1], rows.shape[2])  # statements in no pair stay 0
    acts[used] = rows
    return read_directions(acts, pairs, seed)


def num_layers(n: Union[int, float], total: int) -> int:
    """``n`` as a layer count: an int as is, a float in (0, 1) as that share (at least 1)."""
    if isinstance(n, float) and 0 < n < 1:
        return max(1, round(n * total))
    if int(n) != n or not 1 <= int(n) <= total:
        raise ValueError(f"repe_layers={n!r}: a count in [1, {total}] or a fraction in (0, 1)")
    return int(n)


# ---------------------------------------------------------------------- the intervention
@register_intervention
class ResidualShift(nn.Module):
    """A fixed vector added to ``blocks.{l}.hook_resid_post`` of some layers, at every position."""

    kind: ClassVar[str] = "residual_shift"

    def __init__(self, dims: ResidualDims, layers: Sequence[int]):
        super().__init__()
        self.dims = ResidualDims(*dims)
        self.layers = sorted({int(l) for l in layers})
        if not self.layers or not all(0 <= l < self.dims.n_layers for l in self.layers):
            raise ValueError(f"layers {list(layers)} outside the model's {self.dims.n_layers} layers")
        self.register_buffer("shift", torch.zeros(len(self.layers), self.dims.d_model))

    def trainable(self) -> list[nn.Parameter]:
        return []

    def l1_parameters(self) -> list[nn.Parameter]:
        return []

    def num_trainable_parameters(self) -> int:
        return 0

    def first_layer(self) -> int:
        return self.layers[0]

    def spec(self) -> dict[str, Any]:
        return {"dims": list(self.dims), "layers": self.layers}

    def state_tensors(self) -> dict[str, Tensor]:
        return {"shift": self.shift.detach()}

    @classmethod
    def from_saved(cls, spec: dict[str, Any], tensors: dict[str, Tensor]) -> "ResidualShift":
        module = cls(ResidualDims(*spec["dims"]), spec["layers"])
        module.shift.copy_(tensors["shift"])
        return module.eval()

    def hooks(self) -> list[tuple[str, Callable]]:
        def hook_fn(resid: Tensor, hook, i: int) -> Tensor:
            return resid + self.shift[i].to(resid.dtype)

        return [(resid_post_name(layer), functools.partial(hook_fn, i=i))
                for i, layer in enumerate(self.layers)]

    @contextlib.contextmanager
    def attach(self, model) -> Iterator["ResidualShift"]:
        if residual_dims(model) != self.dims:
            raise ModelMismatchError(f"Shift built for {self.dims}, model has {residual_dims(model)}: "
                                     "apply it to a model of that shape (the one it "
                                     "was trained on)")
        self.to(model_device(model))
        with attached_hooks(model, self.hooks()):
            yield self


def repe_shift(dims: ResidualDims, reading: Reading, layers: Sequence[int], coeff: float) -> ResidualShift:
    """``coeff * sigma_l * u_l`` on ``layers`` (0 trained parameters)."""
    shift = ResidualShift(dims, layers)
    with torch.no_grad():
        for i, layer in enumerate(shift.layers):
            shift.shift[i] = coeff * reading.sigma[layer] * reading.direction[layer]
    return shift


def reading_info(reading: Reading, layers: Sequence[int], coeff: float) -> dict[str, Any]:
    """What a ``compare`` run records of the reading (JSON-able)."""
    n_layers, d_model = reading.direction.shape
    return {"layers": list(layers), "coeff": coeff, "pairs": reading.n_pairs,
            "layer_accuracy": [round(float(a), 4) for a in reading.accuracy],
            "reading_parameters": n_layers * (d_model + 1)}


@dataclass(frozen=True)
class RepEOptions(MethodOptions):
    """RepE's settings (``compare(repe_coeff=...)``, ``--repe-coeff``)."""

    coeff: float = field(default=2.0, metadata={
        "help": "the shift is coeff * sigma_l * u_l per chosen layer"})
    layers: Union[int, float] = field(default=0.25, metadata={
        "help": "layers shifted: a count, or a share of all layers (best held-out reading first)"})


def run_repe(ctx: RunContext, options: RepEOptions) -> MethodRun:
    """RepE: a reading vector (PCA of paired differences) added at the best-reading layers."""
    train = ctx.task.train_examples(ctx.cfg.seed, ctx.cfg.max_train_examples)
    reading = repe_reading(ctx.model, ctx.task, train, ctx.cfg.seed, ctx.cfg.eval_batch_size)
    layers = reading.top_layers(num_layers(options.layers, ctx.dims.n_layers))
    shift = repe_shift(residual_dims(ctx.model), reading, layers, options.coeff)
    return MethodRun(shift, 0, None, reading_info(reading, layers, options.coeff))


register_method(Method("repe", run_repe, RepEOptions))
