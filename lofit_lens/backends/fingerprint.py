"""A model's identity beyond its name: a SHA-256 of its weights and its architecture settings.

Two models loaded under one name (a folder whose weights were replaced, a fine-tuned copy, a
model of the same shape with other weights) get different fingerprints, so nothing cached or
saved for one is taken for the other. Hashing reads every weight once (about 0.5 s for a
135M fp32 model on a CPU); the value is kept on the model until a weight changes.
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple, Optional

import torch
from torch import nn

FINGERPRINT_CHARS = 16
_IGNORED_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "name_or_path",
                        "model_name", "device", "n_devices", "tokenizer_name"}


def _weights_module(model: nn.Module) -> nn.Module:
    """The module that owns the weights: a bridge's HF model, else the model itself."""
    return getattr(model, "original_model", None) or model


def _hf_name(name: str) -> str:
    """A parameter's name as in the plain HF model. A TransformerBridge wraps each HF module
    it adapts, in place, holding the original as ``_original_component``: its
    ``original_model`` names ``model.layers.0.self_attn.q_proj.weight``
    ``model.layers.0._original_component.self_attn._original_component.q_proj.`` (and so
    on), which would give the same weights another hash than ``load_hf``'s model."""
    return ".".join(part for part in name.split(".") if part != "_original_component")


def _config_dict(module: nn.Module) -> dict:
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    return {k: v for k, v in config.to_dict().items()
            if not k.startswith("_") and k not in _IGNORED_CONFIG_KEYS}


def weights_sha256(module: nn.Module, dtype: Optional[torch.dtype] = None) -> str:
    """SHA-256 (first 16 hex digits) of ``module``'s parameter names, shapes and bytes, and of
    its HF config less paths and versions. ``dtype``: hash each weight as cast to it (to
    compare a float32 folder with a run made in bfloat16)."""
    digest = hashlib.sha256()
    digest.update(type(module).__name__.encode())
    digest.update(json.dumps(_config_dict(module), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in module.named_parameters():
            tensor = param.detach() if dtype is None else param.detach().to(dtype)
            digest.update(f"{_hf_name(name)}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).cpu()
            digest.update(raw.numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_CHARS]


class _Memo(NamedTuple):
    state: tuple  # the weights' storage and versions when ``value`` was kept
    value: str  # the fingerprint
    own: str  # ``weights_sha256`` of the model's own weights then (== value unless remembered)


def model_fingerprint(model: nn.Module) -> str:
    """``weights_sha256`` of a hooked model's weights, computed once per model and again
    only after a weight was changed, replaced or moved. A fingerprint kept by
    ``remember_fingerprint`` survives a move that leaves every weight's bytes as they were
    (``model.to(device)``): the weights are hashed again and compared with their hash then."""
    memo: Optional[_Memo] = getattr(model, "_lofit_fingerprint", None)
    state = _weights_state(model)
    if memo is not None and memo.state == state:
        return memo.value
    own = weights_sha256(_weights_module(model))
    value = memo.value if memo is not None and memo.own == own else own
    object.__setattr__(model, "_lofit_fingerprint", _Memo(state, value, own))
    return value


def remember_fingerprint(model: nn.Module, value: str) -> nn.Module:
    """Keep ``value`` as ``model``'s fingerprint while its weights hold the bytes they hold
    now; returns ``model``. A TL 3.x ``HookedTransformer`` keeps that of the HF model it was
    converted from, so a run on it is matched with the HF folder (``export``)."""
    own = weights_sha256(_weights_module(model))
    object.__setattr__(model, "_lofit_fingerprint", _Memo(_weights_state(model), value, own))
    return model


def _weights_state(model: nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in _weights_module(model).parameters())
