"""What LoFiT needs from a hooked model, for TransformerBridge (TL 4.x) and HookedTransformer (TL 3.x).

Both expose ``cfg.n_layers/n_heads/d_head``, ``hook_dict`` with ``HookPoint`` modules, a
``tokenizer``, ``ln_final`` and ``unembed``. Nothing here touches model weights.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lofit_lens.errors import UnsupportedModelError

HookFn = Callable[..., Tensor | None]


class ModelDims(NamedTuple):
    n_layers: int
    n_heads: int
    d_head: int

    @property
    def total_heads(self) -> int:
        return self.n_layers * self.n_heads


def check_hooked_model(model) -> None:
    """``UnsupportedModelError`` unless ``model`` is a hooked model lofit-lens can attach to
    (a TransformerBridge or a HookedTransformer: ``cfg`` with the head layout, ``hook_dict``).

    A plain Hugging Face model (``transformers.PreTrainedModel``) has ``config`` but neither.
    """
    cfg = getattr(model, "cfg", None)
    # getattr_static: a bridge's hook_dict is a property that copies its registry.
    if (cfg is not None and inspect.getattr_static(model, "hook_dict", None) is not None
            and all(hasattr(cfg, name) for name in ModelDims._fields)):
        return
    kind = type(model).__name__
    if hasattr(model, "config") and hasattr(model, "generate"):
        what = f"{kind} is a plain Hugging Face model, not a hooked model"
    else:
        what = f"{kind} is not a hooked model (no cfg with n_layers/n_heads/d_head, or no hook_dict)"
    raise UnsupportedModelError(
        f"{what}: lofit-lens attaches to TransformerLens hook points. Load it with "
        "lofit_lens.load_model(name) (a Hub id, a local folder or an embedded model), or wrap "
        "it: TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer) "
        "(docs/gotchas.md)")


def model_dims(model) -> ModelDims:
    """The head layout of a hooked model (``UnsupportedModelError`` for anything else)."""
    check_hooked_model(model)
    cfg = model.cfg
    return ModelDims(int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_head))


def model_id(model) -> str:
    """The id a model was loaded under (``load_model`` stores it), else ``cfg.model_name``."""
    return getattr(model, "lofit_model_id", None) or str(getattr(model.cfg, "model_name", "?"))


def hf_tokenizer(model):
    """The model's HF tokenizer, as HF uses it.

    A ``TransformerBridge`` swaps in a copy of the tokenizer that always prepends BOS (for
    SmolLM2 that turns ``[6004, 665]`` into ``[1, 6004, 665]``); ``load_model`` keeps the
    original as ``model.hf_tokenizer``, and lofit-lens tokenises with that.
    """
    return getattr(model, "hf_tokenizer", None) or model.tokenizer


def hook_z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def hook_point(model, name: str):
    """The ``HookPoint`` called ``name``, or a clear error when the model has none."""
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise TypeError(
            f"{type(model).__name__} is not a TransformerLens hooked model (no hook_dict). "
            "Load it with lofit_lens.load_model(...) or wrap it in a TransformerBridge."
        )
    if name not in hook_dict:
        attn_hooks = sorted(n for n in hook_dict if n.startswith("blocks.0.attn."))
        raise ValueError(
            f"{model_id(model)} has no hook point {name!r}; LoFiT needs the per-head attention "
            f"output hook_z. Hooks on blocks.0.attn: {attn_hooks or 'none'}"
        )
    return hook_dict[name]


@contextlib.contextmanager
def attached_hooks(model, hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
    """Add forward hooks ``(name, fn(tensor, hook=...))`` for the ``with`` body.

    TransformerLens's ``model.hooks()`` does it: on exit, also when the body raises, it removes
    the hooks it added and leaves the user's alone (``model.add_hook``, before or inside the
    body), on TL 4.3's ``TransformerBridge`` and TL 3.9's ``HookedTransformer`` alike
    (tests/test_hooks.py). Names are checked first, for a clear error on a missing hook point.
    """
    fwd_hooks = [(name, fn) for name, fn in hooks]
    for name, _ in fwd_hooks:
        hook_point(model, name)
    with model.hooks(fwd_hooks=fwd_hooks):
        yield


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


def final_residual(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream after the last block (the input of ``ln_final``), computed without
    the full-vocabulary unembedding."""
    box: dict[str, Tensor] = {}

    def capture(resid: Tensor, hook) -> None:  # resid: [batch, pos, d_model]
        box["resid"] = resid
        raise _StopForward

    last = f"blocks.{model_dims(model).n_layers - 1}.hook_resid_post"
    with attached_hooks(model, [(last, capture)]):
        try:
            model(tokens, attention_mask=attention_mask, return_type=None)
        except _StopForward:
            pass
    if "resid" not in box:
        raise RuntimeError(f"{last} never fired: cannot read the final residual")
    return box["resid"]


def logits_at(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    positions: tuple[Int[Tensor, " n"], Int[Tensor, " n"]],
) -> Float[Tensor, "n vocab"]:
    """Logits at the given (batch index, position) pairs only: full-vocabulary logits at
    every position dominate training memory."""
    resid = final_residual(model, tokens, attention_mask)
    picked = resid[positions]  # [n, d_model]
    logits = model.unembed(model.ln_final(picked.unsqueeze(0))).squeeze(0)
    if not uses_bridge(model):
        # A TL 3.x HookedTransformer soft-caps logits (Gemma 2) in forward, after unembed.
        cap = getattr(model.cfg, "output_logits_soft_cap", None)
        if cap is not None and cap > 0:
            logits = cap * torch.tanh(logits / cap)
    return logits


def uses_bridge(model) -> bool:
    """True for a TransformerLens 4.x ``TransformerBridge`` (vs a 3.x ``HookedTransformer``)."""
    return hasattr(model, "original_model")


def model_device(model) -> torch.device:
    return torch.device(model.cfg.device) if getattr(model.cfg, "device", None) else torch.device("cpu")
