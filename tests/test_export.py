"""Export: a LoFiT intervention folded into plain HF weights computes what the hooks compute;
the export never mixes folders, never leaves a half-written one, and refuses a base model the
run was not trained on."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lofit_lens.backends.fingerprint import model_fingerprint
from lofit_lens.backends.hooked import model_dims
from lofit_lens.cli import main
from lofit_lens.config import LoFiTConfig
from lofit_lens.errors import (
    ModelMismatchError, OutputNotWritableError, ResultExistsError, UnsupportedModelError,
)
from lofit_lens.export import check_exportable, export_intervention
from lofit_lens.intervention import HeadIntervention
from lofit_lens.result import LoFiTResult

PROMPTS = ["abc: cba.", "hello there, friend"]


@pytest.fixture(scope="module")
def tiny_folder(tiny_model, tiny_tokenizer, tmp_path_factory):
    """The tiny model's weights as an HF folder (a fresh copy: the bridge wraps ``tiny_hf``'s
    modules in place, so that object no longer saves as a plain HF model)."""
    from conftest import tiny_llama

    folder = tmp_path_factory.mktemp("tiny_hf")
    tiny_llama(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def trained_like(dims, use_scale: bool) -> HeadIntervention:
    module = HeadIntervention(dims, use_scale=use_scale).set_heads([(0, 1), (2, 3), (2, 0)])
    return module.init_normal(0.5, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("use_scale", [False, True])
def test_exported_logits_equal_the_hooked_model(tiny_model, tiny_tokenizer, tiny_folder, tmp_path,
                                                use_scale):
    from transformers import AutoModelForCausalLM

    module = trained_like(model_dims(tiny_model), use_scale)
    out = export_intervention(module, tiny_folder, tmp_path / "export", {"task": "demo"})
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.attention_bias is True
    assert "L0H1" in (out / "README.md").read_text()
    for text in PROMPTS:
        ids = tiny_tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad(), module.attach(tiny_model):
            hooked = tiny_model(ids)
        with torch.no_grad():
            plain = exported(ids).logits
            base = tiny_model(ids)
        torch.testing.assert_close(plain, hooked, atol=1e-4, rtol=0)
        assert (plain - base).abs().max() > 1e-3  # the edit is not a no-op


def test_export_loads_without_lofit_lens(tiny_model, tiny_folder, tmp_path):
    out = export_intervention(trained_like(model_dims(tiny_model), False), tiny_folder, tmp_path / "e")
    code = ("import sys; sys.modules['lofit_lens'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); print(m.config.attention_bias)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("True")


def test_architectures_without_an_output_bias_are_named():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM.*cannot take a bias"):
        check_exportable(MistralForCausalLM(cfg))


def _check_real_export(model, tmp_path):
    from transformers import AutoModelForCausalLM

    import lofit_lens as ll
    from lofit_lens.backends.hooked import hf_tokenizer

    dims = model_dims(model)
    module = HeadIntervention(dims, use_scale=False)
    module.set_heads([(dims.n_layers - 1, 0), (dims.n_layers // 2, 1), (1, 0)])
    module.init_normal(0.5, torch.Generator().manual_seed(0))
    exported = AutoModelForCausalLM.from_pretrained(export_intervention(module, model, tmp_path)).eval()
    prompt = "The capital of France is"
    ids = hf_tokenizer(model)(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), module.attach(model):
        hooked = model(ids)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, hooked, atol=1e-4, rtol=0)
        plain = exported.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    with module.attach(model):
        via_hooks = ll.generate(model, [prompt], max_new_tokens=8, progress=False)[0]
    assert hf_tokenizer(model).decode(plain) == via_hooks


@pytest.mark.slow
def test_smollm2_export_matches_the_hooks(smollm2, tmp_path):
    _check_real_export(smollm2, tmp_path)


@pytest.mark.slow
def test_gemma3_export_matches_the_hooks(tmp_path):
    import lofit_lens as ll

    _check_real_export(ll.load_model("gemma3-270m", device="cpu"), tmp_path)


# ---------------------------------------------------------------------- a safe export
def save_hf_folder(folder, hf_model, tokenizer):
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def other_weights_folder(tiny_tokenizer, tmp_path_factory):
    """A model of the tiny model's shape with other weights (another seed)."""
    from conftest import tiny_llama

    return save_hf_folder(tmp_path_factory.mktemp("other_weights"),
                          tiny_llama(tiny_tokenizer, seed=1), tiny_tokenizer)


@pytest.fixture(scope="module")
def other_shape_folder(tiny_tokenizer, tmp_path_factory):
    """3 layers x 2 heads x 16 dims: the tiny model's 3 x 4 x 8 has the same o_proj size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, max_position_embeddings=512)
    hf = LlamaForCausalLM(cfg).eval()
    hf.config.architectures = ["LlamaForCausalLM"]
    return save_hf_folder(tmp_path_factory.mktemp("other_shape"), hf, tiny_tokenizer)


def run_on(model, model_name, fingerprint: bool = True) -> LoFiTResult:
    """A result as ``ll.lofit`` would give for ``model`` loaded as ``model_name``."""
    module = trained_like(model_dims(model), use_scale=False)
    return LoFiTResult(
        config=LoFiTConfig(task="demo"), model_id=str(model_name),
        head_scores=torch.rand(model_dims(model)[:2]), scale=torch.zeros(model_dims(model)),
        bias=module.bias.detach().clone(), selected_heads=module.active_heads,
        model_fingerprint=model_fingerprint(model) if fingerprint else "",
        model_dtype=str(model.cfg.dtype) if fingerprint else "")


@pytest.fixture
def result(tiny_model, tiny_folder):
    return run_on(tiny_model, tiny_folder)


def siblings(path):
    """What an export left beside ``path`` (.partial / .old folders)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + "."))


def test_the_run_model_fingerprint_matches_its_folder_loaded_for_export(tiny_model, tiny_folder):
    """The run hashes the bridge's HF model (its modules wrapped in place), the export a fresh
    load of the folder: the same weights give the same fingerprint."""
    from lofit_lens.backends.fingerprint import weights_sha256
    from lofit_lens.backends.hf import load_hf

    hf_model, _ = load_hf(str(tiny_folder), device="cpu")
    assert weights_sha256(hf_model) == model_fingerprint(tiny_model)


def test_a_non_empty_out_is_refused_and_left_as_it_was(result, tiny_folder, tmp_path):
    out = tmp_path / "gemma"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "gemma3"}')
    (out / "chat_template.jinja").write_text("{{ gemma }}")
    with pytest.raises(ResultExistsError, match=r"gemma is not empty \(chat_template.jinja, "
                                                r"config.json\).*--overwrite"):
        result.export(tiny_folder, out)
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json"]
    assert (out / "config.json").read_text() == '{"model_type": "gemma3"}'
    assert siblings(out) == []


def test_overwrite_replaces_the_whole_folder(result, tiny_folder, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "export"
    (out / "sub").mkdir(parents=True)
    (out / "chat_template.jinja").write_text("{{ another tokenizer's template }}")
    (out / "sub" / "stale.bin").write_bytes(b"old")
    assert result.export(tiny_folder, out, overwrite=True) == out
    names = {p.name for p in out.iterdir()}
    assert "chat_template.jinja" not in names and "sub" not in names
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= names
    assert AutoTokenizer.from_pretrained(out).chat_template is None
    assert AutoModelForCausalLM.from_pretrained(out).config.attention_bias is True
    assert siblings(out) == []


def test_an_empty_or_new_out_needs_no_overwrite(result, tiny_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        result.export(tiny_folder, out)
        assert (out / "model.safetensors").is_file() and siblings(out) == []


def test_a_model_of_another_head_shape_is_refused(result, other_shape_folder, tmp_path):
    shapes = r"3 layers x 4 heads x 8 dims.*3 layers x 2 heads x 16 dims"
    for allow in (False, True):  # no flag lets another head layout through
        with pytest.raises(ModelMismatchError, match=shapes):
            result.export(other_shape_folder, tmp_path / "out", allow_other_model=allow)
    with pytest.raises(ModelMismatchError, match=r"4 heads x 8 dims.*2 heads x 16 dims"):
        export_intervention(result.intervention(), other_shape_folder, tmp_path / "out")
    assert not (tmp_path / "out").exists() and siblings(tmp_path / "out") == []


def test_other_weights_of_the_same_shape_need_allow_other_model(result, tiny_folder,
                                                                 other_weights_folder, tmp_path):
    import json

    fingerprint = result.model_fingerprint
    with pytest.raises(ModelMismatchError, match=rf"other_weights.*is not the run's model.*"
                                                 rf"fingerprint \w+ in torch.float32, the run's "
                                                 rf"{fingerprint}.*--allow-other-model"):
        result.export(other_weights_folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = result.export(other_weights_folder, tmp_path / "out", allow_other_model=True)
    card = (out / "README.md").read_text()
    onto = json.loads(card.split("```json")[1].split("```")[0])["exported_onto"]
    assert onto["model"] == str(other_weights_folder)
    assert onto["run_weights_fingerprint"] == fingerprint != onto["weights_fingerprint"]


def test_a_folder_whose_weights_were_replaced_is_refused(tiny_model, tiny_folder,
                                                         other_weights_folder, tmp_path):
    """The run's model id is a folder that now holds other weights: the name is the same,
    the weights are not."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    result = run_on(tiny_model, folder)
    shutil.copy(other_weights_folder / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(ModelMismatchError, match="has other weights than when the run was trained"):
        result.export(folder, tmp_path / "out")


def test_the_same_weights_under_another_name_or_dtype_are_accepted(tiny_model, tiny_model_bf16,
                                                                    tiny_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_folder, copy)
    run_on(tiny_model, "tiny-llama").export(copy, tmp_path / "a")  # matched by its weights
    bf16_run = run_on(tiny_model_bf16, tiny_folder)  # trained in bf16, folder in fp32
    assert bf16_run.model_dtype == "torch.bfloat16"
    bf16_run.export(tiny_folder, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").is_file()
    assert (tmp_path / "b" / "model.safetensors").is_file()


def test_a_result_without_a_fingerprint_is_checked_by_name(tiny_model, tiny_folder,
                                                           other_weights_folder, tmp_path, caplog):
    old = run_on(tiny_model, tiny_folder, fingerprint=False)  # saved before 0.2.0
    with caplog.at_level(logging.WARNING, logger="lofit_lens"):
        old.export(tiny_folder, tmp_path / "a")
    assert "weights could not be checked" in caplog.text
    with pytest.raises(ModelMismatchError, match="records no weights fingerprint.*"
                                                 "--allow-other-model"):
        old.export(other_weights_folder, tmp_path / "b")
    old.export(other_weights_folder, tmp_path / "b", allow_other_model=True)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("error", [Interrupted, KeyboardInterrupt])
def test_a_failure_mid_write_leaves_no_out(result, tiny_folder, tmp_path, monkeypatch, error):
    def fail(*args):  # after the weights and the tokenizer are written
        raise error("stopped mid-write")

    monkeypatch.setattr("lofit_lens.export.model_card", fail)
    out = tmp_path / "out"
    with pytest.raises(error):
        result.export(tiny_folder, out)
    assert not out.exists() and siblings(out) == []
    old = tmp_path / "old"  # with --overwrite the old folder stays as it was
    old.mkdir()
    (old / "keep.txt").write_text("old")
    with pytest.raises(error):
        result.export(tiny_folder, old, overwrite=True)
    assert [p.name for p in old.iterdir()] == ["keep.txt"] and siblings(old) == []


def test_sigkill_mid_write_leaves_only_a_partial_folder(result, tiny_folder, tmp_path, caplog):
    """A process killed mid-export leaves ``<out>.<pid>.partial``, never a half ``out``, and
    the next export works (and names the leftover)."""
    run = tmp_path / "run"
    result.save(run)
    out = tmp_path / "out"
    code = ("import os, signal\n"
            "import lofit_lens.export as e\n"
            "from lofit_lens.result import LoFiTResult\n"
            "e.model_card = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"LoFiTResult.load({str(run)!r}).export({str(tiny_folder)!r}, {str(out)!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == -9, done.stderr
    assert not out.exists()
    (partial,) = siblings(out)
    assert partial.endswith(".partial") and (tmp_path / partial / "model.safetensors").is_file()
    with caplog.at_level(logging.WARNING, logger="lofit_lens"):
        LoFiTResult.load(run).export(tiny_folder, out)
    assert partial in caplog.text and "interrupted export" in caplog.text
    assert (out / "README.md").is_file()


def test_a_leftover_partial_of_this_pid_is_replaced(result, tiny_folder, tmp_path):
    out = tmp_path / "out"
    leftover = tmp_path / f"out.{os.getpid()}.partial"
    leftover.mkdir()
    (leftover / "junk.bin").write_bytes(b"x")
    result.export(tiny_folder, out)
    assert not (out / "junk.bin").exists() and siblings(out) == []


def test_an_unwritable_out_fails_before_the_model_loads(result, tiny_folder, tmp_path,
                                                        monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lofit_lens.export.hf_model_of", no_load)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OutputNotWritableError, match="a_file is a file, not a folder"):
        result.export(tiny_folder, tmp_path / "a_file" / "out")
    with pytest.raises(ResultExistsError, match="not empty"):
        result.export(tiny_folder, tmp_path)


def test_the_base_model_or_run_folder_is_never_replaced(tiny_model, tiny_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    before = sorted(p.name for p in folder.iterdir())
    result = run_on(tiny_model, folder)
    for out in (folder, tmp_path):  # the folder, or one that holds it
        with pytest.raises(ResultExistsError, match="never replaced"):
            result.export(folder, out, overwrite=True)
    run = tmp_path / "runs" / "r"
    result.save(run)
    with pytest.raises(ResultExistsError, match="never replaced"):
        result.export(folder, run, source=run, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (run / "result.json").is_file()


def test_cli_export_refusals_and_overwrite(result, tiny_folder, other_weights_folder, tmp_path,
                                           capsys):
    run = tmp_path / "run"
    result.save(run)
    out = tmp_path / "out"
    out.mkdir()
    (out / "chat_template.jinja").write_text("stale")
    assert main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"lofit-lens: error: {out} is not empty (chat_template.jinja)" in err
    assert "--overwrite" in err
    assert main(["export", str(run), "--out", str(out), "--overwrite",
                 "--model", str(other_weights_folder)]) == 2
    err = capsys.readouterr().err
    assert "is not the run's model" in err and "--allow-other-model" in err
    assert (out / "chat_template.jinja").read_text() == "stale"
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    assert "with v on 3 heads" in capsys.readouterr().out
    assert not (out / "chat_template.jinja").exists() and (out / "config.json").is_file()


def test_a_remembered_fingerprint_survives_a_move_but_not_an_edit():
    """TL 3.x keeps the HF folder's fingerprint on its converted weights: moving them (new
    storage, same bytes) keeps it; changing a weight gives the weights' own hash."""
    from torch import nn

    from lofit_lens.backends.fingerprint import model_fingerprint, remember_fingerprint, weights_sha256

    module = nn.Linear(3, 2)
    remember_fingerprint(module, "hf-folder-hash")
    assert model_fingerprint(module) == "hf-folder-hash"
    module.to(torch.float64).to(torch.float32)  # new storage, same bytes: as .to(device) does
    assert model_fingerprint(module) == "hf-folder-hash"
    with torch.no_grad():
        module.weight[0, 0] += 1.0
    assert model_fingerprint(module) == weights_sha256(module) != "hf-folder-hash"
