"""Speed and memory of LoFiT's hot paths on a real model (default: embedded SmolLM2).

    python scripts/benchmark.py [--model smollm2-135m] [--task clutrr] [--repeats 5] [--out bench.json]

Measures, on real task batches (batch 8, the task's own prompts):
- step 1 (A on all heads + L1) and step 2 (v on 10% of heads) forward+backward+AdamW time;
- step 2 on 10% of heads all in the last 30% of layers, without and with the frozen-prefix
  cache (its one-off build timed apart);
- teacher-forced validation forward time per batch;
- greedy generation throughput (examples/s, batch 16, KV cache, intervention attached);
- peak resident memory of the process;
- with ``--main-job RUN_DIR``: that run's step 2 again without and with the frozen-prefix
  cache (time, v, exact match), and the speed-up its lowest layer allows;
- with ``--export``: per-token greedy decoding time of an exported LoFiT model (v folded into
  the o_proj biases) over the base HF model.
Training and validation times are also printed as ratios to a plain no-grad forward of the
same batch, measured in the same run.
Medians over ``--repeats`` after one warm-up. Prints a table and writes JSON with the machine.

With ``--result DIR`` (a saved run of the same model and a generation task, e.g. the main
job's ``runs/clutrr-smollm2-135m-s0``) it also times ``ll.evaluate`` against a simple
reference on the same ``--reference-examples`` test prompts and the same learned v: a plain
HF ``generate`` loop as the authors' evaluation code does it (batch 16 in file order, the
task's max new tokens, no stop strings, v added at each ``o_proj`` input by a forward
pre-hook), parsed and scored by the same task code. Both run once each, in turns, twice;
the ratio is of the faster run of each. Exact match must be identical. It also reports
TruthfulQA MC scoring in questions/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch

import lofit_lens as ll
from lofit_lens.backends.hooked import model_dims
from lofit_lens.intervention import HeadIntervention
from lofit_lens.objectives import build_objective
from lofit_lens.prefix import frozen_prefix
from lofit_lens.baselines.selectors import random_heads
from lofit_lens.training import train_intervention
from lofit_lens.versions import library_versions


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_step(model, objective, intervention: HeadIntervention, l1: float):
    """One optimizer step of the library's own loop (one batch: the whole objective)."""
    return lambda: train_intervention(model, intervention, objective, None, epochs=1, lr=1e-3,
                                      l1_lambda=l1, batch_size=len(objective), seed=0,
                                      progress=False)


def _o_proj_bias_hooks(hf_model, bias: torch.Tensor, mask: torch.Tensor) -> list:
    """The reference's edit: v of the selected heads added to each layer's o_proj input
    (``[batch, pos, n_heads * d_head]``, head-major like hook_z flattened)."""
    handles = []
    for layer in mask.any(dim=1).nonzero().flatten().tolist():
        vec = (bias[layer] * mask[layer, :, None]).flatten()
        o_proj = hf_model.model.layers[layer].self_attn.o_proj
        handles.append(o_proj.register_forward_pre_hook(lambda m, args, v=vec: (args[0] + v,)))
    return handles


@torch.no_grad()
def reference_generate(hf_model, tok, prompts: list[str], max_new_tokens: int,
                       with_prompt: bool, batch: int = 16) -> list[str]:
    """A plain HF generate loop: batches of 16 in file order, left-padded, no stop strings;
    whole rows decoded (``with_prompt``, as the authors' code does) or the new tokens."""
    tok.padding_side = "left"
    texts = []
    for start in range(0, len(prompts), batch):
        enc = tok(prompts[start:start + batch], return_tensors="pt", padding=True)
        out = hf_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id)
        texts += tok.batch_decode(out if with_prompt else out[:, enc.input_ids.shape[1]:],
                                  skip_special_tokens=True)
    return texts


def eval_vs_reference(model, name: str, result_dir: str, n: int) -> dict:
    """``ll.evaluate`` vs the reference loop, same prompts and v (see the module docstring)."""
    result = ll.LoFiTResult.load(result_dir, model=model)
    task = ll.get_task(result.config.task, protocol=result.config.protocol)
    examples = task.eval_examples("test", n)
    intervention = result.intervention()
    hf_model, tok = ll.load_hf(name, device="cpu")
    times = {"lofit_lens": [], "reference": []}
    for _ in range(2):
        start = time.perf_counter()
        ours, rows = ll.evaluate(model, task, examples, intervention, batch_size=16, progress=False)
        times["lofit_lens"].append(time.perf_counter() - start)
        handles = _o_proj_bias_hooks(hf_model, result.bias, result.selected_mask)
        start = time.perf_counter()
        texts = reference_generate(hf_model, tok, [ex.prompt for ex in examples], task.max_new_tokens,
                                   task.parse_with_prompt)
        ref_hits = [task.is_correct(task.parse(t), ex) for t, ex in zip(texts, examples)]
        times["reference"].append(time.perf_counter() - start)
        for handle in handles:
            handle.remove()
    ours_hits = [row["correct"] for row in rows]
    if ours_hits != ref_hits:
        raise SystemExit(f"benchmark: exact match differs from the reference on "
                         f"{sum(a != b for a, b in zip(ours_hits, ref_hits))} of {n} examples")
    best = {k: min(v) for k, v in times.items()}
    return {"reference_examples": n, "exact_match": ours["exact_match"],
            "exact_match_identical": True,
            "eval_seconds": round(best["lofit_lens"], 2),
            "reference_eval_seconds": round(best["reference"], 2),
            "eval_speedup_vs_reference": round(best["reference"] / best["lofit_lens"], 2)}


def mc_questions_per_second(model, n: int) -> dict:
    task = ll.get_task("truthfulqa")
    examples = task.eval_examples("test", n)
    start = time.perf_counter()
    ll.evaluate(model, task, examples, batch_size=16, progress=False)
    return {"mc_questions": n,
            "mc_questions_per_second": round(n / (time.perf_counter() - start), 2)}


def late_heads_step(model, objective, rows, repeats: int) -> dict:
    """Step 2 on heads all in the last 30% of layers, one optimiser step per call, without
    and with the frozen-prefix cache (built once, timed apart)."""
    dims = model_dims(model)
    first = int(0.7 * dims.n_layers)
    heads = [(layer, h) for layer in range(first, dims.n_layers) for h in range(dims.n_heads)]
    heads = heads[::max(1, len(heads) // round(0.1 * dims.total_heads))][:round(0.1 * dims.total_heads)]
    tune = HeadIntervention(dims, use_scale=False).set_heads(heads).init_normal(1e-3)
    optimizer = torch.optim.AdamW(tune.trainable(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        objective.loss(model, rows).backward()
        optimizer.step()

    out = {"late_heads_layers": f"{tune.first_layer()}-{dims.n_layers - 1}"}
    with tune.attach(model):
        out["step2_late_heads"] = _median_seconds(step, repeats)
        start = time.perf_counter()
        with frozen_prefix(model, [objective], tune.first_layer(), len(rows), 1024.0) as cached:
            out["prefix_build"] = time.perf_counter() - start
            assert cached, "the frozen prefix was not used"
            out["step2_late_heads_cached"] = _median_seconds(step, repeats)
    return out


def main_job_step2(model, result_dir: str, forward_s: float, batch_tokens: int) -> dict:
    """Step 2 of a saved run (same heads, config and data) without and with the frozen-prefix
    cache: time, largest difference in v, exact match of each; and the speed-up its lowest
    layer allows (the per-step forward below it, estimated from a plain forward, removed)."""
    import dataclasses

    from lofit_lens.result import LoFiTResult
    from lofit_lens.training import TrainingSet, tune_biases

    result = LoFiTResult.load(result_dir, model=model)
    cfg = result.config
    task = ll.get_task(cfg.task, protocol=cfg.protocol, **cfg.extra)
    data = TrainingSet.build(model, task, cfg)
    runs = {}
    for label, budget in (("uncached", 0.0), ("cached", max(cfg.prefix_cache_mb, 1024.0))):
        start = time.perf_counter()
        tuned = tune_biases(model, task, result.selected_heads, progress=False, data=data,
                            config=dataclasses.replace(cfg, prefix_cache_mb=budget))
        seconds = time.perf_counter() - start
        metrics, _ = ll.evaluate(model, task, task.eval_examples("test", cfg.max_eval_examples),
                                 tuned.intervention, progress=False)
        runs[label] = (seconds, tuned, metrics)
    (t_u, tuned_u, m_u), (t_c, tuned_c, m_c) = runs["uncached"], runs["cached"]
    dims = model_dims(model)
    l0 = tuned_c.history.frozen_prefix_layer
    steps = len(tuned_u.history.step_loss)
    below = forward_s * l0 / dims.n_layers * steps  # forward below l0, summed over the steps
    return {"main_job_lowest_layer": l0, "main_job_step2_uncached_seconds": round(t_u, 1),
            "main_job_step2_cached_seconds": round(t_c, 1),
            "main_job_step2_speedup": round(t_u / t_c, 2),
            "main_job_step2_speedup_allowed": round(t_u / max(t_u - below, 1e-9), 2),
            "main_job_max_abs_v_difference": float((tuned_u.bias - tuned_c.bias).abs().max()),
            "main_job_exact_match_uncached": m_u["exact_match"],
            "main_job_exact_match_cached": m_c["exact_match"],
            "main_job_note": f"forward below layer {l0} estimated as {l0}/{dims.n_layers} of a "
                             f"plain forward of {batch_tokens} tokens per step"}


def export_overhead(model, name: str, heads, repeats: int, new_tokens: int = 64) -> dict:
    """Per-token greedy decoding time of the exported LoFiT model over the base HF model
    (same prompt, ``new_tokens`` forced, runs alternated; medians)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from lofit_lens.backends.hf import load_hf
    from lofit_lens.export import export_intervention

    module = HeadIntervention(model_dims(model), use_scale=False).set_heads(heads).init_normal(1e-2)
    base, tok = load_hf(name, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        exported = AutoModelForCausalLM.from_pretrained(export_intervention(module, model, folder)).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    times: dict[str, list[float]] = {"base": [], "exported": []}
    with torch.no_grad():
        for _ in range(repeats + 1):
            for label, m in (("base", base), ("exported", exported)):
                start = time.perf_counter()
                m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                times[label].append((time.perf_counter() - start) / new_tokens)
    base_s, exp_s = (statistics.median(times[k][1:]) for k in ("base", "exported"))
    return {"export_base_seconds_per_token": round(base_s, 4),
            "export_exported_seconds_per_token": round(exp_s, 4),
            "export_vs_base": round(exp_s / base_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="clutrr")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--result", help="a saved run to compare evaluation with the reference loop")
    parser.add_argument("--reference-examples", type=int, default=200)
    parser.add_argument("--mc-questions", type=int, default=48)
    parser.add_argument("--main-job", help="a saved run (e.g. runs/clutrr-smollm2-135m-s0): "
                        "its step 2 again without and with the frozen-prefix cache")
    parser.add_argument("--export", action="store_true",
                        help="also time greedy decoding of an exported LoFiT model vs the base model")
    args = parser.parse_args()

    start = time.perf_counter()
    model = ll.load_model(args.model, device="cpu")
    load_seconds = time.perf_counter() - start
    task = ll.get_task(args.task)
    train = task.training_examples(task.train_examples(seed=0, max_examples=8))
    objective = build_objective(model, train, dpo_beta=0.5)
    rows = list(range(len(objective)))
    dims = model_dims(model)

    select = HeadIntervention(dims, use_bias=False).set_heads(None).init_normal(1e-3)
    heads = random_heads(dims, round(0.1 * dims.total_heads), seed=0)
    tune = HeadIntervention(dims, use_scale=False).set_heads(heads).init_normal(1e-3)

    def validate():
        with torch.no_grad(), tune.attach(model):
            objective.loss(model, rows)

    def forward():  # the reference every training figure is a ratio of
        with torch.no_grad():
            objective.loss(model, rows)

    examples = task.eval_examples("test", args.eval_examples)
    gen_seconds = _median_seconds(lambda: ll.evaluate(model, task, examples, tune, progress=False),
                                  max(1, args.repeats // 2))
    forward_s = _median_seconds(forward, args.repeats)
    timed = {"step1_select": _median_seconds(_train_step(model, objective, select, 1e-3), args.repeats),
             "step2_bias": _median_seconds(_train_step(model, objective, tune, 0.0), args.repeats),
             "validation_batch": _median_seconds(validate, args.repeats)}
    late = late_heads_step(model, objective, rows, args.repeats)
    late_layers = late.pop("late_heads_layers")
    timed.update(late)
    tokens = int(sum(len(p) + len(c) for p, c in getattr(objective, "pairs", [])))
    results = {
        "model": args.model, "task": args.task, "batch_size": len(rows),
        "tokens_per_batch": tokens,
        "load_model_seconds": round(load_seconds, 2),
        "forward_seconds": round(forward_s, 3),
        "late_heads_layers": late_layers,
        **{f"{k}_seconds": round(v, 3) for k, v in timed.items()},
        **{f"{k}_vs_forward": round(v / forward_s, 2) for k, v in timed.items()},
        "eval_examples_per_second": round(len(examples) / gen_seconds, 2),
        **(eval_vs_reference(model, args.model, args.result, args.reference_examples)
           if args.result else {}),
        **mc_questions_per_second(model, args.mc_questions),
        **(export_overhead(model, args.model, heads, args.repeats) if args.export else {}),
        **(main_job_step2(model, args.main_job, forward_s, tokens) if args.main_job else {}),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    **{k: v for k, v in library_versions().items() if k in ("transformers", "transformer-lens")}},
    }
    for key, value in results.items():
        if key != "machine":
            print(f"{key:28s} {value}")
    print(f"{'machine':28s} {results['machine']}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
