"""``doctor``: does this environment compute what lofit-lens relies on, in the precision in use?

Each check compares a fast path lofit-lens uses against a slow path that cannot share its
fault, on logits, within the rounding a correct computation shows in the model's dtype on
its device (``lofit_lens.tolerance``; free-running greedy text is not compared, since a
near-tie may fall either way in bf16):

- the plain view the hot paths run (HF attention, interventions mirrored) against the
  bridge's hook path, with an intervention on;
- cached generation against a full forward teacher-forced on the generated tokens, with and
  without an intervention, one prompt at a time and as a left-padded batch;
- shared-prefix MC scoring against one full sequence per answer;
- that no hook is left behind.

``lofit-lens run`` and ``compare`` run the fast part before any training and stop with
``BrokenEnvironmentError`` when a check fails, so a broken environment never produces a table.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from jaxtyping import Float
from torch import Tensor

from lofit_lens.backends import hf_forward
from lofit_lens.backends.hf_cache import live_cache_aliases
from lofit_lens.backends.hooked import (
    hf_tokenizer, model_device, model_dims, model_id, uses_bridge,
)
from lofit_lens.backends.plain import plain_runner, plain_view
from lofit_lens.padding import collate, pad_id
from lofit_lens.errors import GOTCHAS, BrokenEnvironmentError
from lofit_lens.eval.generation import greedy_steps
from lofit_lens.intervention import HeadIntervention
from lofit_lens.tasks.base import ChoiceExample
from lofit_lens.tolerance import logit_tolerance, model_dtype
from lofit_lens.versions import library_versions, lock_mismatches

PROMPTS = ("The capital of France is", "Q: What is two plus two?\nA:")
SHARED_PROMPTS = ("Q: What is the capital of France?\nA:", "Q: What is two plus two?\nA:")
"""Two prompts that start alike: a batch of them runs its common tokens once."""
NEW_TOKENS = 8
CHOICES = (  # prompts of different lengths: the shared-prefix pass left-pads the short one
    ChoiceExample("Q: What colour is the sky on a clear summer day, when no cloud can be "
                  "seen from one horizon to the other?\nA:",
                  ("Blue.", "Green.", "The sky is blue.", "Red, always."), (0, 2)),
    ChoiceExample("Q: Is ice cold?\nA:", ("Yes.", "No."), (0,)),
)
LOCK = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"


@dataclass
class Check:
    name: str
    status: str
    """``pass``, ``warn`` (worth knowing, not wrong) or ``fail``."""
    detail: str
    seconds: float = 0.0


@dataclass
class DoctorReport:
    model_id: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def __str__(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"lofit-lens doctor ({self.model_id})"]
        lines += [f"  {c.status.upper():4s}  {c.name:{width}s}  {c.detail} ({c.seconds:.1f} s)"
                  for c in self.checks]
        verdict = "all checks passed" if self.ok else f"{len(self.failures)} check(s) FAILED"
        return "\n".join(lines + [f"  {verdict}"])

    def raise_if_failed(self) -> "DoctorReport":
        if not self.ok:
            raise BrokenEnvironmentError(
                "This environment computes wrong results; nothing was trained or evaluated.\n"
                f"{self}\nSee {GOTCHAS} (\"Generation prints junk after the first token\") and "
                "reinstall the locked set with scripts/install.sh.")
        return self


def doctor(model, fast: bool = False) -> DoctorReport:
    """Run the checks on ``model`` (a hooked model from ``load_model``) and return a report.

    ``fast`` skips the comparison with plain HF on a second copy of the weights (it loads the
    model again). Call ``.raise_if_failed()`` on the report to stop on failure.
    """
    report = DoctorReport(model_id(model))
    hooks_before = _hook_counts(model)
    checks: list[tuple[str, Callable[[], tuple[str, str]]]] = [
        ("versions", _versions),
        ("plain view == hook path", lambda: _plain_vs_hooks(model)),
        ("cached generation == full forward per token", lambda: _generation(model, batch_size=1)),
        ("same, with an intervention on", lambda: _generation(model, batch_size=1, intervened=True)),
        ("batched generation == one prompt at a time", lambda: _generation(model, len(PROMPTS))),
        ("shared-prefix generation == one prompt at a time", lambda: _shared_prefix_generation(model)),
        ("shared-prefix MC == one answer at a time", lambda: _shared_prefix_mc(model)),
    ]
    if not fast:
        checks.append(("generation == plain HF on a second copy", lambda: _vs_plain_hf(model)))
    for name, run in checks:
        start = time.perf_counter()
        try:
            status, detail = run()
        except Exception as err:  # a check that crashes is a failed check, named
            status, detail = "fail", f"{type(err).__name__}: {err}"
        report.checks.append(Check(name, status, detail, time.perf_counter() - start))
    left = {k: v for k, v in _hook_counts(model).items() if v != hooks_before.get(k, 0)}
    report.checks.append(Check("no hook left behind", "fail" if left else "pass",
                               f"hooks left on {sorted(left)}" if left else "none"))
    return report


def _versions() -> tuple[str, str]:
    v = library_versions()
    detail = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "transformer-lens"))
    if not LOCK.is_file():
        return "pass", detail + " (no lock file beside this install to compare with)"
    differ = [line.split(":")[0] for line in lock_mismatches(LOCK)]
    if differ:
        return "warn", detail + f"; {len(differ)} package(s) differ from {LOCK.name}: " + ", ".join(differ[:6])
    return "pass", detail + f"; the tested set of {LOCK.name}"


def _hook_counts(model) -> dict[str, int]:
    counts = {name: len(point.fwd_hooks) + len(point.bwd_hooks)
              for name, point in model.hook_dict.items()}
    counts["cache aliases (lofit_lens.backends.hf_cache)"] = live_cache_aliases()
    view = plain_view(model)
    if view is not None:
        counts["plain view (lofit_lens.backends.plain)"] = view.live
    return counts


def _strong_intervention(model) -> HeadIntervention:
    """Offsets N(0, 1) on every head of the middle layer: enough to change greedy text."""
    dims = model_dims(model)
    heads = [(dims.n_layers // 2, h) for h in range(dims.n_heads)]
    gen = torch.Generator().manual_seed(0)
    return HeadIntervention.for_model(model, use_scale=False).set_heads(heads).init_normal(1.0, gen)


def _everywhere_intervention(model) -> HeadIntervention:
    """Scales and offsets N(0, 1) on every head of every layer: each edit the plain view
    mirrors moves the logits, far beyond rounding."""
    gen = torch.Generator().manual_seed(0)
    return HeadIntervention.for_model(model).set_heads(None).init_normal(1.0, gen)


def _within(model, pairs: Iterable[tuple[Tensor, Tensor]]) -> tuple[bool, str]:
    """Whether each ``got`` equals its ``reference`` (logits) within the model's rounding
    tolerance, and the pair closest to (or furthest past) its tolerance: gap against bound."""
    worst = None
    for got, reference in pairs:
        tol = logit_tolerance(model_dtype(model), model_dims(model).n_layers, reference)
        gap = float((got.float() - reference.float()).abs().max())
        if worst is None or gap / max(tol, 1e-30) > worst[0] / max(worst[1], 1e-30):
            worst = (gap, tol)
    gap, tol = worst
    return gap <= tol, f"max |difference| {gap:.2g} (tolerance {tol:.2g}, {_precision(model)})"


def _precision(model) -> str:
    return f"{str(model_dtype(model)).removeprefix('torch.')} on {model_device(model).type}"


def _continuation(logits: Float[Tensor, "pos vocab"], row: list[int], new: list[int]) -> Float[Tensor, "new vocab"]:
    """The logits at the positions that predicted ``new`` after the prompt ``row``."""
    return logits[len(row) - 1:len(row) - 1 + len(new)]


@torch.no_grad()
def full_forward_logits(model, ids: list[int]) -> Float[Tensor, "pos vocab"]:
    """Logits at every position of one unpadded row, by the hooked model's own forward (on a
    bridge: its hook path, not the plain view), no KV cache: the reference."""
    tokens = torch.tensor([ids], device=model_device(model))
    return model(tokens, return_type="logits")[0].float().cpu()


def _plain_vs_hooks(model) -> tuple[str, str]:
    """The plain view's logits (training and evaluation run there) against the bridge's hook
    path, on a right-padded batch with A and v on every head."""
    if not uses_bridge(model):
        return "pass", "not used here (TL 3.x runs its own blocks)"
    view = plain_view(model)
    if view is None:
        return "warn", "no plain view: the hot paths run through the bridge (slower; docs/gotchas.md)"
    tok = hf_tokenizer(model)
    batch = collate([(tok(p).input_ids, tok(" yes").input_ids) for p in PROMPTS],
                    pad_id(tok)).to(model_device(model))
    real = batch.attention_mask.bool().nonzero(as_tuple=True)
    n_layers = model_dims(model).n_layers
    with torch.no_grad(), _everywhere_intervention(model).attach(model):
        runner = plain_runner(model)
        if runner is None:
            return "warn", (f"{view.foreign_hooks()} hook(s) not added by lofit-lens are attached: "
                            "the hot paths run through the bridge while they are")
        plain = hf_forward.logits_at(runner, n_layers, batch.tokens, batch.attention_mask, real)
        hooked = model(batch.tokens, attention_mask=batch.attention_mask, return_type="logits")[real]
    with torch.no_grad():
        untouched = model(batch.tokens, attention_mask=batch.attention_mask, return_type="logits")[real]
    ok, detail = _within(model, [(plain, hooked)])
    if not ok:
        return "fail", f"{view.attn_implementation} plain view vs eager hook path: {detail}"
    effect = float((hooked.float() - untouched.float()).abs().max())
    tol = logit_tolerance(model_dtype(model), n_layers, hooked)
    if not effect > tol:  # an edit the view dropped could hide within the tolerance
        return "warn", (f"equal, but the test intervention changed the logits by only {effect:.2g} "
                        f"(tolerance {tol:.2g}): inconclusive")
    return "pass", f"{view.attn_implementation} plain view vs eager hook path: {detail}; the intervention moved them by {effect:.2g}"


def _generation(model, batch_size: int, intervened: bool = False,
                prompts: tuple[str, ...] = PROMPTS) -> tuple[str, str]:
    """Cached greedy generation (``batch_size`` prompts a batch, left-padded) against a full
    forward of each prompt + its generated tokens: each step's logits, or under TL 3.x (no
    logits from its ``generate``) each token within tolerance of the full forward's best."""
    tok = hf_tokenizer(model)
    rows = [tok(p).input_ids for p in prompts]
    attach = _strong_intervention(model).attach(model) if intervened else contextlib.nullcontext()
    with attach:
        steps = greedy_steps(model, rows, NEW_TOKENS, batch_size)
        pairs = []
        for row, (new, logits) in zip(rows, steps):
            reference = _continuation(full_forward_logits(model, row + new), row, new)
            if logits is None:  # TL 3.x: the chosen token's logit must be the best, within tolerance
                logits = reference.clone()
                chosen = reference.gather(-1, torch.tensor(new)[:, None])
                logits.scatter_(-1, reference.argmax(-1, keepdim=True), chosen)
            pairs.append((logits, reference))
    ok, detail = _within(model, pairs)
    what = f"{len(rows)} prompts x {NEW_TOKENS} tokens" + (f", batches of {batch_size}" if batch_size > 1 else "")
    return ("pass" if ok else "fail"), f"{what}: {detail}"


def _shared_prefix_generation(model) -> tuple[str, str]:
    """A batch whose prompts start alike (their common tokens run once) against a full forward
    of each prompt + its generated tokens."""
    from lofit_lens.padding import batch_rows

    if not uses_bridge(model):
        return "pass", "not used here (TL 3.x generates one prompt at a time)"
    tok = hf_tokenizer(model)
    _, _, shared = batch_rows([tok(p).input_ids for p in SHARED_PROMPTS], pad_id(tok))
    if not shared:
        return "warn", "this tokenizer splits the test prompts' common start too little to share it"
    status, detail = _generation(model, len(SHARED_PROMPTS), prompts=SHARED_PROMPTS)
    return status, f"{shared} tokens shared; " + detail


def _shared_prefix_mc(model) -> tuple[str, str]:
    from lofit_lens.eval.mc_scoring import choice_scores

    if not uses_bridge(model):
        return "pass", "not used here (TL 3.x scores full sequences)"
    shared = torch.cat(choice_scores(model, list(CHOICES), progress=False, share_prefix=True))
    full = torch.cat(choice_scores(model, list(CHOICES), progress=False, share_prefix=False))
    tok = hf_tokenizer(model)
    longest = max((ex.prompt + " " + c for ex in CHOICES for c in ex.choices), key=len)
    answer_tokens = max(len(tok(" " + c).input_ids) for ex in CHOICES for c in ex.choices)
    # A sum of answer_tokens log-probs, each as far off as a logit: independent rounding
    # errors add in quadrature.
    per_token = logit_tolerance(model_dtype(model), model_dims(model).n_layers,
                                full_forward_logits(model, tok(longest).input_ids))
    tol = per_token * math.sqrt(answer_tokens)
    gap = float((shared - full).abs().max())
    n = sum(len(ex.choices) for ex in CHOICES)
    if not gap <= tol:
        return "fail", (f"answer log-probs differ by up to {gap:.3g} (tolerance {tol:.2g}, "
                        f"{_precision(model)}; shared {shared.tolist()} vs full {full.tolist()})")
    return "pass", f"{n} answers: max |difference| {gap:.2g} (tolerance {tol:.2g}, {_precision(model)})"


def _vs_plain_hf(model) -> tuple[str, str]:
    """lofit-lens's cached generation against plain HF's forward on a second copy of the
    weights, teacher-forced on the generated tokens."""
    from lofit_lens.backends.hf import load_hf

    name = getattr(model, "lofit_model_id", None)
    if name is None:
        return "warn", "skipped: the model was not loaded by lofit_lens.load_model"
    hf_model, tok = load_hf(name, device=str(model_device(model)), dtype=model_dtype(model))
    rows = [tok(p).input_ids for p in PROMPTS]
    pairs = []
    for row, (new, logits) in zip(rows, greedy_steps(model, rows, NEW_TOKENS, len(rows))):
        with torch.no_grad():
            ids = torch.tensor([row + new], device=model_device(model))
            reference = _continuation(hf_model(ids).logits[0].float().cpu(), row, new)
        if logits is None:
            logits = _continuation(full_forward_logits(model, row + new), row, new)
        pairs.append((logits, reference))
    ok, detail = _within(model, pairs)
    return ("pass" if ok else "fail"), f"{len(rows)} prompts x {NEW_TOKENS} tokens: {detail}"
