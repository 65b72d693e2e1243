"""lofit-lens's hot paths against a plain Hugging Face model doing the same work, in one run.

    python scripts/benchmark.py [--model smollm2-135m | --shape overhead|smollm2-135m|llama2-7b]
                                [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                [--repeats 7] [--out bench.json]
    python scripts/benchmark.py --result runs/clutrr-smollm2-135m-s0   # + evaluation vs the
                                                                       #   authors' loop

Paths, each timed for lofit-lens and for the plain-HF reference (``hf_reference.py``: a second
copy of the weights with the attention implementation of lofit-lens's plain view, the same
trainable tensors at each ``o_proj`` input), on the same batch (8 CLUTRR training rows),
device and dtype:

- forward: the training objective without grad, v on K = 3% random heads;
- step 1: A on every head + L1, forward + backward + AdamW;
- step 2: v on K = 3% random heads; and on K heads in the last 30% of layers, without and
  with the frozen prefix (built once, timed apart);
- generation: greedy, 16 new tokens for ``--gen-prompts`` CLUTRR test prompts, in batches of
  16 sorted by length, v attached (texts compared);
- MC scoring: shared-prefix scoring of ``--mc-questions`` TruthfulQA questions (6-shot
  prompts), v attached (scores compared).

Runs come in ``--repeats`` adjacent pairs, one of each side (order alternating), after a
warm-up; times are medians, and the ratio lofit-lens / HF is the median of the pairs' ratios
(a shared machine that slows down for a while slows both runs of a pair). On CUDA each
side's peak memory above the resident weights is reported too. ``--shape`` builds a
random-init model of that shape (SmolLM2's tokenizer): timings and memory are valid on random
weights, accuracy is not.
``overhead`` (32 layers of width 64) makes per-module overhead dominate on a CPU, as it does
on a GPU.

``--result RUN`` (a saved run of a real model and a generation task) also times
``ll.evaluate`` against the authors' simple loop on ``--reference-examples`` test prompts
with the same learned v: HF ``generate`` in batches of 16 in file order, no stop strings, v at
each ``o_proj`` input. Exact match must be identical. ``--main-job RUN`` reruns that run's
step 2 without and with the frozen prefix; ``--export`` times greedy decoding of an exported
model (v folded into the ``o_proj`` biases) against the base model.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_reference as ref  # noqa: E402

import lofit_lens as ll  # noqa: E402
from lofit_lens.backends.hooked import model_dims  # noqa: E402
from lofit_lens.backends.plain import plain_view  # noqa: E402
from lofit_lens.methods.selectors.uniform import random_heads  # noqa: E402
from lofit_lens.padding import collate  # noqa: E402
from lofit_lens.eval.mc_scoring import choice_scores  # noqa: E402
from lofit_lens.intervention import HeadIntervention  # noqa: E402
from lofit_lens.objectives import build_objective  # noqa: E402
from lofit_lens.prefix import frozen_prefix  # noqa: E402
from lofit_lens.versions import library_versions  # noqa: E402

K_FRACTION = 0.03
NEW_TOKENS = 16
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, rms_norm_eps=1e-5,
                      max_position_embeddings=4096, tie_word_embeddings=False),
    "overhead": dict(hidden_size=64, num_hidden_layers=32, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=128, rms_norm_eps=1e-5,
                     max_position_embeddings=4096, tie_word_embeddings=False),
    "smollm2-135m": None,  # the tokenizer folder's own config.json
}
"""Random-init shapes: Llama-2-7B's (the paper's model), a CPU proxy for per-module overhead,
and SmolLM2-135M's."""


# ---------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(device: torch.device, repeats: int, ours, theirs) -> dict:
    """Median seconds of ``ours`` and ``theirs`` over ``repeats`` pairs of adjacent runs (after
    one warm-up each; the order inside a pair alternates), and the median of the pairs'
    ratios: a shared machine that slows down for a while slows both runs of a pair. On CUDA
    also each one's peak memory above what was allocated before it."""
    out = {}
    for label, fn in (("lofit", ours), ("hf", theirs)):  # warm-up + peak memory
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        if device.type == "cuda":
            out[f"{label}_peak_extra_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)

    def seconds(fn) -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"lofit": [], "hf": []}
    for i in range(repeats):
        order = (("lofit", ours), ("hf", theirs))
        for label, fn in order if i % 2 == 0 else order[::-1]:
            times[label].append(seconds(fn))
    out["lofit_s"] = round(statistics.median(times["lofit"]), 5)
    out["hf_s"] = round(statistics.median(times["hf"]), 5)
    out["ratio"] = round(statistics.median(a / b for a, b in zip(times["lofit"], times["hf"])), 3)
    return out


# ---------------------------------------------------------------------------- models
def tokenizer_folder(path: str | None) -> Path:
    if path:
        return Path(path)
    from lofit_lens.backends.hf import embedded_hf_folder

    return embedded_hf_folder("smollm2-135m")


def random_model_folder(shape: str, tokenizer: Path, device: str, dtype: torch.dtype,
                        root: Path) -> Path:
    """A random-init HF folder of ``shape`` with ``tokenizer``'s files (seed 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer)
    if SHAPES[shape] is None:
        config = AutoConfig.from_pretrained(tokenizer)
    else:
        ids = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        config = LlamaConfig(vocab_size=len(tok), **SHAPES[shape], **ids)
        config.architectures = ["LlamaForCausalLM"]
    folder = root / shape
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return folder


# ---------------------------------------------------------------------------- the paths
class Bench:
    """One model loaded through lofit-lens and once more as plain HF, with the batch and the
    interventions every path shares."""

    def __init__(self, name: str, device: str, dtype: torch.dtype, data_dir: str | None):
        extra = {"data_dir": data_dir} if data_dir else {}
        self.device = torch.device(device)
        start = time.perf_counter()
        self.model = ll.load_model(name, device=device, dtype=dtype)
        self.load_s = time.perf_counter() - start
        view = plain_view(self.model)
        self.attn = view.attn_implementation if view is not None else "bridge"
        self.hf, self.tok = ll.load_hf(name, device=device, dtype=dtype,
                                       attn_implementation=None if view is None else self.attn)
        for p in self.hf.parameters():
            p.requires_grad_(False)
        self.dims = model_dims(self.model)
        self.task = ll.get_task("clutrr", **extra)
        train = self.task.training_examples(self.task.train_examples(seed=0, max_examples=8))
        self.objective = build_objective(self.model, train, dpo_beta=0.5)
        self.rows = list(range(len(self.objective)))
        self.batch = collate(self.objective.pairs, self.objective.pad).to(self.device)
        k = max(1, round(K_FRACTION * self.dims.total_heads))
        self.random = random_heads(self.dims, k, seed=0)
        first = int(0.7 * self.dims.n_layers)
        late = [(l, h) for l in range(first, self.dims.n_layers) for h in range(self.dims.n_heads)]
        self.late = late[::max(1, len(late) // k)][:k]
        self.mc_task = ll.get_task("truthfulqa", protocol="clean", **extra)

    def intervention(self, heads, scale: bool) -> HeadIntervention:
        iv = HeadIntervention(self.dims, use_scale=scale, use_bias=not scale)
        iv.set_heads(heads).init_normal(1e-2, torch.Generator().manual_seed(1))
        return iv.to(self.device)

    def edits(self, iv: HeadIntervention):
        """The same tensors on the HF copy (the parameters themselves: gradients reach them)."""
        mask = iv.head_mask.to(self.device)
        return ref.head_edits(self.hf, mask, self.dims.d_head,
                              scale=iv.scale if iv.use_scale else None,
                              bias=iv.bias if iv.use_bias else None)

    def step_pair(self, iv: HeadIntervention, l1: float):
        """One optimiser step each: lofit-lens's objective on the hooked model, and the same
        loss on the HF copy; each side its own AdamW over its own copy of the tensors."""
        theirs_iv = copy.deepcopy(iv)
        ours_opt = torch.optim.AdamW(iv.trainable(), lr=1e-3)
        theirs_opt = torch.optim.AdamW(theirs_iv.trainable(), lr=1e-3)
        b = self.batch

        def penalty(module):
            return l1 * sum(p.abs().sum() for p in module.l1_parameters()) if l1 else 0.0

        def ours():
            ours_opt.zero_grad(set_to_none=True)
            loss = self.objective.loss(self.model, self.rows) + penalty(iv)
            loss.backward()
            ours_opt.step()
            return float(loss.detach())

        def theirs():
            theirs_opt.zero_grad(set_to_none=True)
            with self.edits(theirs_iv):
                loss = ref.target_loss(self.hf, b.tokens, b.attention_mask, b.target_mask) + penalty(theirs_iv)
                loss.backward()
            theirs_opt.step()
            return float(loss.detach())

        return ours, theirs

    def paths(self, repeats: int, gen_prompts: int, mc_questions: int) -> dict:
        out = {}
        tune = self.intervention(self.random, scale=False)

        @torch.no_grad()
        def forward_ours():
            return float(self.objective.loss(self.model, self.rows))

        @torch.no_grad()
        def forward_theirs():
            with self.edits(tune):
                return float(ref.target_loss(self.hf, self.batch.tokens, self.batch.attention_mask,
                                             self.batch.target_mask))

        with tune.attach(self.model):
            out["forward"] = compare(self.device, repeats, forward_ours, forward_theirs)
            out["forward"]["loss_difference"] = abs(forward_ours() - forward_theirs())
        self.forward_s = out["forward"]["lofit_s"]
        select = self.intervention(None, scale=True)
        with select.attach(self.model):
            out["step1"] = compare(self.device, repeats, *self.step_pair(select, 1e-3))
        with tune.attach(self.model):
            out["step2_random"] = compare(self.device, repeats, *self.step_pair(tune, 0.0))
        late = self.intervention(self.late, scale=False)
        with late.attach(self.model):
            ours, theirs = self.step_pair(late, 0.0)
            out["step2_late"] = compare(self.device, repeats, ours, theirs)
            sync(self.device)
            start = time.perf_counter()
            with frozen_prefix(self.model, [self.objective], late.first_layer(), len(self.rows),
                               4096.0) as cached:
                sync(self.device)
                build = time.perf_counter() - start
                out["step2_late_prefix"] = compare(self.device, repeats, ours, theirs)
            out["step2_late_prefix"].update(prefix_used=bool(cached), prefix_build_s=round(build, 4),
                                            first_layer=late.first_layer())
        out["generation"] = self.generation(tune, repeats, gen_prompts)
        out["mc_scoring"] = self.mc_scoring(tune, repeats, mc_questions)
        return out

    def generation(self, tune: HeadIntervention, repeats: int, n_prompts: int) -> dict:
        prompts = [ex.prompt for ex in self.task.eval_examples("test", n_prompts)]
        results = {}

        def ours():
            results["ours"] = ll.generate(self.model, prompts, NEW_TOKENS, batch_size=16, progress=False)

        def theirs():
            with self.edits(tune):
                results["theirs"] = ref.greedy_texts(self.hf, self.tok, prompts, NEW_TOKENS, 16)

        with tune.attach(self.model):
            out = compare(self.device, repeats, ours, theirs)
        same = sum(a == b for a, b in zip(results["ours"], results["theirs"]))
        out.update(prompts=len(prompts), new_tokens=NEW_TOKENS, texts_equal=f"{same}/{len(prompts)}",
                   lofit_tokens_per_s=round(len(prompts) * NEW_TOKENS / out["lofit_s"], 1),
                   hf_tokens_per_s=round(len(prompts) * NEW_TOKENS / out["hf_s"], 1))
        return out

    def mc_scoring(self, tune: HeadIntervention, repeats: int, n_questions: int) -> dict:
        examples = self.mc_task.eval_examples("test", n_questions)
        results = {}

        def ours():
            results["ours"] = choice_scores(self.model, examples, batch_size=16, progress=False,
                                            share_prefix=True, protocol="clean")

        def theirs():  # tokenising is part of the work
            prompts = [self.tok(ex.prompt).input_ids for ex in examples]
            answers = [[self.tok(" " + c, add_special_tokens=False).input_ids for c in ex.choices]
                       for ex in examples]
            with self.edits(tune):
                results["theirs"] = ref.choice_scores(self.hf, self.tok, prompts, answers, 16)

        with tune.attach(self.model):
            out = compare(self.device, repeats, ours, theirs)
        gap = max(float((a - b).abs().max()) for a, b in zip(results["ours"], results["theirs"]))
        out.update(questions=len(examples), answers=sum(len(ex.choices) for ex in examples),
                   max_score_difference=gap)
        return out


# ---------------------------------------------------------------------------- vs the authors
def eval_vs_authors(bench: Bench, result_dir: str, n: int) -> dict:
    """``ll.evaluate`` vs the authors' simple loop (see the module docstring), same prompts and
    learned v; each run twice, alternating; the faster run of each."""
    result = ll.LoFiTResult.load(result_dir, model=bench.model)
    task = ll.get_task(result.config.task, protocol=result.config.protocol)
    examples = task.eval_examples("test", n)
    intervention = result.intervention()
    mask = result.selected_mask.to(bench.device)
    bias = result.bias.to(bench.device)
    times: dict[str, list[float]] = {"lofit": [], "authors": []}
    for _ in range(2):
        start = time.perf_counter()
        ours, rows = ll.evaluate(bench.model, task, examples, intervention, batch_size=16, progress=False)
        times["lofit"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with ref.head_edits(bench.hf, mask, bench.dims.d_head, bias=bias):
            texts = authors_loop(bench.hf, bench.tok, [ex.prompt for ex in examples],
                                 task.max_new_tokens, task.parse_with_prompt)
        hits = [task.is_correct(task.parse(t), ex) for t, ex in zip(texts, examples)]
        times["authors"].append(time.perf_counter() - start)
    differ = sum(row["correct"] != hit for row, hit in zip(rows, hits))
    if differ:
        raise SystemExit(f"benchmark: exact match differs from the authors' loop on {differ} of {n}")
    best = {k: min(v) for k, v in times.items()}
    return {"examples": n, "exact_match": ours["exact_match"], "exact_match_identical": True,
            "lofit_s": round(best["lofit"], 2), "authors_s": round(best["authors"], 2),
            "speedup": round(best["authors"] / best["lofit"], 2)}


@torch.no_grad()
def authors_loop(hf, tok, prompts: list[str], max_new_tokens: int, with_prompt: bool,
                 batch: int = 16) -> list[str]:
    """The authors' evaluation: batches of 16 in file order, left-padded, no stop strings;
    whole rows decoded (``with_prompt``) or the new tokens."""
    tok.padding_side = "left"
    texts = []
    device = next(hf.parameters()).device
    for start in range(0, len(prompts), batch):
        enc = tok(prompts[start:start + batch], return_tensors="pt", padding=True).to(device)
        out = hf.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=tok.pad_token_id)
        texts += tok.batch_decode(out if with_prompt else out[:, enc.input_ids.shape[1]:],
                                  skip_special_tokens=True)
    return texts


# ---------------------------------------------------------------------------- frozen prefix, export
def main_job_step2(bench: Bench, result_dir: str) -> dict:
    """Step 2 of a saved run (same heads, config and data) without and with the frozen-prefix
    cache: time, largest difference in v, exact match of each; and the speed-up its lowest
    layer allows (the per-step forward below it, estimated from this run's no-grad forward,
    removed)."""
    import dataclasses

    from lofit_lens.training import TrainingSet, tune_biases

    model = bench.model
    result = ll.LoFiTResult.load(result_dir, model=model)
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
                                 tuned.intervention, cfg.eval_batch_size, progress=False,
                                 max_batch_tokens=cfg.eval_batch_tokens)
        runs[label] = (seconds, tuned, metrics)
    (t_u, tuned_u, m_u), (t_c, tuned_c, m_c) = runs["uncached"], runs["cached"]
    l0 = tuned_c.history.frozen_prefix_layer
    steps = len(tuned_u.history.step_loss)
    forward_s = bench.forward_s
    below = forward_s * l0 / bench.dims.n_layers * steps  # forward below l0, over the steps
    return {"lowest_layer": l0, "uncached_s": round(t_u, 1), "cached_s": round(t_c, 1),
            "speedup": round(t_u / t_c, 2), "speedup_allowed": round(t_u / max(t_u - below, 1e-9), 2),
            "max_abs_v_difference": float((tuned_u.bias - tuned_c.bias).abs().max()),
            "exact_match_uncached": m_u["exact_match"], "exact_match_cached": m_c["exact_match"]}


def export_overhead(bench: Bench, repeats: int, new_tokens: int = 64) -> dict:
    """Per-token greedy decoding time of an exported LoFiT model (v folded into the o_proj
    biases) over the base HF model: same prompt, ``new_tokens`` forced, runs alternated."""
    from transformers import AutoModelForCausalLM

    from lofit_lens.export import export_intervention

    module = HeadIntervention(bench.dims, use_scale=False).set_heads(bench.random).init_normal(1e-2)
    ids = bench.tok("The capital of France is", return_tensors="pt").input_ids.to(bench.device)
    with tempfile.TemporaryDirectory() as folder:
        exported = AutoModelForCausalLM.from_pretrained(
            export_intervention(module, bench.model, folder)).to(bench.device).eval()

    def decode(m):
        return lambda: m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False)

    with torch.no_grad():
        out = compare(bench.device, repeats, decode(exported), decode(bench.hf))
    return {"exported_s_per_token": round(out["lofit_s"] / new_tokens, 5),
            "base_s_per_token": round(out["hf_s"] / new_tokens, 5), "ratio": out["ratio"]}


# ---------------------------------------------------------------------------- report
ROWS = (("forward", "forward, no grad"), ("step1", "step 1 (A on all heads + L1)"),
        ("step2_random", "step 2, K = 3% random heads"), ("step2_late", "step 2, late heads"),
        ("step2_late_prefix", "step 2, late heads, frozen prefix"),
        ("generation", f"greedy generation ({NEW_TOKENS} new tokens, batches of 16)"),
        ("mc_scoring", "MC scoring (shared prefix, batch 16)"))


def table(paths: dict, cuda: bool) -> str:
    head = "| path | lofit-lens s | plain HF s | lofit / HF |" + (" peak extra MiB lofit / HF |" if cuda else "")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for key, label in ROWS:
        p = paths[key]
        line = f"| {label} | {p['lofit_s']:.4f} | {p['hf_s']:.4f} | {p['ratio']:.3f} |"
        if cuda:
            line += f" {p.get('lofit_peak_extra_mib', '-')} / {p.get('hf_peak_extra_mib', '-')} |"
        lines.append(line)
    return "\n".join(lines)


def machine(device: torch.device) -> dict:
    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            **{k: v for k, v in library_versions().items() if k in ("transformers", "transformer-lens")}}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--model", help="embedded name, Hub id or HF folder (default smollm2-135m)")
    what.add_argument("--shape", choices=list(SHAPES), help="a random-init model of this shape")
    parser.add_argument("--tokenizer", help="HF folder with the tokenizer (and, for --shape "
                        "smollm2-135m, the config) of a random-init shape (default: the "
                        "embedded SmolLM2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--gen-prompts", type=int, default=64, help="CLUTRR test prompts to generate for")
    parser.add_argument("--mc-questions", type=int, default=24, help="TruthfulQA questions to score")
    parser.add_argument("--data-dir", help="folder with the LoFiT splits (default: lofit-lens's)")
    parser.add_argument("--result", help="a saved run: also time evaluation against the authors' loop")
    parser.add_argument("--reference-examples", type=int, default=200)
    parser.add_argument("--main-job", help="a saved run: its step 2 again without and with the "
                        "frozen-prefix cache (time, v, exact match)")
    parser.add_argument("--export", action="store_true",
                        help="also time greedy decoding of an exported LoFiT model vs the base model")
    parser.add_argument("--models-dir", help="where random-init folders go (default: a temporary folder)")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    scratch = None
    name = args.model or "smollm2-135m"
    start = time.perf_counter()
    if args.shape:
        root = Path(args.models_dir) if args.models_dir else Path(scratch := tempfile.mkdtemp(prefix="lofit-bench-"))
        name = str(random_model_folder(args.shape, tokenizer_folder(args.tokenizer), args.device, dtype, root))
    build_s = time.perf_counter() - start
    try:
        bench = Bench(name, args.device, dtype, args.data_dir)
        paths = bench.paths(args.repeats, args.gen_prompts, args.mc_questions)
        results = {
            "model": args.shape and f"random-init {args.shape} shape" or name,
            "device": args.device, "dtype": args.dtype, "attn_implementation": bench.attn,
            "dims": bench.dims._asdict(), "batch_rows": len(bench.rows),
            "batch_tokens": int(bench.batch.attention_mask.sum()), "repeats": args.repeats,
            "build_s": round(build_s, 2), "load_s": round(bench.load_s, 2), "paths": paths,
            **({"eval_vs_authors": eval_vs_authors(bench, args.result, args.reference_examples)}
               if args.result else {}),
            **({"main_job_step2": main_job_step2(bench, args.main_job)} if args.main_job else {}),
            **({"export": export_overhead(bench, args.repeats)} if args.export else {}),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "machine": machine(bench.device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"{results['model']}: {args.dtype} on {args.device} ({bench.attn} attention), "
          f"{results['batch_tokens']} tokens per batch")
    print(table(paths, bench.device.type == "cuda"))
    for key in ("forward", "generation", "mc_scoring"):
        extra = {k: v for k, v in paths[key].items() if k not in ("lofit_s", "hf_s", "ratio")}
        print(f"{key}: {extra}")
    for key, label in (("eval_vs_authors", "evaluation vs the authors' loop"),
                       ("main_job_step2", "main job's step 2 without / with the frozen prefix"),
                       ("export", "exported model vs the base model, greedy decoding")):
        if key in results:
            print(f"{label}: {results[key]}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
