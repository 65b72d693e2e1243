"""Training data encoded once and turned into a loss per mini-batch (SFT or DPO).

Under the ``official`` protocol prompt and answer are tokenised together (``encode_pair``,
joint), and DPO pairs are built as TRL 0.8.1's ``DPOTrainer`` builds them: BOS first even
when the tokenizer adds none, EOS after each answer, the EOS log-prob counted. Under
``clean`` the answer is tokenised on its own and DPO answers get neither.

An example whose prompt + answer exceed the model's context (``cfg.n_ctx``) is refused with
``PromptTooLongError`` when the objective is built, before any training step (evaluation
cuts such prompts instead; see ``lofit_lens.batching``).
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from lofit_lens.batching import check_fits, context_length
from lofit_lens.backends.hooked import Prefix, check_hooked_model, hf_tokenizer, model_device
from lofit_lens.losses import dpo_loss, sequence_logprobs, sft_loss
from lofit_lens.padding import Pair, TokenBatch, collate, encode_pair, pad_id
from lofit_lens.prefix import PrefixStore
from lofit_lens.tasks.base import PreferenceExample, ProtocolName, SFTExample, TrainingExample


class Objective(Protocol):
    """``loss(model, indices)`` on the rows ``indices`` of an encoded training set."""

    def __len__(self) -> int: ...

    def loss(self, model, indices: Sequence[int]) -> Float[Tensor, ""]: ...


class SFTObjective:
    """Cross-entropy on target tokens (+ EOS, so generation learns to stop)."""

    def __init__(self, model, examples: Sequence[SFTExample], protocol: ProtocolName = "official",
                 where: str = "training"):
        check_hooked_model(model)
        tok = hf_tokenizer(model)
        self.pad = pad_id(tok)
        self.device = model_device(model)
        joint = protocol == "official"
        self.pairs = [encode_pair(tok, ex.prompt, ex.target, joint=joint, add_eos=True)
                      for ex in examples]
        check_fits(self.pairs, context_length(model), where, [ex.prompt for ex in examples])
        self.prefix_store: Optional[PrefixStore] = None

    def __len__(self) -> int:
        return len(self.pairs)

    def prefix_pairs(self) -> list[Pair]:
        """The rows a frozen-prefix store holds (``lofit_lens.prefix``)."""
        return self.pairs

    def loss(self, model, indices: Sequence[int]) -> Float[Tensor, ""]:
        batch = collate([self.pairs[i] for i in indices], self.pad).to(self.device)
        return sft_loss(model, batch, _prefix(self.prefix_store, list(indices), batch, self.device))

    def check_value(self, model, indices: Sequence[int]) -> Float[Tensor, "..."]:
        """What the frozen-prefix check compares (the loss)."""
        return self.loss(model, indices)


class DPOObjective:
    """DPO against a frozen reference's log-probs.

    clean: the reference is the untouched model, computed once here (build it before any
    intervention is attached). official: as TRL 0.8.1 with ``ref_model=None`` and
    precomputed reference log-probs does in the authors' code, the reference is the model
    with the step's freshly initialised intervention, recomputed at the start of each
    training run (``reference_at_init``; ``train_intervention`` calls ``compute_reference``).
    """

    def __init__(self, model, examples: Sequence[PreferenceExample], beta: float,
                 ref_batch_size: int = 16, protocol: ProtocolName = "official",
                 where: str = "training"):
        check_hooked_model(model)
        tok = hf_tokenizer(model)
        self.beta = beta
        self.pad = pad_id(tok)
        self.device = model_device(model)
        trl = protocol == "official"

        def encode(prompt: str, answer: str) -> Pair:
            return encode_pair(tok, prompt, answer, joint=trl, add_eos=trl, force_bos=trl)

        self.chosen = [encode(ex.prompt, ex.chosen) for ex in examples]
        self.rejected = [encode(ex.prompt, ex.rejected) for ex in examples]
        prompts = [ex.prompt for ex in examples]
        check_fits(self.chosen, context_length(model), f"{where} (chosen answer)", prompts)
        check_fits(self.rejected, context_length(model), f"{where} (rejected answer)", prompts)
        self.ref_batch_size = ref_batch_size
        self.reference_at_init = trl
        self.reference = torch.zeros(0, 2)  # [n, 2]: chosen, rejected
        self.prefix_store: Optional[PrefixStore] = None
        if not self.reference_at_init:
            self.compute_reference(model)

    @torch.no_grad()
    def compute_reference(self, model) -> None:
        """The reference log-probs of every pair under ``model`` as it runs now."""
        ref = [self._logprobs(model, range(start, min(start + self.ref_batch_size, len(self))))
               for start in range(0, len(self), self.ref_batch_size)]
        self.reference = torch.cat(ref) if ref else torch.zeros(0, 2)

    def __len__(self) -> int:
        return len(self.chosen)

    def prefix_pairs(self) -> list[Pair]:
        """The rows a frozen-prefix store holds: chosen answers, then rejected ones."""
        return self.chosen + self.rejected

    def _logprobs(self, model, indices: Sequence[int]) -> Float[Tensor, "batch 2"]:
        indices = list(indices)
        pairs = [self.chosen[i] for i in indices] + [self.rejected[i] for i in indices]
        batch = collate(pairs, self.pad).to(self.device)
        rows = indices + [len(self) + i for i in indices]
        scores = sequence_logprobs(model, batch, _prefix(self.prefix_store, rows, batch, self.device))
        return torch.stack(scores.chunk(2), dim=-1).cpu()

    def check_value(self, model, indices: Sequence[int]) -> Float[Tensor, "..."]:
        """What the frozen-prefix check compares (the policy log-probs)."""
        return self._logprobs(model, indices)

    def loss(self, model, indices: Sequence[int]) -> Float[Tensor, ""]:
        policy = self._logprobs(model, indices)
        ref = self.reference[list(indices)]
        return dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta)


def _prefix(store: Optional[PrefixStore], rows: list[int], batch: TokenBatch,
            device: torch.device) -> Optional[Prefix]:
    return None if store is None else store.prefix(rows, batch.tokens.shape[1], device)


def build_objective(model, examples: Sequence[TrainingExample], dpo_beta: float,
                    protocol: ProtocolName = "official", where: str = "training") -> Objective:
    """SFT for ``SFTExample`` rows, DPO for ``PreferenceExample`` rows (no mixing).

    ``where`` names the rows in errors (e.g. ``"clutrr train"``): an example that does not
    fit the model's context raises ``PromptTooLongError`` with its index in ``examples``.
    """
    check_hooked_model(model)
    if not examples:
        raise ValueError(f"No {where} examples")
    if all(isinstance(ex, SFTExample) for ex in examples):
        return SFTObjective(model, examples, protocol, where=where)
    if all(isinstance(ex, PreferenceExample) for ex in examples):
        return DPOObjective(model, examples, beta=dpo_beta, protocol=protocol, where=where)
    raise TypeError("Training examples mix SFT and preference rows")
