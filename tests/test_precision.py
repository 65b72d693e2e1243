"""bf16 models: the intervention's A and v stay fp32 parameters, the loss is fp32, and exact
match under bf16 is within noise of fp32 (docs/scale.md, docs/gpu.md#bf16).

``pytest tests/test_precision.py -m benchmark -s`` measures the three variants on SmolLM2 and
CLUTRR that docs/gpu.md quotes: fp32; a bf16 model with fp32 A and v (lofit-lens); a bf16
model with A and v in bf16, as the authors' code kept them for its bf16 models."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def bf16_tiny(tmp_path_factory):
    """The conftest's tiny Llama saved as an HF folder and loaded in bf16 by ``load_model``."""
    sys.path.insert(0, str(TESTS))
    from conftest import char_tokenizer, tiny_llama
    from lofit_lens import load_model

    folder = tmp_path_factory.mktemp("tiny-bf16")
    tiny_llama(char_tokenizer(folder)).save_pretrained(folder)
    return load_model(str(folder), device="cpu", dtype=torch.bfloat16)


@pytest.mark.tl3
def test_bf16_model_trains_fp32_parameters_with_an_fp32_loss(bf16_tiny, tiny_task_file):
    from lofit_lens.intervention import HeadIntervention
    from lofit_lens.tasks import get_task
    from lofit_lens.training import TrainingSet, resolve_run, tune_biases

    assert next(bf16_tiny.parameters()).dtype == torch.bfloat16
    task, cfg = resolve_run(str(tiny_task_file), None, dict(max_train_examples=8,
                                                             max_val_examples=0, batch_size=4))
    data = TrainingSet.build(bf16_tiny, task, cfg)
    iv = HeadIntervention.for_model(bf16_tiny, use_scale=True).set_heads([(0, 1), (2, 3)])
    iv.init_normal(1e-2, torch.Generator().manual_seed(0))
    seen = []
    edit = HeadIntervention.edit

    def spy(self, z, layer):
        out = edit(self, z, layer)
        seen.append((z.dtype, out.dtype))
        return out

    HeadIntervention.edit = spy
    try:
        with iv.attach(bf16_tiny):
            loss = data.train.loss(bf16_tiny, [0, 1, 2, 3])
            loss.backward()
    finally:
        HeadIntervention.edit = edit
    assert seen and all(z == out == torch.bfloat16 for z, out in seen)  # the forward runs in bf16
    assert loss.dtype == torch.float32  # log-softmax over fp32 logits
    for p in (iv.scale, iv.bias):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        assert p.grad[0, 1].abs().sum() > 0 and p.grad[0, 0].abs().sum() == 0  # masked heads: 0
    tuned = tune_biases(bf16_tiny, get_task(str(tiny_task_file)), [(1, 2)], config=cfg,
                        progress=False, epochs_bias=1)
    assert tuned.intervention.bias.dtype == torch.float32
    assert all(math.isfinite(x) for x in tuned.history.step_loss)


def _run(model, task: str, variant: str, **settings) -> dict:
    """LoFiT on ``model``; ``variant="bf16-params"``: A and v held in bf16 (the authors')."""
    import lofit_lens as ll
    from lofit_lens import training
    from lofit_lens.intervention import HeadIntervention

    class BF16Parameters(HeadIntervention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scale.data = self.scale.data.to(torch.bfloat16)
            self.bias.data = self.bias.data.to(torch.bfloat16)

    saved = training.HeadIntervention
    if variant == "bf16-params":
        training.HeadIntervention = BF16Parameters
    try:
        start = time.perf_counter()
        result = ll.lofit(model, task, progress=False, **settings)
    finally:
        training.HeadIntervention = saved
    split = result.config.eval_splits[0]
    return {"variant": variant, "seconds": round(time.perf_counter() - start, 1),
            "zero_shot": result.metrics.get("zero_shot", {}).get(split, {}).get("exact_match"),
            "lofit": result.metrics["lofit"][split]["exact_match"],
            "n": result.metrics["lofit"][split]["n"], "heads": result.selected_heads,
            "final_tune_loss": result.history.tune.step_loss[-1],
            "correct": [row["correct"] for row in result.predictions[f"lofit/{split}"]],
            "bias": result.bias.float()}


def _within_noise(a: dict, b: dict) -> bool:
    """Two exact-match rates on the same examples differ by at most two standard errors of a
    difference of proportions (plus one example)."""
    p, n = (a["lofit"] + b["lofit"]) / 2, a["n"]
    return abs(a["lofit"] - b["lofit"]) <= 2 * math.sqrt(2 * p * (1 - p) / n) + 1 / n


TINY_RUN = dict(max_train_examples=16, epochs=(1, 2), lr_bias=5e-2, max_val_examples=0,
                max_eval_examples=16, k=0.1)


@pytest.mark.slow
def test_bf16_exact_match_is_within_noise_of_fp32(smollm2, data_dir):
    """A tiny CLUTRR run on SmolLM2 (CPU), fp32 vs bf16 with fp32 A and v."""
    from lofit_lens import load_model

    fp32 = _run(smollm2, "clutrr", "fp32", **TINY_RUN)
    bf16 = _run(load_model("smollm2-135m", device="cpu", dtype=torch.bfloat16), "clutrr",
                "bf16", **TINY_RUN)
    assert _within_noise(fp32, bf16), (fp32["lofit"], bf16["lofit"])
    assert abs(bf16["final_tune_loss"] - fp32["final_tune_loss"]) < 0.15 * fp32["final_tune_loss"] + 0.05


@pytest.mark.benchmark
def test_measure_bf16_parameters(data_dir):
    """docs/gpu.md#bf16: fp32, bf16 (fp32 A and v), bf16 (bf16 A and v) on SmolLM2 / CLUTRR:
    24 training examples, epochs 1 + 2 (lr_bias 5e-2), K = 10%, 32 test examples (a 2-core
    CPU shared with other jobs; zero-shot in fp32 only)."""
    from lofit_lens import load_model

    settings = dict(max_train_examples=24, epochs=(1, 2), lr_bias=5e-2, max_val_examples=0,
                    max_eval_examples=32, k=0.1)
    runs = {}
    for variant, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16),
                           ("bf16-params", torch.bfloat16)):
        torch.manual_seed(0)
        runs[variant] = _run(load_model("smollm2-135m", device="cpu", dtype=dtype), "clutrr",
                             variant, zero_shot=variant == "fp32", **settings)
        print(json.dumps({k: v for k, v in runs[variant].items() if k not in ("correct", "bias")}),
              flush=True)
    ref = runs["fp32"]
    for variant, run in runs.items():
        disagree = sum(a != b for a, b in zip(run["correct"], ref["correct"]))
        row = {k: v for k, v in run.items() if k not in ("correct", "bias")}
        row.update(same_heads_as_fp32=run["heads"] == ref["heads"],
                   examples_differing_from_fp32=disagree,
                   v_max_abs_diff_from_fp32=float((run["bias"] - ref["bias"]).abs().max()),
                   v_max_abs=float(run["bias"].abs().max()))
        print(json.dumps(row))
    assert _within_noise(runs["fp32"], runs["bf16"])
