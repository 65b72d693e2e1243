"""Tokenising (prompt, continuation) pairs and padding them into batches.

Prompts are tokenised exactly as the HF tokenizer does (so SmolLM2 gets no BOS and Gemma
gets ``<bos>``). A continuation is tokenised either on its own and appended (``joint=False``,
the clean protocol) or, as the authors' code does, as part of ``prompt + continuation``
(``joint=True``, see ``encode_pair``). Training batches are right-padded to their own
longest sequence; ``target_mask`` marks the continuation tokens, the only ones a loss sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

Pair = tuple[list[int], list[int]]


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


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer(prompt).input_ids)


def encode_pair(tokenizer, prompt: str, continuation: str, *, joint: bool,
                add_eos: bool = False, force_bos: bool = False, back_off: bool = True) -> Pair:
    """(prompt ids, continuation ids) of ``prompt + continuation``.

    ``joint``: tokenise the whole string once and split it where the prompt's own tokens end;
    when the last prompt token merged with the continuation, the split moves one token back
    (``back_off``, TRL's DPOTrainer rule) or stays at the prompt's length (honest_llama's MC
    scorer). A sentencepiece tokenizer such as Llama-2's then gives
    ``"▁Paris"`` where tokenising ``" Paris"`` alone gives ``"▁", "▁Paris"``.
    ``force_bos``: tokenise without special tokens and put BOS first whether or not the
    tokenizer adds one (TRL 0.8.1's DPOTrainer).
    """
    special = not force_bos
    if joint:
        full = list(tokenizer(prompt + continuation, add_special_tokens=special).input_ids)
        own = list(tokenizer(prompt, add_special_tokens=special).input_ids)
        start = len(own) if full[:len(own)] == own or not back_off else len(own) - 1
        prompt_ids, cont_ids = full[:start], full[start:]
    else:
        prompt_ids = list(tokenizer(prompt, add_special_tokens=special).input_ids)
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

