"""Batched greedy generation with the KV cache, hooks (and so interventions) active.

Prompts are tokenised as the HF tokenizer does, sorted by length so that batches carry
little padding, left-padded with an explicit attention mask, and decoded greedily by HF's
own ``generate`` (``lofit_lens.backends.hf_cache``). The tokens all prompts of a batch start
with (an instruction, few-shot examples) run once and their KV cache serves every row
(``lofit_lens.padding.batch_rows``). A batch ends as soon as every row has produced EOS or a
stop string.

A prompt whose tokens plus ``max_new_tokens`` exceed the model's context (``cfg.n_ctx``) is
cut from the left first (``lofit_lens.batching.fit_prompt``; ``truncated`` reports which).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lofit_lens.batching import EVAL_BATCH_TOKENS, context_length, fit_prompt, token_batches
from lofit_lens.backends.hf_cache import hf_greedy_generate
from lofit_lens.backends.hooked import check_hooked_model, hf_tokenizer, model_device, uses_bridge
from lofit_lens.eval.positions import prefix_sharing_allowed
from lofit_lens.padding import batch_rows, encode_prompt, pad_id

logger = logging.getLogger(__name__)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (and including) the first stop string, if any."""
    ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
    return text[:min(ends)] if ends else text


@torch.no_grad()
def greedy_generate(
    model,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generate",
    with_prompt: bool = False,
    truncated: Optional[dict[int, int]] = None,
    max_batch_tokens: int = EVAL_BATCH_TOKENS,
) -> list[str]:
    """The greedy continuation of every prompt (text after the prompt, special tokens
    dropped), cut after the first stop string.

    ``with_prompt``: return prompt and continuation decoded together instead, as the
    authors' evaluation does (``batch_decode`` of whole rows); nothing is cut, and stop
    strings only end decoding early.

    A prompt with more than ``n_ctx - max_new_tokens`` tokens runs cut from the left (its
    end and a leading BOS kept); ``truncated``, if given, receives ``{prompt index: tokens
    dropped}`` for those. ``with_prompt`` still decodes the whole prompt.

    Batches hold at most ``batch_size`` prompts and ``max_batch_tokens`` padded tokens
    (prompt and new tokens): a very long prompt runs with fewer others, or alone.
    """
    check_hooked_model(model)
    tok = hf_tokenizer(model)
    full = [encode_prompt(tok, p) for p in prompts]
    n_ctx = context_length(model)
    encoded, dropped = [], {}
    for i, ids in enumerate(full):
        fitted, n = fit_prompt(ids, max_new_tokens, n_ctx, tok.bos_token_id, f"prompt {i}")
        encoded.append(fitted)
        if n:
            dropped[i] = n
    if dropped:
        logger.warning("%d of %d prompts exceed the model's context of %d tokens with %d new "
                       "tokens: cut from the left (docs/gotchas.md)", len(dropped), len(prompts),
                       n_ctx, max_new_tokens)
    if truncated is not None:
        truncated.update(dropped)
    outputs: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    lengths = [len(ids) + max_new_tokens for ids in encoded]
    for rows in token_batches(lengths, batch_size, max_batch_tokens):
        new_tokens = _generate_rows(model, [encoded[i] for i in rows], max_new_tokens, stop_strings)
        for i, ids in zip(rows, new_tokens):
            if with_prompt:
                outputs[i] = tok.decode(full[i] + ids, skip_special_tokens=True)
            else:
                outputs[i] = cut_at_stop(tok.decode(ids, skip_special_tokens=True), stop_strings)
        bar.update(len(rows))
    bar.close()
    return outputs


def _generate_rows(model, rows: list[list[int]], max_new_tokens: int,
                   stop_strings: Sequence[str]) -> list[list[int]]:
    """New token ids per row (EOS and what follows it removed)."""
    tok = hf_tokenizer(model)
    eos = tok.eos_token_id
    if uses_bridge(model):  # HF's own generate (backends.hf_cache); interventions act inside
        tokens, attention, shared = batch_rows(rows, pad_id(tok), prefix_sharing_allowed())
        device = model_device(model)
        new = hf_greedy_generate(model, tokens.to(device), attention.to(device), max_new_tokens,
                                 list(stop_strings), tok, pad_id(tok), shared_prefix=shared)
        generated = new.tolist()
    else:  # TL 3.x: no attention-mask argument, so one unpadded prompt at a time
        generated = []
        for row in rows:
            out = model.generate(torch.tensor([row], device=model_device(model)),
                                 max_new_tokens=max_new_tokens, do_sample=False, stop_at_eos=True,
                                 verbose=False, return_type="tokens")
            generated.append(out[0, len(row):].tolist())
    return [ids[:ids.index(eos)] if eos in ids else ids for ids in generated]


@torch.no_grad()
def greedy_steps(model, rows: Sequence[list[int]], new_tokens: int,
                 batch_size: int) -> list[tuple[list[int], Optional[Tensor]]]:
    """Exactly ``new_tokens`` greedy tokens after each of ``rows`` (token ids; EOS does not
    end a row), decoded as ``greedy_generate`` decodes (batches of ``batch_size``, left-padded,
    KV cache), with the logits each step chose from (``[new_tokens, vocab]``; ``None`` under
    TL 3.x, whose ``generate`` does not return them): what ``doctor`` holds against a full
    forward."""
    tok = hf_tokenizer(model)
    device = model_device(model)
    steps: list[tuple[list[int], Optional[Tensor]]] = []
    for start in range(0, len(rows), batch_size):
        chunk = list(rows[start:start + batch_size])
        if uses_bridge(model):
            tokens, attention, shared = batch_rows(chunk, pad_id(tok), prefix_sharing_allowed())
            new, logits = hf_greedy_generate(model, tokens.to(device), attention.to(device),
                                             new_tokens, [], tok, pad_id(tok), stop_at_eos=False,
                                             with_logits=True, shared_prefix=shared)
            # new: [batch, new], logits: [batch, new, vocab]
            steps += [(ids.tolist(), step_logits.float().cpu()) for ids, step_logits in zip(new, logits)]
        else:
            for row in chunk:
                out = model.generate(torch.tensor([row], device=device), max_new_tokens=new_tokens,
                                     do_sample=False, stop_at_eos=False, verbose=False,
                                     return_type="tokens")
                steps.append((out[0, len(row):].tolist(), None))
    return steps
