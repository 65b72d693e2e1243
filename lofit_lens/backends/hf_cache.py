"""Cached decoding through public APIs: Hugging Face's own ``generate``/forward and its
``Cache`` objects, run on the HF model a ``TransformerBridge`` wraps.

The bridge swaps its components into that HF model in place, so hook points (``hook_z``
and with them every intervention) fire in these calls. lofit-lens never reads a KV cache
back from a model output: it makes the ``DynamicCache`` itself, passes it in, and HF fills
it in place. That survives the rename of the output field ``past_key_values`` -> ``cache``
in transformers 5.24 (docs/gotchas.md). One more step is needed there: 5.24's decoder
layers hand the cache to attention as ``cache=``, while TransformerLens 4.3's attention
bridge reads ``past_key_values=``; ``cache_reaches_attention`` passes it under both names,
with a keyword forward pre-hook (a public torch API) that lives for one call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Iterator

from jaxtyping import Int
from torch import Tensor

from lofit_lens.backends.hooked import model_dims, uses_bridge


def wrapped_hf_model(model):
    """The HF ``PreTrainedModel`` inside a ``TransformerBridge`` (its hooks fire when it runs)."""
    if not uses_bridge(model):
        raise TypeError(f"{type(model).__name__} wraps no HF model: cached HF decoding needs a "
                        "TransformerBridge (TL 4.x)")
    return model.original_model


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_keyword(hf_model) -> str:
    """The forward keyword for the KV cache: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (before)."""
    return "cache" if "cache" in _forward_parameters(type(hf_model)) else "past_key_values"


def last_logits_only(hf_model) -> dict[str, int]:
    """``logits_to_keep=1`` where the HF model takes it (a prompt pass needs the last
    position's logits only)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(type(hf_model)) else {}


def new_cache(hf_model):
    """An empty ``DynamicCache`` for ``hf_model``."""
    from transformers import DynamicCache

    return DynamicCache(config=hf_model.config)


def left_pad_positions(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Position ids of left-padded rows: 0 at each row's first real token (as HF's
    ``generate`` computes them); pads get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _alias_cache(module, args, kwargs):
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        return args, kwargs
    return None


_LIVE_ALIASES: set = set()


def live_cache_aliases() -> int:
    """How many of ``cache_reaches_attention``'s pre-hooks are attached now (0 outside it)."""
    return len(_LIVE_ALIASES)


@contextlib.contextmanager
def cache_reaches_attention(model) -> Iterator[None]:
    """While inside, each layer's attention receives the KV cache as ``past_key_values``
    too (see the module docstring); the pre-hooks are removed on exit."""
    handles = [model.blocks[layer].attn.register_forward_pre_hook(_alias_cache, with_kwargs=True)
               for layer in range(model_dims(model).n_layers)]
    _LIVE_ALIASES.update(handles)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
            _LIVE_ALIASES.discard(handle)


def forward_with_cache(hf_model, tokens: Int[Tensor, "batch pos"],
                       attention_mask: Int[Tensor, "batch pos_total"],
                       positions: Int[Tensor, "batch pos"], cache, **kwargs) -> Tensor:
    """Logits of one HF forward that reads and extends ``cache`` in place.

    ``attention_mask`` covers the cached positions and ``tokens``; ``positions`` are the
    position ids of ``tokens``.
    """
    out = hf_model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions,
                   use_cache=True, **{cache_keyword(hf_model): cache}, **kwargs)
    return out.logits


def greedy_config(max_new_tokens: int, pad: int, eos: int | None):
    """A ``GenerationConfig`` for plain greedy decoding: nothing of the model's own
    generation defaults (repetition penalty, sampling) leaks in."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=pad, eos_token_id=eos, use_cache=True)


def hf_greedy_generate(model, tokens: Int[Tensor, "batch pos"],
                       attention_mask: Int[Tensor, "batch pos"], max_new_tokens: int,
                       stop_strings: list[str], tokenizer, pad: int) -> Int[Tensor, "batch new"]:
    """HF ``generate`` (greedy, KV cache) on the bridge's HF model: the new tokens only.

    Rows stop at EOS or once their text holds a stop string; finished rows are padded.
    """
    hf_model = wrapped_hf_model(model)
    config = greedy_config(max_new_tokens, pad, tokenizer.eos_token_id)
    extra = {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}
    with cache_reaches_attention(model):
        out = hf_model.generate(input_ids=tokens, attention_mask=attention_mask,
                                generation_config=config, **extra)
    return out[:, tokens.shape[1]:]
