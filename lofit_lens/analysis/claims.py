"""The paper's claims as tested hypotheses, on any hooked model (docs/claims.md).

``replicate_claims(model, ...)`` collects the data (``claims_data``: for every seed, LoFiT's
head selection on every task, then bias tuning on LoFiT's heads, on random heads, on ITI's
heads and on the heads of every other task, plus ITI and the untouched model, each evaluated
on the seed's own test subset), tests each claim on it (``claims_tests``) and reports the
result (``claims_report``). The claims:

1. Table 2: bias tuning on LoFiT's heads beats random heads, and ITI's heads, at the same K.
2. Fig. 2: task-specific heads beat heads transferred from another task.
3. Fig. 3: the selected heads concentrate in a contiguous band of layers, compared with
   random head sets of the same size.
4. Fig. 6: head sets overlap less across tasks than across seeds of one task.
5. Table 1: LoFiT beats ITI, and beats 0-shot.

Per-example outcomes are pooled over seeds: every pair in a test is a distinct example,
compared within its seed. The design's reasons: docs/claims.md; the test subsets and cells:
``claims_data``; the tests, families and verdicts: ``claims_tests``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from lofit_lens.analysis.claims_data import DEFAULT_TASKS, Log, collect_claims
from lofit_lens.analysis.claims_report import ClaimsReport, claims_report
from lofit_lens.analysis.claims_tests import (
    CLAIM_TESTS, ClaimTestOptions, beyond_lofit, finish_family,
)
from lofit_lens.methods.iti import ITIOptions

CLAIMS: dict[str, str] = {
    "1": "Table 2: bias tuning on LoFiT's heads beats random heads and ITI's heads, at the same K",
    "2": "Fig. 2: task-specific heads beat heads transferred from another task",
    "3": "Fig. 3: the selected heads concentrate in a contiguous band of layers (vs random sets)",
    "4": "Fig. 6: head sets overlap less across tasks than across seeds of one task",
    "5": "Table 1: LoFiT beats ITI, and beats 0-shot",
}


def replicate_claims(
    model,
    tasks: Sequence[str] = DEFAULT_TASKS,
    selection_tasks: Optional[Sequence[str]] = None,
    budget: str = "claims-quick",
    seeds: Sequence[int] = (0, 1, 2),
    cache_dir: Union[str, Path] = "analysis_out/cache",
    k: Union[int, float, None] = None,
    n_test: Optional[int] = None,
    task_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    alpha: float = 0.05,
    n_bootstrap: int = 2000,
    n_permutations: int = 20_000,
    n_draws: int = 10_000,
    options: ITIOptions = ITIOptions(),
    progress: bool = False,
    log: Optional[Log] = print,
    beyond: Sequence[str] = (),
    transfer: bool = True,
    **overrides,
) -> ClaimsReport:
    """Test the five claims (module docstring) on ``model``.

    ``tasks``: the tasks evaluated (claims 1, 2, 5; names or task files); ``selection_tasks``
    (default: ``tasks``): the tasks whose head sets claims 3 and 4 compare (selection only,
    no evaluation: a superset of ``tasks``). ``budget``: a name of ``lofit_lens.budgets``;
    its ``max_eval_examples`` (or ``n_test``) is the size of each seed's test subset.
    ``tasks=()``: head selections only (claims 3 and 4; Holm across those two rows).
    ``k``: heads (a count or a share; default the budget's, else 3%). ``task_overrides``:
    ``LoFiTConfig`` fields per task (by name); ``overrides``: for every task. ``beyond``:
    methods beyond the paper's (e.g. ``("jola", "reft", "repe")``) run on the same seeds and
    test subsets and compared with LoFiT (two-sided paired tests, Holm: the "beyond" rows
    of ``details``). ``transfer=False``: claim 2's transfer cells are skipped (claim 2 not
    tested), which saves one tuning per task, seed and other task.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    say = log or (lambda message: None)
    data = collect_claims(model, tasks, selection_tasks, budget, seeds, cache_dir, k, n_test,
                          task_overrides, options, progress, say, beyond, transfer,
                          **overrides)
    test_options = ClaimTestOptions(alpha, n_bootstrap, n_permutations, n_draws)
    tested = [test(data, test_options, say) for test in CLAIM_TESTS]
    claims = finish_family([row for rows in tested for row in rows.claims], alpha)
    details = [row for rows in tested for row in rows.details] + beyond_lofit(data, test_options)
    report = claims_report(data, claims, details, alpha, n_bootstrap)
    report.seconds = {data.model: round(time.perf_counter() - start, 1),
                      f"{data.model} cpu": round(time.process_time() - cpu_start, 1)}
    say(f"[{data.model}] claims done in {report.seconds[data.model]:.0f} s")
    return report
