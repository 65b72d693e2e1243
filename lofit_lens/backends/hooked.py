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


class Prefix(NamedTuple):
    """A frozen prefix: the residual stream entering block ``layer``, computed earlier.

    With it, a forward runs only blocks ``layer`` .. L-1 (``lofit_lens.prefix``)."""

    layer: int
    resid: Float[Tensor, "batch pos d_model"]


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
    return _capture(model, f"blocks.{layer}.hook_resid_pre",
                    lambda: model(tokens, attention_mask=attention_mask, return_type=None))


class _PassThrough(torch.nn.Module):
    """Stands in for a skipped decoder layer: returns its input hidden states unchanged."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states


LAYER_LISTS = ("layers", "h", "blocks", "block")
"""Where HF decoders keep their layers (Llama/Gemma/Qwen: ``layers``; GPT-2: ``h``)."""


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The HF decoder-layer list a TransformerBridge runs (``None``: not found, or a
    HookedTransformer, which runs its own blocks)."""
    if not uses_bridge(model):
        return None
    decoder = model.original_model.get_decoder()
    for name in LAYER_LISTS:
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == model_dims(model).n_layers:
            return layers
    return None


def supports_prefix(model) -> bool:
    """Whether ``final_residual`` can start from a frozen prefix on ``model``."""
    return not uses_bridge(model) or decoder_layers(model) is not None


@contextlib.contextmanager
def _layers_skipped(layers: torch.nn.ModuleList, start: int) -> Iterator[None]:
    """Decoder layers ``0 .. start-1`` of an HF model replaced by pass-throughs for the
    ``with`` body (restored after, also on error). The layer list keeps its length, so code
    that indexes per-layer settings (Gemma 3's ``layer_types[i]``) sees the same indices."""
    saved = [layers[i] for i in range(start)]
    try:
        for i in range(start):
            layers[i] = _PassThrough()
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


def final_residual(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    prefix: Prefix | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream after the last block (the input of ``ln_final``), computed without
    the full-vocabulary unembedding. With ``prefix``, only blocks ``prefix.layer`` .. L-1 run,
    from ``prefix.resid``: on a TransformerBridge the HF model's earlier decoder layers pass
    their input through and ``prefix.resid`` goes in as ``inputs_embeds``; on a
    HookedTransformer through ``start_at_layer``. Either way the masks and positions are
    the ones a full forward builds. ``lofit_lens.prefix`` checks the result against a full
    forward before relying on it (an architecture that edits ``inputs_embeds`` in its
    forward, as GPT-2 adds positions, fails that check and keeps the full path)."""
    last = f"blocks.{model_dims(model).n_layers - 1}.hook_resid_post"
    if prefix is None:
        return _capture(model, last, lambda: model(tokens, attention_mask=attention_mask,
                                                   return_type=None))
    if not uses_bridge(model):
        return _capture(model, last, lambda: model(prefix.resid, start_at_layer=prefix.layer,
                                                   attention_mask=attention_mask, return_type=None))
    decoder, layers = model.original_model.get_decoder(), decoder_layers(model)
    if layers is None:
        raise NotImplementedError(f"{model_id(model)}: no decoder-layer list found "
                                  f"(looked for {', '.join(LAYER_LISTS)}); no frozen prefix")

    def run() -> None:
        with _layers_skipped(layers, prefix.layer):
            decoder(inputs_embeds=prefix.resid, attention_mask=attention_mask, use_cache=False)

    return _capture(model, last, run)


def logits_at(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    positions: tuple[Int[Tensor, " n"], Int[Tensor, " n"]],
    prefix: Prefix | None = None,
) -> Float[Tensor, "n vocab"]:
    """Logits at the given (batch index, position) pairs only: full-vocabulary logits at
    every position dominate training memory. ``prefix``: see ``final_residual``."""
    resid = final_residual(model, tokens, attention_mask, prefix)
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
