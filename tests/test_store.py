"""The store: one format for everything saved, atomic, locked, checked on load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lofit_lens.config import LoFiTConfig
from lofit_lens.errors import ArtifactError
from lofit_lens.history import RunHistory, TrainingHistory
from lofit_lens.intervention import HeadIntervention, rebuild_intervention
from lofit_lens.result import LoFiTResult
from lofit_lens.store import (
    FORMAT_VERSION, load_artifact, save_artifact, settings_key,
)

FIXTURE_010 = Path(__file__).parent / "fixtures" / "result_v0.1.0"


def make_result(seed: int = 0, task: str = "clutrr") -> LoFiTResult:
    g = torch.Generator().manual_seed(seed)
    scale = torch.randn(3, 4, 8, generator=g)
    bias = torch.zeros(3, 4, 8)
    bias[1, 2] = torch.randn(8, generator=g)
    return LoFiTResult(config=LoFiTConfig(task=task, k=1, seed=seed), model_id="tiny-llama",
                       head_scores=scale.norm(dim=-1), scale=scale, bias=bias,
                       selected_heads=[(1, 2)], data_hash=f"hash{seed}",
                       history=RunHistory(TrainingHistory(step_loss=[1.0]), TrainingHistory(n_train=3)),
                       metrics={"lofit": {"test": {"exact_match": 0.5}}},
                       predictions={"lofit/test": [{"prompt": "p", "prediction": "x"}]})


def test_artifact_round_trip_records_checksum_and_versions(tmp_path):
    card_path = save_artifact(tmp_path, {"v": torch.arange(6.0).reshape(2, 3)}, {"note": (1, 2)},
                              kind="demo", name="thing")
    card = json.loads(card_path.read_text())
    assert card["format_version"] == FORMAT_VERSION and card["kind"] == "demo"
    assert len(card["tensors_sha256"]) == 64 and "torch" in card["versions"]
    tensors, loaded = load_artifact(tmp_path, kind="demo", name="thing")
    assert torch.equal(tensors["v"], torch.arange(6.0).reshape(2, 3))
    assert loaded["note"] == [1, 2]
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(ArtifactError, match="not a 'other'"):
        load_artifact(tmp_path, kind="other", name="thing")


def test_artifact_tensors_get_the_mode_of_any_new_file(tmp_path):
    """safetensors writes 0600; a shared cache (Ray cluster) needs the umask's mode, as the card."""
    card_path = save_artifact(tmp_path, {"v": torch.zeros(2)}, {}, kind="demo", name="thing")
    tensor_mode = (tmp_path / "thing.safetensors").stat().st_mode & 0o777
    assert tensor_mode == card_path.stat().st_mode & 0o777


def test_settings_key_is_order_independent():
    assert settings_key({"a": 1, "b": [1, 2]}) == settings_key({"b": [1, 2], "a": 1})
    assert settings_key({"a": 1}) != settings_key({"a": 2})


def test_result_round_trip_keeps_everything(tmp_path):
    result = make_result()
    result.save(tmp_path / "r")
    back = LoFiTResult.load(tmp_path / "r")
    assert torch.equal(back.bias, result.bias) and torch.equal(back.scale, result.scale)
    assert back.selected_heads == [(1, 2)] and back.history == result.history
    assert back.predictions == result.predictions and back.config == result.config


def test_result_written_by_0_1_0_still_loads():
    """tests/fixtures/result_v0.1.0 was written by lofit-lens 0.1.0 (commit 7aa99e9)."""
    result = LoFiTResult.load(FIXTURE_010)
    assert result.selected_heads == [(2, 1), (0, 3)]
    assert result.config.protocol == "clean"  # what 0.1.0 ran, named as it is now
    assert result.history.tune.trainable_parameters == 16
    assert result.history.select.step_loss == [1.0, 0.5]
    assert result.timings.eval_lofit == 2.0
    assert result.bias[2, 1].abs().sum() > 0 and result.bias[1, 1].abs().sum() == 0
    module = result.intervention()
    assert module.active_heads == [(0, 3), (2, 1)]


def test_head_intervention_reloads_from_its_saved_form(tmp_path):
    module = HeadIntervention((3, 4, 8), use_scale=True).set_heads([(0, 1), (2, 3)])
    module.init_normal(0.1, torch.Generator().manual_seed(0))
    save_artifact(tmp_path, module.state_tensors(), {"spec": module.spec()}, kind="x", name="i")
    tensors, card = load_artifact(tmp_path, name="i")
    back = rebuild_intervention("head", card["spec"], tensors)
    assert back.active_heads == module.active_heads
    assert torch.equal(back.scale, module.scale) and torch.equal(back.bias, module.bias)


def test_a_phase_another_writer_saved_meanwhile_is_read_back(tmp_path):
    """Two writers of one phase (parallel workers on one cache): the second finds the first's
    file under the shared write lock and returns it instead of writing over it."""
    from lofit_lens.checkpoint import PhaseCheckpoint

    settings = {"a": 1}

    def other_writer_finishes_first():
        PhaseCheckpoint(tmp_path).record("select", settings, lambda: {"v": torch.ones(2), "n": 1})
        return {"v": torch.zeros(2), "n": 2}

    stored = PhaseCheckpoint(tmp_path).record("select", settings, other_writer_finishes_first)
    assert stored.cached and stored.value["n"] == 1 and torch.equal(stored.value["v"], torch.ones(2))
    assert len(list(tmp_path.glob("select-*.json"))) == 1
