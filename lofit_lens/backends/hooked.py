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

from lofit_lens.backends import hf_forward
from lofit_lens.backends.hf_forward import Prefix
from lofit_lens.backends.plain import plain_runner, plain_view
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
    On a bridge the hooks are also mirrored onto its plain view (``backends.plain``), where
    the hot paths run.
    """
    fwd_hooks = [(name, fn) for name, fn in hooks]
    points = [(hook_point(model, name), fn) for name, fn in fwd_hooks]
    view = plain_view(model)
    before = view.total_hooks() if view is not None else 0
    with model.hooks(fwd_hooks=fwd_hooks):
        if view is None:
            yield
        else:
            with view.mirror(points, view.total_hooks() - before):
                yield


def hf_runner(model) -> torch.nn.Module:
    """The HF model a bridge's forward runs on: its plain view while every hook on it is
    mirrored there (``backends.plain``), else the HF model inside the bridge, where every
    hook fires."""
    return plain_runner(model) or model.original_model


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


def _capture(model, name: str, run: Callable[[], object]) -> Tensor:
    """The activation at hook ``name`` during ``run()``, which is stopped right there."""
    box: dict[str, Tensor] = {}

    def capture(act: Tensor, hook) -> None:
        box["act"] = act
        raise _StopForward

    with attached_hooks(model, [(name, capture)]):
        try:
            run()
        except _StopForward:
            pass
    if "act" not in box:
        raise RuntimeError(f"{name} never fired: cannot read it")
    return box["act"]


def residual_entering(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    layer: int,
) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering block ``layer`` (the forward stops there)."""
    if uses_bridge(model):
        return hf_forward.residual_entering(hf_runner(model), model_dims(model).n_layers, tokens,
                                            attention_mask, layer)
    return _capture(model, f"blocks.{layer}.hook_resid_pre",
                    lambda: model(tokens, attention_mask=attention_mask, return_type=None))


def supports_prefix(model) -> bool:
    """Whether ``logits_at`` can start from a frozen prefix on ``model``."""
    if not uses_bridge(model):
        return True
    return hf_forward.decoder_layers(model.original_model, model_dims(model).n_layers) is not None


def final_residual(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    prefix: Prefix | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """TL 3.x: the residual stream after the last block (the input of ``ln_final``), without
    the full-vocabulary unembedding; with ``prefix``, only blocks ``prefix.layer`` .. L-1 run
    (``start_at_layer``)."""
    last = f"blocks.{model_dims(model).n_layers - 1}.hook_resid_post"
    if prefix is None:
        return _capture(model, last, lambda: model(tokens, attention_mask=attention_mask,
                                                   return_type=None))
    return _capture(model, last, lambda: model(prefix.resid, start_at_layer=prefix.layer,
                                               attention_mask=attention_mask, return_type=None))


def logits_at(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    positions: tuple[Int[Tensor, " n"], Int[Tensor, " n"]],
    prefix: Prefix | None = None,
) -> Float[Tensor, "n vocab"]:
    """Logits at the given (batch index, position) pairs only: full-vocabulary logits at
    every position dominate training memory. ``prefix``: a frozen prefix
    (``lofit_lens.prefix``): only the blocks from ``prefix.layer`` on run. On a bridge the
    HF model runs (``hf_runner``: its plain view when it can); an architecture that edits
    ``inputs_embeds`` in its forward, as GPT-2 adds positions, fails the prefix check of
    ``lofit_lens.prefix`` and keeps the full path."""
    if uses_bridge(model):
        return hf_forward.logits_at(hf_runner(model), model_dims(model).n_layers, tokens,
                                    attention_mask, positions, prefix)
    picked = final_residual(model, tokens, attention_mask, prefix)[positions]  # [n, d_model]
    logits = model.unembed(model.ln_final(picked.unsqueeze(0))).squeeze(0)
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
