"""Shared fixtures: a tiny random Llama (unit tests) and the embedded SmolLM2 (integration).

The tiny model has a character-level tokenizer and GQA (4 query heads, 2 KV heads), so unit
tests run in milliseconds and still exercise the per-query-head ``hook_z`` path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CHARS = list("abcdefghijklmnopqrstuvwxyz .,:'\"?!\n0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-")


def char_tokenizer(folder: Path):
    """A character-level HF tokenizer saved to and reloaded from ``folder`` (TL needs a
    ``name_or_path``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return char_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_hf(tiny_tokenizer):
    return tiny_llama(tiny_tokenizer)


def hooked_tiny(tiny_hf, tiny_tokenizer, dtype=torch.float32):
    """The tiny Llama as ``load_model`` would give it, in ``dtype``: a TransformerBridge under
    TL 4.x, a HookedTransformer (converted by ``lofit_lens.backends.tl3``) under TL 3.x."""
    from lofit_lens.backends.tl3 import _convert_with_hf_config, _hooked_transformer_class, use_hooked_transformer
    from lofit_lens.backends.hf import finish as _finish

    if use_hooked_transformer():
        model = _convert_with_hf_config(_hooked_transformer_class(), tiny_hf, tiny_tokenizer,
                                        "cpu", dtype, prepend_bos=False)
    else:
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_transformers(
            "tiny-llama", hf_model=tiny_hf, tokenizer=tiny_tokenizer, device="cpu", dtype=dtype)
    model.cfg.default_prepend_bos = False
    return _finish(model, "tiny-llama", tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model(tiny_hf, tiny_tokenizer):
    """The tiny Llama in fp32 (``hooked_tiny``)."""
    return hooked_tiny(tiny_hf, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_bf16(tiny_tokenizer):
    """The tiny Llama in bf16 (its own HF copy: a bridge swaps its components into the HF
    model it wraps, so one HF model takes one bridge)."""
    return hooked_tiny(tiny_llama(tiny_tokenizer).to(torch.bfloat16), tiny_tokenizer, torch.bfloat16)


@pytest.fixture(params=["fp32", "bf16"])
def tiny_model_each_dtype(request):
    """The tiny Llama in fp32, then in bf16 (bf16 runs on a CPU too)."""
    return request.getfixturevalue("tiny_model" if request.param == "fp32" else "tiny_model_bf16")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M as a TransformerBridge (loaded once per session)."""
    pytest.importorskip("transformer_lens.model_bridge")
    from lofit_lens import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def data_dir():
    from lofit_lens.tasks.base import default_data_dir

    path = default_data_dir()
    if not (path / "clutrr" / "train.json").is_file():
        pytest.skip(f"LoFiT data not found at {path} (set LOFIT_DATA_DIR)")
    return path


def _reverse_rows(n: int, seed: int = 0) -> list[dict]:
    """A toy generation task the tiny model can learn a little of: reverse 3 letters."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(3))
        rows.append({"prompt": f"{word}:", "answer": word[::-1] + "."})
    return rows


@pytest.fixture(scope="session")
def tiny_task_file(tmp_path_factory) -> Path:
    """A generation JSONL task with train/val/test splits (40 rows)."""
    import json

    path = tmp_path_factory.mktemp("task") / "reverse.jsonl"
    rows = _reverse_rows(40)
    for i, row in enumerate(rows):
        row["split"] = "train" if i < 24 else ("val" if i < 32 else "test")
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def arithmetic_task(folder: Path, name: str, answer):
    """A 16-row file task "Q: i? A:" -> " answer(i)" (12 train, 4 test rows)."""
    from lofit_lens.tasks.file_task import FileTask

    rows = [{"prompt": f"Q: {i}? A:", "answer": f" {answer(i)}",
             "split": "train" if i < 12 else "test"} for i in range(16)]
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return FileTask(path, max_new_tokens=3)


@pytest.fixture
def arithmetic_tasks(tmp_path):
    """Two small generated tasks for the sweeps: doubling and successor."""
    return [arithmetic_task(tmp_path, "double", lambda i: 2 * i),
            arithmetic_task(tmp_path, "succ", lambda i: i + 1)]
