"""Tokenising and padding: every padded batch lofit-lens runs is laid out here.

Prompts are tokenised exactly as the HF tokenizer does (so SmolLM2 gets no BOS and Gemma
gets ``<bos>``). A continuation is tokenised either on its own and appended (``joint=False``,
the clean protocol) or, as the authors' code does, as part of ``prompt + continuation``
(``joint=True``, see ``encode_pair``).

Training and full-sequence scoring right-pad (``collate``, ``right_pad``): each row starts at
position 0, and ``target_mask`` marks the continuation tokens, the only ones a loss sees.
Generation and the prompt pass of MC scoring left-pad (``left_pad``, ``batch_rows``), so that
every row's last token is at position -1; their position ids count real tokens only
(``left_pad_positions``, ``positions_after``). Every layout comes with its attention mask, and
pads are never told apart by their id (SmolLM2's pad is its EOS; docs/gotchas.md).

A leaf of the package (torch and jaxtyping only), so ``lofit_lens.backends`` may use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

Pair = tuple[list[int], list[int]]
"""(prompt token ids, continuation token ids)."""

SHARED_PREFIX_MIN = 4
"""A generation batch whose prompts all start with at least this many equal tokens runs them
once (``batch_rows``)."""


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """``prompt``'s token ids, special tokens as the tokenizer adds them."""
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


def right_pad(rows: Sequence[list[int]], pad: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """``(tokens, attention_mask)``: ``rows`` padded on the right to the longest."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
        attention[i, :len(r)] = 1
    return tokens, attention


def left_pad(rows: Sequence[list[int]], pad: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """``(tokens, attention_mask)``: ``rows`` padded on the left to the longest, so that the
    last real token of every row is at position -1."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = torch.tensor(r)
        attention[i, width - len(r):] = 1
    return tokens, attention


@dataclass
class TokenBatch:
    """Right-padded ``prompt + continuation`` rows (``collate``)."""

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


def collate(pairs: Sequence[Pair], pad: int) -> TokenBatch:
    """``prompt + continuation`` rows right-padded to the batch's longest, the continuation
    tokens marked."""
    if any(not prompt for prompt, _ in pairs):
        raise ValueError("A prompt tokenised to nothing: a continuation needs context")
    tokens, attention = right_pad([prompt + cont for prompt, cont in pairs], pad)
    target = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, (prompt, cont) in enumerate(pairs):
        target[row, len(prompt):len(prompt) + len(cont)] = True
    return TokenBatch(tokens, attention, target)


def batch_rows(rows: Sequence[list[int]], pad: int,
               share: bool = True) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], int]:
    """Prompts as one generation batch: ``(tokens, attention_mask, shared)``. The first
    ``shared`` columns hold the tokens every row starts with (at least ``SHARED_PREFIX_MIN``,
    else none: 0; ``share=False``: none), and each row's own tokens follow them left-padded,
    so that every row's last token is at position -1. Positions count real tokens only
    (``attention_mask``), so a row reads the same positions as it would alone."""
    shared = 0
    if share and len(rows) > 1:
        longest = min(len(r) for r in rows) - 1  # each row keeps a token of its own
        while shared < longest and all(r[shared] == rows[0][shared] for r in rows):
            shared += 1
        shared = shared if shared >= SHARED_PREFIX_MIN else 0
    tokens, attention = left_pad([r[shared:] for r in rows], pad)
    if shared:
        head = torch.tensor(rows[0][:shared]).expand(len(rows), shared)
        tokens = torch.cat([head, tokens], dim=1)
        attention = torch.cat([torch.ones(len(rows), shared, dtype=attention.dtype), attention], dim=1)
    return tokens, attention, shared


def left_pad_positions(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Position ids of left-padded rows: 0 at each row's first real token (as HF's
    ``generate`` computes them); pads get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def positions_after(attention_mask: Int[Tensor, "batch pos"], width: int,
                    n_ctx: Optional[int]) -> Int[Tensor, "batch width"]:
    """Position ids of ``width`` tokens that continue left-padded rows: the first right after
    each row's last real token. Clamped to ``n_ctx - 1``, so that padding after a short
    continuation does not index past the model's positions (GPT-2)."""
    positions = attention_mask.sum(-1)[:, None] + torch.arange(width, device=attention_mask.device)
    return positions if n_ctx is None else positions.clamp(max=n_ctx - 1)
