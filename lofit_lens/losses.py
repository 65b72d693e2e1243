"""Training objectives on a hooked model: SFT on answer tokens and DPO on preference pairs.

Both read logits only at the positions that predict continuation tokens (full-vocabulary
logits at every position would dominate memory).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lofit_lens.padding import TokenBatch
from lofit_lens.backends.hooked import Prefix, logits_at


def target_logprobs(model, batch: TokenBatch,
                    prefix: Optional[Prefix] = None) -> tuple[Float[Tensor, " n"], Tensor]:
    """Log-prob of every continuation token and the row each belongs to (``prefix``: the
    batch's frozen prefix, see ``lofit_lens.prefix``)."""
    rows, pred_pos, target_ids = batch.target_positions()
    logits = logits_at(model, batch.tokens, batch.attention_mask, (rows, pred_pos), prefix)  # [n, vocab]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    # lm_head may sit on another device than the embeddings (device_map)
    return logprobs.gather(-1, target_ids[:, None].to(logprobs.device)).squeeze(-1), rows.to(logprobs.device)


def sequence_logprobs(model, batch: TokenBatch,
                      prefix: Optional[Prefix] = None) -> Float[Tensor, " batch"]:
    """Sum of continuation-token log-probs per row (the TruthfulQA MC score)."""
    token_lp, rows = target_logprobs(model, batch, prefix)
    out = torch.zeros(batch.tokens.shape[0], dtype=token_lp.dtype, device=token_lp.device)
    return out.index_add(0, rows, token_lp)


def sft_loss(model, batch: TokenBatch, prefix: Optional[Prefix] = None) -> Float[Tensor, ""]:
    """Mean cross-entropy over the batch's continuation tokens."""
    token_lp, _ = target_logprobs(model, batch, prefix)
    return -token_lp.mean()


def dpo_loss(
    policy_chosen: Float[Tensor, " batch"],
    policy_rejected: Float[Tensor, " batch"],
    ref_chosen: Float[Tensor, " batch"],
    ref_rejected: Float[Tensor, " batch"],
    beta: float,
) -> Float[Tensor, ""]:
    """``-log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))``, averaged (Rafailov et al.)."""
    margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()
