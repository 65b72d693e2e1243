"""The plain Hugging Face reference of each hot path ``benchmark.py`` times: the same work as
lofit-lens's, written directly against ``transformers`` on a second copy of the weights
(loaded with the attention implementation of lofit-lens's plain view), with the trainable
tensors added (v) or multiplied in (1 + A) at each ``o_proj`` input by a forward pre-hook, as
the authors' code edits head outputs. Nothing here imports lofit-lens's forward code.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn


def o_proj_inputs(hf: nn.Module) -> list[nn.Module]:
    """Each decoder layer's ``o_proj`` (Llama-style models: the shapes the benchmark builds)."""
    return [layer.self_attn.o_proj for layer in hf.get_decoder().layers]


@contextlib.contextmanager
def head_edits(hf: nn.Module, mask: Tensor, d_head: int, *, scale: Optional[Tensor] = None,
               bias: Optional[Tensor] = None) -> Iterator[None]:
    """``z * (1 + A) + v`` on the heads in ``mask`` (``[layer, head]``) at every ``o_proj``
    input (``[batch, pos, head * d_head]``, head-major like hook_z flattened); ``scale`` and
    ``bias`` are ``[layer, head, d_head]`` fp32 tensors, cast to the activations' dtype."""
    handles = []
    for layer, o_proj in enumerate(o_proj_inputs(hf)):
        if not bool(mask[layer].any()):
            continue
        keep = mask[layer, :, None].to(torch.float32)

        def edit(module, args, layer=layer, keep=keep):
            x = args[0]
            if scale is not None:
                x = x * (1 + (scale[layer] * keep.to(scale.device)).flatten()).to(x.dtype)
            if bias is not None:
                x = x + (bias[layer] * keep.to(bias.device)).flatten().to(x.dtype)
            return (x, *args[1:])

        handles.append(o_proj.register_forward_pre_hook(edit))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def target_loss(hf: nn.Module, tokens: Tensor, attention_mask: Tensor, target_mask: Tensor) -> Tensor:
    """Mean cross-entropy of the target tokens: the decoder, then the LM head at the positions
    that predict a target only, log-softmax in fp32."""
    rows, pos = target_mask.nonzero(as_tuple=True)
    hidden = hf.get_decoder()(input_ids=tokens, attention_mask=attention_mask).last_hidden_state
    logits = hf.get_output_embeddings()(hidden[rows, pos - 1])
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -logprobs.gather(-1, tokens[rows, pos][:, None]).mean()


@torch.no_grad()
def greedy_texts(hf: nn.Module, tok, prompts: Sequence[str], max_new_tokens: int,
                 batch_size: int) -> list[str]:
    """HF ``generate`` (greedy, KV cache) in batches of ``batch_size`` prompts sorted by token
    length (the batches ``lofit_lens.generate`` forms), left-padded; the new text of each."""
    lengths = [len(tok(p).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    tok.padding_side = "left"
    texts = [""] * len(prompts)
    device = next(hf.parameters()).device
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        enc = tok([prompts[i] for i in rows], return_tensors="pt", padding=True).to(device)
        out = hf.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for i, ids in zip(rows, out[:, enc.input_ids.shape[1]:]):
            texts[i] = tok.decode(ids, skip_special_tokens=True)
    return texts


def choice_scores(hf: nn.Module, tok, prompt_ids: Sequence[list[int]],
                  answer_ids: Sequence[list[list[int]]], batch_size: int) -> list[Tensor]:
    """Summed answer log-probs per question: questions sorted by prompt length and packed into
    groups of at most ``batch_size`` answers, each group scored from its prompts' KV cache
    (the groups lofit-lens's shared-prefix MC scoring forms)."""
    scores: list[Tensor] = [torch.zeros(0)] * len(prompt_ids)
    group: list[int] = []

    def flush():
        for i, s in zip(group, _group_logprobs(hf, tok, [prompt_ids[i] for i in group],
                                               [answer_ids[i] for i in group])):
            scores[i] = s

    for i in sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i])):
        if group and sum(len(answer_ids[j]) for j in group) + len(answer_ids[i]) > batch_size:
            flush()
            group = []
        group.append(i)
    if group:
        flush()
    return scores


@torch.no_grad()
def _group_logprobs(hf: nn.Module, tok, prompt_ids: Sequence[list[int]],
                    answer_ids: Sequence[list[list[int]]]) -> list[Tensor]:
    """One group: prompts left-padded in one pass, the cache repeated per answer, answers
    right-padded in a second pass."""
    from transformers import DynamicCache

    device = next(hf.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(map(len, prompt_ids))
    tokens = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, ids in enumerate(prompt_ids):
        tokens[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    answers = [a for group in answer_ids for a in group]
    owner = torch.repeat_interleave(torch.arange(len(prompt_ids)),
                                    torch.tensor([len(g) for g in answer_ids]))
    a_width = max(map(len, answers))
    a_tokens = torch.full((len(answers), a_width), pad, dtype=torch.long)
    a_mask = torch.zeros_like(a_tokens)
    for i, ids in enumerate(answers):
        a_tokens[i, :len(ids)] = torch.tensor(ids)
        a_mask[i, :len(ids)] = 1
    tokens, mask, a_tokens, a_mask, owner = (t.to(device) for t in (tokens, mask, a_tokens, a_mask, owner))
    cache = DynamicCache(config=hf.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    last = hf(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache,
              use_cache=True, logits_to_keep=1).logits
    cache.batch_select_indices(owner)
    a_positions = mask.sum(-1)[owner, None] + torch.arange(a_width, device=device)
    a_logits = hf(input_ids=a_tokens, attention_mask=torch.cat([mask[owner], a_mask], 1),
                  position_ids=a_positions, past_key_values=cache, use_cache=True).logits
    predicting = torch.cat([last[owner, -1:], a_logits[:, :-1]], dim=1).float()
    lp = predicting.log_softmax(-1).gather(-1, a_tokens[..., None]).squeeze(-1)
    return list((lp * a_mask).sum(1).cpu().split([len(g) for g in answer_ids]))
