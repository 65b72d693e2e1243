"""``load_model``: any Hub id or local HF folder, or an embedded offline model, as a hooked model.

TransformerLens 4.x gives a ``TransformerBridge`` around the HF model (logits equal HF's
exactly). Under TransformerLens 3.x the same call gives a ``HookedTransformer``.
"""

from __future__ import annotations

from typing import Optional

import torch

from lofit_lens.backends.hf import (
    DEFAULT_MODEL, default_device, finish, load_hf, resolve, tokenizer_adds_bos,
)
from lofit_lens.backends.tl3 import load_hooked_transformer, use_hooked_transformer


def load_model(
    name: str = DEFAULT_MODEL,
    device: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
):
    """A hooked model for ``name``: an embedded short name (``smollm2-135m``, ``gemma3-270m``),
    a Hub id or a local HF folder.

    Returns a TL 4.x ``TransformerBridge`` (or, where only TL 3.x is installed, a
    ``HookedTransformer``) in eval mode whose weights are frozen; ``model.lofit_model_id``
    holds ``name``. BOS handling follows the HF tokenizer, so the bridge's own
    ``to_tokens``/``generate`` on strings match HF.
    """
    device = device or default_device()
    dtype = dtype or torch.float32
    if use_hooked_transformer():  # TL < 4, or LOFIT_LENS_BACKEND=hooked
        return load_hooked_transformer(name, device=device, dtype=dtype)
    from transformer_lens.model_bridge import TransformerBridge

    tl_name, _ = resolve(name)
    hf_model, tokenizer = load_hf(name, device=device, dtype=dtype)
    model = TransformerBridge.boot_transformers(
        tl_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    model.cfg.default_prepend_bos = tokenizer_adds_bos(tokenizer)
    return finish(model, name, tokenizer)


