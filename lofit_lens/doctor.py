"""``doctor``: does this environment compute what lofit-lens relies on?

Each check compares a fast path lofit-lens uses against a slow path that cannot share its
fault: cached HF decoding against a full forward per token, batched against one prompt at a
time, shared-prefix MC scoring against one answer at a time. ``lofit-lens run`` and
``compare`` run the fast part before any training and stop with ``BrokenEnvironmentError``
when a check fails, so a broken environment never produces a table.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from lofit_lens.errors import GOTCHAS, BrokenEnvironmentError
from lofit_lens.eval.generation import greedy_generate
from lofit_lens.backends.hf_cache import greedy_config, live_cache_aliases
from lofit_lens.backends.hooked import hf_tokenizer, model_device, model_dims, model_id, uses_bridge
from lofit_lens.intervention import HeadIntervention
from lofit_lens.tasks.base import ChoiceExample
from lofit_lens.versions import library_versions, lock_mismatches

PROMPTS = ("The capital of France is", "Q: What is two plus two?\nA:")
NEW_TOKENS = 8
CHOICES = ChoiceExample("Q: What colour is the sky on a clear day?\nA:",
                        ("Blue.", "Green.", "The sky is blue.", "Red, always."), (0, 2))
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

    ``fast`` skips the comparison with plain HF ``generate`` on a second copy of the weights
    (it loads the model again). Call ``.raise_if_failed()`` on the report to stop on failure.
    """
    report = DoctorReport(model_id(model))
    hooks_before = _hook_counts(model)
    checks: list[tuple[str, Callable[[], tuple[str, str]]]] = [
        ("versions", _versions),
        ("cached generation == full forward per token", lambda: _generation_vs_no_cache(model)),
        ("same, with an intervention on", lambda: _generation_vs_no_cache(model, intervened=True)),
        ("batched generation == one prompt at a time", lambda: _batched_vs_single(model)),
        ("shared-prefix MC == one answer at a time", lambda: _shared_prefix_mc(model)),
    ]
    if not fast:
        checks.append(("generation == plain HF generate", lambda: _vs_plain_hf(model)))
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
    return counts


def _strong_intervention(model) -> HeadIntervention:
    """Offsets N(0, 1) on every head of the middle layer: enough to change greedy text."""
    dims = model_dims(model)
    heads = [(dims.n_layers // 2, h) for h in range(dims.n_heads)]
    gen = torch.Generator().manual_seed(0)
    return HeadIntervention.for_model(model, use_scale=False).set_heads(heads).init_normal(1.0, gen)


@torch.no_grad()
def greedy_no_cache(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by one full forward per token and no KV cache: slow, but it
    shares no cache plumbing with generation, which makes it the ground truth here."""
    eos = hf_tokenizer(model).eos_token_id
    seq = list(ids)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([seq], device=model_device(model)), return_type="logits")
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        seq.append(token)
    return seq[len(ids):]


def _decode(model, ids: list[int]) -> str:
    return hf_tokenizer(model).decode(ids, skip_special_tokens=True)


def _generation_vs_no_cache(model, intervened: bool = False) -> tuple[str, str]:
    tok = hf_tokenizer(model)
    attach = _strong_intervention(model).attach(model) if intervened else contextlib.nullcontext()
    with attach:
        expected = [_decode(model, greedy_no_cache(model, tok(p).input_ids, NEW_TOKENS))
                    for p in PROMPTS]
        got = greedy_generate(model, list(PROMPTS), NEW_TOKENS, progress=False)
    if got != expected:
        return "fail", f"cached {got!r} vs full forward {expected!r}"
    if intervened and got == greedy_generate(model, list(PROMPTS), NEW_TOKENS, progress=False):
        return "warn", "equal, but the test intervention did not change the text (inconclusive)"
    return "pass", f"{len(PROMPTS)} prompts x {NEW_TOKENS} tokens equal: {got[0]!r}"


def _batched_vs_single(model) -> tuple[str, str]:
    batched = greedy_generate(model, list(PROMPTS), NEW_TOKENS, batch_size=len(PROMPTS), progress=False)
    single = [greedy_generate(model, [p], NEW_TOKENS, progress=False)[0] for p in PROMPTS]
    if batched != single:
        return "fail", f"batched {batched!r} vs one at a time {single!r}"
    return "pass", "left-padded batch equals unpadded rows"


def _shared_prefix_mc(model) -> tuple[str, str]:
    from lofit_lens.eval.mc_scoring import choice_scores

    if not uses_bridge(model):
        return "pass", "not used here (TL 3.x scores full sequences)"
    shared = choice_scores(model, [CHOICES], progress=False, share_prefix=True)[0]
    full = choice_scores(model, [CHOICES], progress=False, share_prefix=False)[0]
    gap = float((shared - full).abs().max())
    if gap > 1e-3:
        return "fail", f"answer log-probs differ by up to {gap:.3g} (shared {shared.tolist()} vs full {full.tolist()})"
    return "pass", f"{len(CHOICES.choices)} answers, max |difference| {gap:.1e}"


def _vs_plain_hf(model) -> tuple[str, str]:
    from lofit_lens.backends.hf import load_hf

    name = getattr(model, "lofit_model_id", None)
    if name is None:
        return "warn", "skipped: the model was not loaded by lofit_lens.load_model"
    hf_model, tok = load_hf(name, device=str(model_device(model)), dtype=_dtype(model))
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt).input_ids], device=model_device(model))
        with torch.no_grad():
            out = hf_model.generate(ids, generation_config=greedy_config(
                NEW_TOKENS, tok.pad_token_id, tok.eos_token_id))
        new = out[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id)]
        expected.append(tok.decode(new, skip_special_tokens=True))
    got = greedy_generate(model, list(PROMPTS), NEW_TOKENS, progress=False)
    if got != expected:
        return "fail", f"lofit-lens {got!r} vs HF generate {expected!r}"
    return "pass", "equal text on a second, plain HF copy of the weights"


def _dtype(model) -> Optional[torch.dtype]:
    dtype = getattr(model.cfg, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None
