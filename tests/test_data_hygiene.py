"""Data hygiene: duplicate rows and train/test overlap are named (file:line), counted in
metrics, and with ``strict_data`` stop a run before any model work."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from lofit_lens.config import NON_RESULT_FIELDS, LoFiTConfig
from lofit_lens.errors import ConfigError, DataError, DataWarning, LoFiTLensError
from lofit_lens.tasks import FileTask, GenerationExample, Task, TaskHyperparams, get_task
from lofit_lens.tasks.base import default_data_dir
from lofit_lens.tasks.hygiene import MAX_SHOWN, check_data, data_report


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(n: int, split: str, start: int = 0) -> list[dict]:
    return [{"prompt": f"Q: {i} + 1? A:", "answer": f" {i + 1}", "split": split}
            for i in range(start, start + n)]


@pytest.fixture
def leaky(tmp_path) -> Path:
    """Line 3 repeats line 1 (train); line 7 (test) asks line 2's question, another answer."""
    rows = _rows(2, "train") + [dict(_rows(1, "train")[0])] + _rows(3, "train", 10) \
        + [{"prompt": "Q:  1 + 1?\tA: ", "answer": " two", "split": "test"}] + _rows(2, "test", 20)
    return _jsonl(tmp_path / "leaky.jsonl", rows)


@pytest.fixture
def clean(tmp_path) -> Path:
    return _jsonl(tmp_path / "clean.jsonl", _rows(6, "train") + _rows(2, "val", 10)
                  + _rows(2, "test", 20))


def test_duplicate_and_overlap_warn_naming_file_and_line(leaky):
    task = FileTask(leaky)
    with pytest.warns(DataWarning) as caught:
        counts = check_data(task)
    assert counts == {"duplicates": 1, "train_val_overlap": 0, "train_test_overlap": 1}
    (warning,) = caught
    message = str(warning.message)
    assert f"{leaky}:3 (train) repeats {leaky}:1" in message
    assert f"{leaky}:7 (test) has the prompt of training row {leaky}:2" in message  # whitespace
    assert "1 duplicate row(s) (train 1)" in message and "(test 1)" in message
    assert "--strict-data" in message and "docs/gotchas.md" in message
    with warnings.catch_warnings():  # once per task object; the counts stay
        warnings.simplefilter("error", DataWarning)
        assert check_data(task) == counts


def test_csv_rows_are_named_by_their_file_line(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text('prompt,choices,correct,split\n"Q: sky?\nA:","blue; red",0,train\n'
                    "Q: sea? A:,blue; red,0,train\nQ: sea? A:,red; blue,1,train\n"
                    "Q: sea? A:,green; red,1,test\n", encoding="utf-8")
    with pytest.warns(DataWarning) as caught:
        assert check_data(FileTask(path)) == {
            "duplicates": 1, "train_val_overlap": 0, "train_test_overlap": 1}
    message = str(caught[0].message)  # MC: the same set of correct choices is the same answer
    assert f"{path}:5 (train) repeats {path}:4" in message
    assert f"{path}:6 (test) has the prompt of training row {path}:4" in message


def test_clean_data_gives_no_warning(clean):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert check_data(FileTask(clean), strict=True) == {
            "duplicates": 0, "train_val_overlap": 0, "train_test_overlap": 0}


def test_strict_raises_the_named_error(leaky):
    task = FileTask(leaky)
    with pytest.raises(DataError) as err:
        check_data(task, strict=True)
    assert isinstance(err.value, LoFiTLensError) and isinstance(err.value, ValueError)
    assert f"{leaky}:3" in str(err.value) and f"{leaky}:7" in str(err.value)
    assert "Nothing was run" in str(err.value)
    with pytest.warns(DataWarning):  # the error did not use up the warning
        check_data(task)
    with pytest.raises(DataError):  # and strict raises every time
        check_data(task, strict=True)


def test_at_most_five_rows_are_listed(tmp_path):
    rows = _rows(3, "train") + [dict(r, split="test") for r in _rows(3, "train")] * 3
    task = FileTask(_jsonl(tmp_path / "many.jsonl", rows))
    with pytest.warns(DataWarning) as caught:
        counts = check_data(task)
    assert counts == {"duplicates": 6, "train_val_overlap": 0, "train_test_overlap": 9}
    message = str(caught[0].message)
    assert message.count(" (test) ") == MAX_SHOWN and "... and 10 more" in message
    assert message.index("has the prompt of") < message.index("... and")  # leakage first
    assert len(data_report(task).findings) == 15


def test_rows_without_a_file_are_named_by_split_and_index():
    class Listed(Task):
        name, kind = "listed", "generation"
        hyperparams = TaskHyperparams(1e-3, 1e-3, 1e-3)

        def load_split(self, split):
            ex = GenerationExample("Q: a? A:", ("b",), " b")
            return {"train": [ex, ex], "val": [], "test": [ex]}[split]

    with pytest.warns(DataWarning) as caught:
        check_data(Listed("."))
    message = str(caught[0].message)
    assert "listed train row 2 (train) repeats listed train row 1" in message
    assert "listed test row 1 (test) has the prompt of training row listed train row 1" in message


# ---------------------------------------------------------------------- the paper's data
@pytest.mark.parametrize("name, options, expected", [
    ("clutrr", {}, {"duplicates": 42, "train_val_overlap": 10, "train_test_overlap": 4}),
    ("mquake", {}, {"duplicates": 1, "train_val_overlap": 0, "train_test_overlap": 0}),
    ("truthfulqa", {"fold": 0}, {"duplicates": 0, "train_val_overlap": 0, "train_test_overlap": 0}),
    ("truthfulqa", {"fold": 1}, {"duplicates": 0, "train_val_overlap": 0, "train_test_overlap": 0}),
])
def test_the_papers_splits(name, options, expected):
    """What the LoFiT authors' splits hold (docs/gotchas.md): CLUTRR repeats stories inside
    and across its splits, MQuAKE has one repeated test case; so the default is a warning."""
    if not (default_data_dir() / name).is_dir():
        pytest.skip("LoFiT data folder not found (set $LOFIT_DATA_DIR)")
    task = get_task(name, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert check_data(task) == expected
    found = data_report(task).findings
    if name == "mquake":
        assert [str(f).split("/")[-1] for f in found] == [
            "test.jsonl:240 (same prompt and answer)"]
        assert str(found[0]).startswith(str(default_data_dir() / "mquake/test.jsonl:361"))
    if name == "clutrr":
        assert str(found[0]).startswith(str(default_data_dir() / "clutrr/test.json[33] (test)"))


# ---------------------------------------------------------------------- config and CLI
def test_strict_data_is_a_checked_config_field_that_does_not_change_results():
    assert LoFiTConfig().strict_data is False and LoFiTConfig(strict_data=True).strict_data
    with pytest.raises(ConfigError, match="strict_data='yes'"):
        LoFiTConfig(strict_data="yes")
    assert "strict_data" in NON_RESULT_FIELDS
    assert LoFiTConfig.from_dict(LoFiTConfig(strict_data=True).to_dict()).strict_data


def test_strict_data_flag_stops_the_run_before_the_model_loads(leaky, tmp_path, monkeypatch,
                                                              capsys):
    from lofit_lens.cli import build_parser, main, run_config

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lofit_lens.load_model", no_model)
    out = tmp_path / "run"
    assert main(["run", "--task", str(leaky), "--strict-data", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lofit-lens: error: task 'leaky'" in err and f"{leaky}:3" in err
    assert not out.exists()
    parse = build_parser().parse_args
    assert run_config(parse(["run", "--task", "t.jsonl", "--strict-data"])).strict_data
    assert not run_config(parse(["run", "--task", "t.jsonl"])).strict_data


def test_run_writes_the_counts_into_metrics(leaky, tmp_path, tiny_model, monkeypatch, capsys):
    from lofit_lens.cli import main

    monkeypatch.setattr("lofit_lens.cli._checked_model", lambda args: tiny_model)  # no doctor
    out = tmp_path / "run"
    rc = main(["run", "--task", str(leaky), "--k", "2", "--epochs", "1",
               "--max-train-examples", "2", "--max-val-examples", "0",
               "--max-eval-examples", "1", "--out", str(out), "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    quality = err.count("lofit-lens: warning: step 1's head selection")  # may follow: 0 or 1
    assert err.count("lofit-lens: warning:") - quality == 1 and "leaky.jsonl:7" in err  # said once
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_checks"] == {
        "duplicates": 1, "train_val_overlap": 0, "train_test_overlap": 1}
    assert metrics["config"]["strict_data"] is False


def test_lofit_api_honours_strict_data(leaky, tiny_model):
    import lofit_lens as ll

    with pytest.raises(DataError, match="leaky.jsonl:7"):
        ll.lofit(tiny_model, str(leaky), k=2, epochs=1, strict_data=True, progress=False)

