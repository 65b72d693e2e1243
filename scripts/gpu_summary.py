"""Markdown of a ``scripts/gpu_check.sh`` run's folder: the benchmark tables, the doctor's
report and the main job's time per phase and peak memory.

    python scripts/gpu_summary.py OUT_DIR > OUT_DIR/summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import table  # noqa: E402


def bench_section(path: Path) -> list[str]:
    b = json.loads(path.read_text())
    paths = b["paths"]
    dims = b["dims"]
    lines = [f"### {b['model']}, {b['dtype']} on {b['device']} ({b['machine'].get('gpu', 'CPU')})",
             "",
             f"{dims['n_layers']} layers x {dims['n_heads']} heads of {dims['d_head']}; plain view "
             f"and reference run {b['attn_implementation']} attention; batch of {b['batch_rows']} "
             f"CLUTRR rows ({b['batch_tokens']} tokens); medians of {b['repeats']} alternated runs; "
             f"{b['date']}.", "",
             table(paths, b["device"] == "cuda"), "",
             f"- forward: loss difference {paths['forward']['loss_difference']:.2g}",
             f"- generation: texts equal {paths['generation']['texts_equal']}, "
             f"{paths['generation']['lofit_tokens_per_s']} vs {paths['generation']['hf_tokens_per_s']} tokens/s",
             f"- MC scoring: {paths['mc_scoring']['questions']} questions, {paths['mc_scoring']['answers']} "
             f"answers, max score difference {paths['mc_scoring']['max_score_difference']:.2g}",
             f"- frozen prefix used: {paths['step2_late_prefix']['prefix_used']} (from layer "
             f"{paths['step2_late_prefix']['first_layer']}, built in {paths['step2_late_prefix']['prefix_build_s']} s)",
             f"- load {b['load_s']} s; random-init build {b['build_s']} s", ""]
    return lines


def run_section(path: Path) -> list[str]:
    m = json.loads(path.read_text())
    c = m["config"]
    t = m["timings_seconds"]
    lines = [f"### lofit-lens run: {m['model_id']}", "",
             f"CLUTRR, k={m['k']} heads, epochs {c['epochs_select']} + {c['epochs_bias']}, lr "
             f"{c['lr_select']} / {c['lr_bias']}, lambda {c['l1_lambda']}, "
             f"{m['zero_shot']['n']} test examples; random weights (exact match is a wiring check: "
             f"{m['zero_shot']['exact_match']:.3f} -> {m['lofit']['exact_match']:.3f}).", "",
             "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in t.items()]
    if m.get("peak_cuda_memory_gib") is not None:
        lines += ["", f"Peak CUDA memory allocated by the run: {m['peak_cuda_memory_gib']} GiB."]
    return lines + [""]


def main(folder: str) -> None:
    out = Path(folder)
    lines = ["# GPU check", ""]
    env = out / "env.txt"
    if env.is_file():
        lines += ["```", env.read_text().strip(), "```", ""]
    for path in sorted(out.glob("bench-*.json")):
        lines += bench_section(path)
    for path in sorted(out.glob("doctor-*.txt")):
        lines += [f"### {path.stem}", "", "```", path.read_text().strip()[-4000:], "```", ""]
    for path in sorted(out.glob("run-*-metrics.json")):
        lines += run_section(path)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
