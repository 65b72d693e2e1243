"""Tokenising (prompt, continuation) pairs and padding them into batches.

Prompts are tokenised exactly as the HF tokenizer does (so SmolLM2 gets no BOS and Gemma
gets ``<bos>``). A continuation is tokenised either on its own and appended (``joint=False``,
the clean protocol) or, as the authors' code does, as part of ``prompt + continuation``
(``joint=True``, see ``encode_pair``). Training batches are right-padded to their own
longest sequence; ``target_mask`` marks the continuation tokens, the only ones a loss sees.

Context length (``fit_prompt``, docs/gotchas.md): the model's ``cfg.n_ctx`` bounds every
sequence. Evaluation cuts an over-long prompt from the LEFT (a leading BOS stays) so that
prompt + tokens to generate / answer tokens to score fit, and counts it in the metrics
(``truncated_prompts``); training refuses an example that does not fit
(``PromptTooLongError``). Prompts that fit are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from lofit_lens.errors import PromptTooLongError

Pair = tuple[list[int], list[int]]
EVAL_BATCH_TOKENS = 16384
"""Default bound on an evaluation batch's padded tokens (``LoFiTConfig.eval_batch_tokens``)."""


def token_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Row indices sorted by ``lengths``, cut into batches of at most ``max_rows`` rows whose
    padded size (rows x longest length) stays within ``max_tokens``: a long row runs with
    fewer others, or alone, so its length does not multiply by the batch size."""
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batch and (len(batch) == max_rows or (len(batch) + 1) * lengths[i] > max_tokens):
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches


@dataclass
class TokenBatch:
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    target_mask: Bool[Tensor, "batch pos"]
    """True where ``tokens[b, p]`` is a continuation token (predicted from position p - 1)."""

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(self.tokens.to(device), self.attention_mask.to(device),
                          self.target_mask.to(device))

    def target_positions(self) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"]]:
        """(row, position predicting the target, target token id) for every target token."""
        rows, pos = self.target_mask.nonzero(as_tuple=True)
        return rows, pos - 1, self.tokens[rows, pos]


def context_length(model) -> Optional[int]:
    """The most positions ``model`` can run over: ``cfg.n_ctx`` (a TransformerBridge copies
    it from the HF config's ``max_position_embeddings`` / ``n_positions``; SmolLM2: 8192).
    ``None`` when the model does not say."""
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return int(n_ctx) if n_ctx else None


def drop_left(ids: list[int], n: int, bos: Optional[int]) -> list[int]:
    """``ids`` without its first ``n`` tokens, a leading ``bos`` kept in front."""
    if n <= 0:
        return ids
    head = ids[:1] if ids and bos is not None and ids[0] == bos else []
    return head + ids[len(head) + n:]


def fit_prompt(ids: list[int], extra: int, n_ctx: Optional[int], bos: Optional[int],
               what: str = "prompt") -> tuple[list[int], int]:
    """(``ids`` cut from the left so that ``len + extra <= n_ctx``, tokens dropped).

    The end of the prompt (where the question is) is kept, and a leading BOS stays. A prompt
    that fits comes back as it is (the same list). ``PromptTooLongError`` when ``extra``
    leaves no room for a single prompt token.
    """
    if n_ctx is None or len(ids) + extra <= n_ctx:
        return ids, 0
    cut = drop_left(ids, len(ids) + extra - n_ctx, bos)
    has_bos = bool(ids) and bos is not None and ids[0] == bos
    if len(cut) <= int(has_bos) or len(cut) + extra > n_ctx:
        raise PromptTooLongError(
            f"{what}: {extra} tokens to generate or score leave no room for the prompt in the "
            f"model's context of {n_ctx} tokens (cfg.n_ctx); lower max_new_tokens or shorten "
            "the answers (docs/gotchas.md)")
    return cut, len(ids) - len(cut)


def check_fits(pairs: Sequence[Pair], n_ctx: Optional[int], where: str,
               prompts: Optional[Sequence[str]] = None) -> None:
    """``PromptTooLongError`` naming the rows of ``pairs`` (by index, with the start of their
    ``prompts``) whose prompt + continuation exceed ``n_ctx``: training refuses them rather
    than train on a cut prompt."""
    if n_ctx is None:
        return
    over = [(i, len(p) + len(c)) for i, (p, c) in enumerate(pairs) if len(p) + len(c) > n_ctx]
    if not over:
        return
    shown = "; ".join(f"example {i} ({n} tokens"
                      + (f", prompt {prompts[i][:40]!r}" if prompts is not None else "") + ")"
                      for i, n in over[:5])
    more = f"; and {len(over) - 5} more" if len(over) > 5 else ""
    raise PromptTooLongError(
        f"{len(over)} of {len(pairs)} {where} examples do not fit the model's context of "
        f"{n_ctx} tokens (prompt + answer, cfg.n_ctx): {shown}{more}. Nothing was trained: "
        "shorten or drop them (evaluation cuts long prompts from the left, training does not; "
        "docs/gotchas.md)")


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer(prompt).input_ids)


def encode_pair(tokenizer, prompt: str, continuation: str, *, joint: bool,
                add_eos: bool = False, force_bos: bool = False, back_off: bool = True,
                prompt_ids: Optional[list[int]] = None) -> Pair:
    """(prompt ids, continuation ids) of ``prompt + continuation``.

    ``joint``: tokenise the whole string once and split it where the prompt's own tokens end;
    when the last prompt token merged with the continuation, the split moves one token back
    (``back_off``, TRL's DPOTrainer rule) or stays at the prompt's length (honest_llama's MC
    scorer). A sentencepiece tokenizer such as Llama-2's then gives
    ``"▁Paris"`` where tokenising ``" Paris"`` alone gives ``"▁", "▁Paris"``.
    ``force_bos``: tokenise without special tokens and put BOS first whether or not the
    tokenizer adds one (TRL 0.8.1's DPOTrainer). ``prompt_ids``: ``prompt`` already tokenised
    as here (several continuations of one prompt tokenise it once).
    """
    special = not force_bos
    if prompt_ids is None:
        prompt_ids = list(tokenizer(prompt, add_special_tokens=special).input_ids)
    if joint:
        full = list(tokenizer(prompt + continuation, add_special_tokens=special).input_ids)
        own = prompt_ids
        start = len(own) if full[:len(own)] == own or not back_off else len(own) - 1
        prompt_ids, cont_ids = full[:start], full[start:]
    else:
        cont_ids = list(tokenizer(continuation, add_special_tokens=False).input_ids)
    if force_bos:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    if add_eos:
        cont_ids.append(tokenizer.eos_token_id)
    if not cont_ids:
        raise ValueError(f"Continuation {continuation!r} tokenises to nothing after {prompt[-40:]!r}")
    return prompt_ids, cont_ids


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(pairs: Sequence[Pair], pad: int) -> TokenBatch:
    """Right-pad ``prompt + continuation`` rows to the batch's longest sequence."""
    width = max(len(p) + len(c) for p, c in pairs)
    tokens = torch.full((len(pairs), width), pad, dtype=torch.long)
    attention = torch.zeros((len(pairs), width), dtype=torch.long)
    target = torch.zeros((len(pairs), width), dtype=torch.bool)
    for row, (prompt, cont) in enumerate(pairs):
        n_prompt, n = len(prompt), len(prompt) + len(cont)
        if n_prompt == 0:
            raise ValueError("A prompt tokenised to nothing: a continuation needs context")
        tokens[row, :n] = torch.tensor(prompt + cont)
        attention[row, :n] = 1
        target[row, n_prompt:n] = True
    return TokenBatch(tokens, attention, target)


def left_pad(rows: Sequence[list[int]], pad: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-pad prompts for generation: the last real token is at position -1 of every row."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = torch.tensor(r)
        attention[i, width - len(r):] = 1
    return tokens, attention

