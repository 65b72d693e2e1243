"""The command line: the main job end to end (tiny budget, real SmolLM2) and bad input."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from lofit_lens.cli import main
from lofit_lens.result import LoFiTResult


@pytest.mark.slow
def test_run_writes_result_metrics_and_heatmap(tmp_path, smollm2, data_dir, capsys, monkeypatch):
    monkeypatch.setattr("lofit_lens.load_model", lambda *a, **k: smollm2)  # the session's model
    out = tmp_path / "run"
    rc = main(["run", "--task", "clutrr", "--k", "5", "--epochs", "1", "--max-train-examples", "8",
               "--max-val-examples", "4", "--max-eval-examples", "4", "--out", str(out), "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["zero_shot"]["n"] == metrics["lofit"]["n"] == 4
    assert 0 <= metrics["lofit"]["exact_match"] <= 1
    assert len(metrics["selected_heads"]) == 5 and metrics["trainable_parameters"] == 5 * 64
    assert {"heads.html", "result.json", "tensors.safetensors", "predictions.jsonl"} <= {
        p.name for p in out.iterdir()}
    assert LoFiTResult.load(out, model=smollm2).k == 5
    printed = capsys.readouterr().out
    assert "zero_shot test: exact_match=" in printed and "lofit     test: exact_match=" in printed


def test_unknown_task_is_a_clear_error(capsys):
    assert main(["run", "--task", "no-such-task", "--model", "smollm2-135m"]) == 2
    assert "Unknown task 'no-such-task'" in capsys.readouterr().err


def test_malformed_task_file_names_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"prompt": "Q: a? A:", "answer": "b"}\n{"prompt": "Q: c? A:"}\n')
    assert main(["run", "--task", str(bad), "--model", "smollm2-135m"]) == 2
    err = capsys.readouterr().err
    assert "mine.jsonl:2" in err and "answer" in err


def test_compare_writes_its_table(tmp_path, tiny_model, tiny_task_file, monkeypatch, capsys):
    monkeypatch.setattr("lofit_lens.load_model", lambda *a, **k: tiny_model)
    rc = main(["compare", "--task", str(tiny_task_file), "--methods", "zero_shot", "random",
               "--k", "2", "--epochs", "1", "--max-train-examples", "8", "--max-val-examples", "0",
               "--max-eval-examples", "4", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    assert {"compare.csv", "compare.md"} <= {p.name for p in tmp_path.iterdir()}
    printed = capsys.readouterr().out
    assert "| random |" in printed and "| zero_shot |" in printed


def subparser(name: str) -> argparse.ArgumentParser:
    """The parser of the command ``name`` (``lofit-lens name ...``)."""
    from lofit_lens.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def test_compare_takes_the_method_options(tmp_path, tiny_model, tiny_task_file, monkeypatch):
    """Every field of every method's options is a flag ``--<method>-<field>``, in a group per
    method, with its help; given ones reach their method's runs (and only their cards)."""
    compare_parser = subparser("compare")
    groups = {g.title: {a.dest: a for a in g._group_actions} for g in compare_parser._action_groups}
    lora = groups["lora options (LoRAOptions)"]
    assert set(lora) == {"lora_rank", "lora_alpha", "lora_dropout", "lora_lr"}
    assert lora["lora_rank"].help == "rank r of the W_Q and W_V updates (default: 8)"
    args = compare_parser.parse_args(["--task", "t", "--reft-layers", "0", "1", "--repe-layers", "2",
                                      "--jola-l0-lambda", "0.1"])
    assert args.reft_layers == [0, 1] and args.repe_layers == 2 and args.jola_l0_lambda == 0.1
    assert args.lora_rank is None  # not given: compare uses the field's default

    monkeypatch.setattr("lofit_lens.load_model", lambda *a, **k: tiny_model)
    rc = main(["compare", "--task", str(tiny_task_file), "--methods", "zero_shot", "iti", "--k", "2",
               "--max-train-examples", "8", "--max-eval-examples", "2", "--out", str(tmp_path),
               "--quiet", "--iti-alpha", "5", "--reft-layers", "0", "1", "--repe-layers", "2"])
    assert rc == 0
    card = json.loads((tmp_path / "runs" / "iti-seed0.json").read_text())
    assert card["settings"]["options"] == {"iti_alpha": 5.0}
    card = json.loads((tmp_path / "runs" / "zero_shot-seed0.json").read_text())
    assert card["settings"]["options"] == {}


def test_run_in_bfloat16_passes_the_doctor_and_logs_each_phase(tmp_path, tiny_task_file, capsys):
    """``--dtype bfloat16``: the model loads in bf16, the doctor passes it, the run finishes,
    and each phase and epoch is logged with its seconds although progress bars are off."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import char_tokenizer, tiny_llama

    folder = tmp_path / "tiny"
    tiny_llama(char_tokenizer(folder)).save_pretrained(folder)
    out = tmp_path / "run"
    rc = main(["run", "--task", str(tiny_task_file), "--model", str(folder), "--dtype", "bfloat16",
               "--device", "cpu", "--k", "2", "--epochs", "1", "2", "--max-train-examples", "8",
               "--max-val-examples", "0", "--max-eval-examples", "4", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lofit"]["n"] == 4 and metrics["peak_cuda_memory_gib"] is None
    assert re.search(r"doctor: \d+ checks passed", err)
    for phase in ("evaluate zero_shot (test)", "select", "tune", "evaluate lofit (test)"):
        assert f"lofit-lens: {phase}: started" in err and f"lofit-lens: {phase}: done in " in err
    assert "step 2: tune biases: epoch 2/2, 1 step, loss " in err
