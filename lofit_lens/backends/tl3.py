"""TransformerLens 3.x: load a model as a ``HookedTransformer`` (TL 4.x removed it).

``load_hooked_transformer`` takes the same names as ``lofit_lens.load_model`` (an embedded
short name, a Hub id or a local HF folder) and converts the HF model *without* folding or
centring weights, so its logits equal HF's (to ~1e-5 in fp32) and ``hook_z`` is the
per-head input of ``W_O`` exactly as in the HF model.

Nothing TransformerLens-3-only is imported at module level: this module imports under
TL 4.x too (``use_hooked_transformer`` is meant to be called there).
"""

from __future__ import annotations

import logging
import os
import tempfile
from importlib import metadata
from typing import Optional

import torch

from lofit_lens.backends.hf import default_device, finish, load_hf, resolve, tokenizer_adds_bos
from lofit_lens.backends.fingerprint import remember_fingerprint, weights_sha256

logger = logging.getLogger(__name__)

BACKEND_ENV = "LOFIT_LENS_BACKEND"
"""``hooked`` or ``bridge``: which TransformerLens model ``load_model`` should build."""

# TL 3.x's convert_hf_model_config guesses the architecture from these words in the model
# name (a local folder's path included) before it reads the folder's config.json.
_NAME_TRIGGERS = ("llama", "gemma")


def transformer_lens_version() -> tuple[int, ...]:
    """The installed transformer-lens version, e.g. ``(3, 9, 0)`` (TL 3.9 has no
    ``transformer_lens.__version__``; the package metadata has it)."""
    raw = metadata.version("transformer-lens")
    parts = []
    for piece in raw.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def use_hooked_transformer() -> bool:
    """Whether ``load_model`` should build a ``HookedTransformer`` rather than a
    ``TransformerBridge``.

    TL 3.9 has both classes (its ``transformer_lens.model_bridge`` imports fine), so an
    ImportError of the bridge alone does not tell the versions apart. ``$LOFIT_LENS_BACKEND``
    (``hooked`` / ``bridge``) decides when set; otherwise TL < 4 means ``HookedTransformer``.
    """
    choice = os.environ.get(BACKEND_ENV, "").strip().lower()
    if choice in ("hooked", "hookedtransformer", "legacy"):
        return True
    if choice in ("bridge", "transformerbridge"):
        return False
    if choice:
        raise ValueError(f"${BACKEND_ENV}={choice!r}: expected 'hooked' or 'bridge'")
    try:
        return transformer_lens_version() < (4,)
    except metadata.PackageNotFoundError:
        return False


def _hooked_transformer_class():
    try:
        from transformer_lens import HookedTransformer
    except ImportError as err:  # TL >= 4
        raise ImportError(
            "HookedTransformer is not in this transformer-lens (4.x removed it); install "
            "transformer-lens 3.9 (scripts/setup_tl3_env.sh) or use load_model(), which "
            "gives a TransformerBridge."
        ) from err
    return HookedTransformer


def _is_official_name(name: str) -> bool:
    import transformer_lens.loading_from_pretrained as loading

    try:
        loading.get_official_model_name(name)
    except ValueError:
        return False
    return True


def _convert_with_hf_config(hooked_cls, hf_model, tokenizer, device, dtype, prepend_bos):
    """A ``HookedTransformer`` for a model TL 3.x has no name for: its config comes from
    the HF config (through a neutral temporary folder, see ``_NAME_TRIGGERS``) and its
    weights from TL's own converter for the architecture (e.g. ``convert_llama_weights``),
    loaded with no folding or centring."""
    import transformer_lens.loading_from_pretrained as loading

    with tempfile.TemporaryDirectory(prefix="lofit-cfg-") as folder:
        if any(word in folder.lower() for word in _NAME_TRIGGERS):
            raise RuntimeError(
                f"The temporary folder {folder!r} contains one of {_NAME_TRIGGERS}, which makes "
                "TransformerLens 3.x guess the architecture from the path: set TMPDIR elsewhere."
            )
        hf_model.config.save_pretrained(folder)
        cfg = loading.get_pretrained_model_config(
            folder,
            hf_cfg=hf_model.config.to_dict(),
            fold_ln=False,
            device=device,
            dtype=dtype,
            default_prepend_bos=prepend_bos,
        )
        state_dict = loading.get_pretrained_state_dict(folder, cfg, hf_model, dtype=dtype)
    cfg.model_name = getattr(hf_model.config, "_name_or_path", "") or cfg.model_name
    model = hooked_cls(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.move_model_modules_to_device()
    return model


def load_hooked_transformer(
    name: str,
    device: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
):
    """A TL 3.x ``HookedTransformer`` for ``name`` (embedded short name, Hub id, local HF
    folder), frozen, in eval mode, unprocessed (logits equal HF's), with
    ``cfg.default_prepend_bos`` following the HF tokenizer and ``lofit_model_id = name``.

    Names TL 3.x lists (e.g. ``google/gemma-3-270m``) go through
    ``from_pretrained_no_processing`` with the HF model and tokenizer passed in (no Hub
    call); others (SmolLM2, local folders) are converted from the HF config.
    """
    hooked_cls = _hooked_transformer_class()
    device = device or default_device()
    dtype = dtype or torch.float32
    tl_name, _ = resolve(name)
    hf_model, tokenizer = load_hf(name, device=device, dtype=dtype)
    prepend_bos = tokenizer_adds_bos(tokenizer)
    if _is_official_name(tl_name):
        model = hooked_cls.from_pretrained_no_processing(
            tl_name,
            hf_model=hf_model,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            default_prepend_bos=prepend_bos,
        )
    else:
        logger.info("%s is not in TransformerLens 3.x's model list: converting from its HF config",
                    tl_name)
        model = _convert_with_hf_config(hooked_cls, hf_model, tokenizer, device, dtype, prepend_bos)
    fingerprint = weights_sha256(hf_model)  # the HF weights' identity, as a bridge has it
    del hf_model
    model.cfg.default_prepend_bos = prepend_bos
    return remember_fingerprint(finish(model, name, tokenizer), fingerprint)
