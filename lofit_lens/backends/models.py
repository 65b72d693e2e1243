"""``load_model``: any Hub id or local HF folder, or an embedded offline model, as a hooked model.

TransformerLens 4.x gives a ``TransformerBridge`` around the HF model (logits equal HF's
exactly). Under TransformerLens 3.x the same call gives a ``HookedTransformer``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Union

import torch

from lofit_lens.backends.hf import (
    DEFAULT_MODEL, DeviceMap, check_device, default_device, finish, load_hf, resolve,
    tokenizer_adds_bos,
)
from lofit_lens.backends.tl3 import load_hooked_transformer, use_hooked_transformer


def load_model(
    name: str = DEFAULT_MODEL,
    device: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    *,
    device_map: Optional[DeviceMap] = None,
    max_memory: Optional[dict] = None,
    offload_folder: Optional[Union[str, Path]] = None,
    attn_implementation: Optional[str] = None,
):
    """A hooked model for ``name``: an embedded short name (``smollm2-135m``, ``gemma3-270m``),
    a Hub id or a local HF folder.

    Returns a TL 4.x ``TransformerBridge`` (or, where only TL 3.x is installed, a
    ``HookedTransformer``) in eval mode whose weights are frozen; ``model.lofit_model_id``
    holds ``name``. BOS handling follows the HF tokenizer, so the bridge's own
    ``to_tokens``/``generate`` on strings match HF.

    ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict naming modules;
    TL 4.x only; exclusive with ``device``): a model larger than one device, split by
    accelerate's big-model loading under the bridge (``max_memory`` per device,
    ``offload_folder`` for ``"disk"`` entries). Inputs go to the embeddings' device
    (``model.cfg.device``); a ``HeadIntervention`` meets each layer's ``hook_z`` on that
    layer's device. ``model.lofit_loader`` reloads the same model in another process (a Ray
    worker: ``lofit_lens.executors``).

    ``attn_implementation`` (``"sdpa"``, ``"eager"``, ...; default: HF's choice for the
    architecture): the attention of the hot paths, which run the bridge's plain view
    (``lofit_lens.backends.plain``); the bridge itself always runs eager attention, so that
    ``hook_pattern`` fires.
    """
    check_device(device)  # before the name: a first load converts an embedded model (minutes)
    dtype = dtype or torch.float32
    loader = functools.partial(load_model, name, dtype=dtype, device_map=device_map,
                               max_memory=max_memory, offload_folder=offload_folder,
                               attn_implementation=attn_implementation)
    if use_hooked_transformer():  # TL < 4, or LOFIT_LENS_BACKEND=hooked
        if device_map is not None:
            raise ValueError("device_map needs TransformerLens 4.x (a TransformerBridge); a "
                             "TL 3.x HookedTransformer places blocks with its own n_devices")
        model = load_hooked_transformer(name, device=device or default_device(), dtype=dtype)
        model.lofit_loader = loader
        return model
    from transformer_lens.model_bridge import TransformerBridge

    tl_name, _ = resolve(name)
    if device_map is None:
        device = device or default_device()
        hf_model, tokenizer = load_hf(name, device=device, dtype=dtype,
                                      attn_implementation=attn_implementation)
    else:  # accelerate places the modules; the bridge reads cfg.device from the placement
        hf_model, tokenizer = load_hf(name, device=device, dtype=dtype, device_map=device_map,
                                      max_memory=max_memory, offload_folder=offload_folder,
                                      attn_implementation=attn_implementation)
        device = None
    chosen = hf_model.config._attn_implementation  # the bridge switches its HF model to eager
    model = TransformerBridge.boot_transformers(
        tl_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    model.cfg.default_prepend_bos = tokenizer_adds_bos(tokenizer)
    model = finish(model, name, tokenizer)
    model.lofit_loader = loader
    model.lofit_attn_implementation = chosen
    return model

