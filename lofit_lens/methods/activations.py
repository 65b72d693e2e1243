"""Activations at the last token of prompt + answer, read at one hook point per layer: what
ITI's probes (``hook_z``) and RepE's reading vectors (``hook_resid_post``) are fitted on."""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from lofit_lens.backends.hooked import attached_hooks, hf_tokenizer, model_device
from lofit_lens.batching import check_fits, context_length
from lofit_lens.padding import collate, encode_pair, pad_id


@torch.no_grad()
def last_token_activations(model, pairs: Sequence[tuple[str, str]], hook_names: Sequence[str],
                           batch_size: int = 16, joint: bool = False,
                           what: str = "activations") -> Float[Tensor, "n layer *rest"]:
    """The activation at each of ``hook_names`` (one per layer) at the last token of every
    prompt + answer, in fp32 on the CPU (right-padded batches; ``joint``: the two tokenised
    as one string, as the official protocol does). ``what`` names the use in the error
    for a pair longer than the model's context."""
    tok = hf_tokenizer(model)
    encoded = [encode_pair(tok, p, a, joint=joint) for p, a in pairs]
    check_fits(encoded, context_length(model), what, [p for p, _ in pairs])
    chunks = []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start:start + batch_size], pad_id(tok)).to(model_device(model))
        last = batch.attention_mask.sum(dim=1) - 1
        rows = torch.arange(len(last), device=last.device)
        box: dict[int, Tensor] = {}

        def capture(act: Float[Tensor, "batch pos *rest"], hook, layer: int) -> None:
            box[layer] = act[rows, last].float().cpu()  # [batch *rest]

        hooks = [(name, functools.partial(capture, layer=layer))
                 for layer, name in enumerate(hook_names)]
        with attached_hooks(model, hooks):
            model(batch.tokens, attention_mask=batch.attention_mask, return_type=None)
        chunks.append(torch.stack([box[layer] for layer in range(len(hook_names))], dim=1))
    return torch.cat(chunks)
