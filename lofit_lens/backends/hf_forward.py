"""Forwards of an HF causal LM through its public API: logits at chosen positions (the head
applied to those positions only), from a frozen prefix, and the residual stream entering a
layer.

The same functions serve the plain view (``backends.plain``) and the HF model inside a
``TransformerBridge``, whose hook points fire as it runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Iterator, NamedTuple, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


class Prefix(NamedTuple):
    """A frozen prefix: the residual stream entering block ``layer``, computed earlier.

    With it, a forward runs only blocks ``layer`` .. L-1 (``lofit_lens.prefix``)."""

    layer: int
    resid: Float[Tensor, "batch pos d_model"]


LAYER_LISTS = ("layers", "h", "blocks", "block")
"""Where HF decoders keep their layers (Llama/Gemma/Qwen: ``layers``; GPT-2: ``h``)."""


def decoder_layers(hf_model: nn.Module, n_layers: int) -> Optional[nn.ModuleList]:
    """The decoder-layer list of an HF causal LM (``None``: not found)."""
    decoder = hf_model.get_decoder()
    for name in LAYER_LISTS:
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) == n_layers:
            return layers
    return None


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder layer: returns its input hidden states unchanged."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states


@contextlib.contextmanager
def layers_skipped(layers: nn.ModuleList, start: int) -> Iterator[None]:
    """Decoder layers ``0 .. start-1`` replaced by pass-throughs for the ``with`` body
    (restored after, also on error). The list keeps its length, so code that indexes
    per-layer settings (Gemma 3's ``layer_types[i]``) sees the same indices."""
    saved = [layers[i] for i in range(start)]
    try:
        for i in range(start):
            layers[i] = _PassThrough()
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def accepts(hf_model: nn.Module, keyword: str) -> bool:
    """Whether ``hf_model``'s forward takes ``keyword``."""
    return keyword in _forward_parameters(type(hf_model))


def logits_at(
    hf_model: nn.Module,
    n_layers: int,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    positions: tuple[Int[Tensor, " n"], Int[Tensor, " n"]],
    prefix: Optional[Prefix] = None,
) -> Float[Tensor, "n vocab"]:
    """Logits at the (row, position) pairs ``positions`` only: the decoder runs, and the head
    (``output_logits``) sees just those positions. ``prefix``: only blocks ``prefix.layer`` ..
    L-1 run, from ``prefix.resid`` as ``inputs_embeds`` (the earlier layers pass it on)."""
    inputs = {"input_ids": tokens} if prefix is None else {"inputs_embeds": prefix.resid}
    skipped = contextlib.nullcontext()
    if prefix is not None:
        layers = decoder_layers(hf_model, n_layers)
        if layers is None:
            raise NotImplementedError(f"{type(hf_model).__name__}: no decoder-layer list found "
                                      f"(looked for {', '.join(LAYER_LISTS)}); no frozen prefix")
        skipped = layers_skipped(layers, prefix.layer)
    with skipped:
        hidden = hf_model.get_decoder()(**inputs, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state  # [batch, pos, d_model]
    return output_logits(hf_model, hidden[positions])


def output_logits(hf_model: nn.Module, hidden: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
    """The causal LM's logits for final hidden states (after the final norm), as its forward
    computes them: the output embedding, then the soft-cap of Gemma 2/3. A model whose
    forward does more (a logit scale) is refused by ``check_output_logits``."""
    logits = hf_model.get_output_embeddings()(hidden)
    cap = getattr(hf_model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def check_output_logits(hf_model: nn.Module, tokens: Int[Tensor, "batch pos"]) -> float:
    """The largest difference between the model's own forward logits and ``output_logits`` of
    its decoder's hidden states on ``tokens`` (``doctor``: it must be rounding noise)."""
    own = hf_model(input_ids=tokens, use_cache=False).logits
    hidden = hf_model.get_decoder()(input_ids=tokens, use_cache=False).last_hidden_state
    return float((own.float() - output_logits(hf_model, hidden).float()).abs().max())


def residual_entering(
    hf_model: nn.Module,
    n_layers: int,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    layer: int,
) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering decoder layer ``layer`` (the forward stops there)."""
    layers = decoder_layers(hf_model, n_layers)
    if layers is None:
        raise NotImplementedError(f"{type(hf_model).__name__}: no decoder-layer list found")
    box: dict[str, Tensor] = {}

    def grab(module, args, kwargs):
        box["resid"] = args[0] if args else kwargs["hidden_states"]
        raise StopForward

    handle = layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        hf_model.get_decoder()(input_ids=tokens, attention_mask=attention_mask, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    if "resid" not in box:
        raise RuntimeError(f"decoder layer {layer} never ran: cannot read its input")
    return box["resid"]
