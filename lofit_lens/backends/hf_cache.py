"""Cached decoding through public APIs: Hugging Face's own ``generate``/forward and its
``Cache`` objects, run on the plain view of a ``TransformerBridge`` (``backends.plain``:
interventions mirrored there) or, when a hook that is not mirrored is attached, on the HF
model the bridge wraps.

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
from typing import Iterator

import torch
from jaxtyping import Int
from torch import Tensor, nn

from lofit_lens.backends.hf_forward import accepts
from lofit_lens.backends.hooked import model_dims, uses_bridge
from lofit_lens.backends.plain import plain_runner


def wrapped_hf_model(model):
    """The HF ``PreTrainedModel`` inside a ``TransformerBridge`` (its hooks fire when it runs)."""
    if not uses_bridge(model):
        raise TypeError(f"{type(model).__name__} wraps no HF model: cached HF decoding needs a "
                        "TransformerBridge (TL 4.x)")
    return model.original_model


def cache_keyword(hf_model) -> str:
    """The forward keyword for the KV cache: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (before)."""
    return "cache" if accepts(hf_model, "cache") else "past_key_values"


def last_logits_only(hf_model) -> dict[str, int]:
    """``logits_to_keep=1`` where the HF model takes it (a prompt pass needs the last
    position's logits only)."""
    return {"logits_to_keep": 1} if accepts(hf_model, "logits_to_keep") else {}


def new_cache(hf_model):
    """An empty ``DynamicCache`` for ``hf_model``."""
    from transformers import DynamicCache

    return DynamicCache(config=hf_model.config)


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


@contextlib.contextmanager
def decoding_model(model) -> Iterator[nn.Module]:
    """The HF model to decode ``model`` with for the ``with`` body: its plain view while every
    hook is mirrored there (HF's own cache plumbing end to end), else the HF model inside
    the bridge, its attention reached by the cache (``cache_reaches_attention``)."""
    plain = plain_runner(model)
    if plain is not None:
        yield plain
        return
    with cache_reaches_attention(model):
        yield wrapped_hf_model(model)


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


@functools.lru_cache(maxsize=8)
def stop_string_criteria(tokenizer, stop_strings: tuple[str, ...]):
    """HF's ``StopStringCriteria`` for ``stop_strings``, built once per tokenizer. Building it
    scans the whole vocabulary (0.5 s for SmolLM2's 49k tokens), and HF's own cache misses
    because ``get_vocab()`` returns the tokens in another order each time; it holds no state
    between ``generate`` calls."""
    from transformers import StopStringCriteria

    return StopStringCriteria(tokenizer, list(stop_strings))


def hf_greedy_generate(model, tokens: Int[Tensor, "batch pos"],
                       attention_mask: Int[Tensor, "batch pos"], max_new_tokens: int,
                       stop_strings: list[str], tokenizer, pad: int, *, stop_at_eos: bool = True,
                       with_logits: bool = False, shared_prefix: int = 0):
    """HF ``generate`` (greedy, KV cache) on ``decoding_model``: the new tokens
    ``[batch, new]``, and with ``with_logits`` the logits each step chose from
    ``[batch, new, vocab]`` too.

    Rows stop at EOS (unless ``stop_at_eos`` is off) or once their text holds a stop string;
    finished rows are padded. ``shared_prefix``: the first that many columns are the same
    tokens in every row (``lofit_lens.padding.batch_rows``): they run once, as one row, and
    generation continues from their cache repeated over the batch.
    """
    from transformers import StoppingCriteriaList

    eos = tokenizer.eos_token_id if stop_at_eos else None
    config = greedy_config(max_new_tokens, pad, eos)
    extra = {"stopping_criteria": StoppingCriteriaList([stop_string_criteria(tokenizer, tuple(stop_strings))])} \
        if stop_strings else {}
    if with_logits:
        extra.update(output_logits=True, return_dict_in_generate=True)
    with decoding_model(model) as hf_model:
        if shared_prefix:
            cache = new_cache(hf_model)
            head = tokens[:1, :shared_prefix]  # [1, shared]
            forward_with_cache(hf_model, head, torch.ones_like(head), torch.arange(
                shared_prefix, device=head.device)[None], cache, **last_logits_only(hf_model))
            cache.batch_select_indices(torch.zeros(len(tokens), dtype=torch.long, device=tokens.device))
            extra[cache_keyword(hf_model)] = cache
        out = hf_model.generate(input_ids=tokens, attention_mask=attention_mask,
                                generation_config=config, **extra)
    if not with_logits:
        return out[:, tokens.shape[1]:]
    return out.sequences[:, tokens.shape[1]:], torch.stack(out.logits, dim=1)
