"""Which rows go into a batch, and fitting rows to the model's context. Tokenising and
padding the batch is ``lofit_lens.padding``'s.

Context length (``fit_prompt``, docs/gotchas.md): the model's ``cfg.n_ctx`` bounds every
sequence. Evaluation cuts an over-long prompt from the LEFT (a leading BOS stays) so that
prompt + tokens to generate / answer tokens to score fit, and counts it in the metrics
(``truncated_prompts``); training refuses an example that does not fit
(``PromptTooLongError``). Prompts that fit are never touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from lofit_lens.errors import PromptTooLongError

if TYPE_CHECKING:  # padding imports torch; the command line reads EVAL_BATCH_TOKENS before it
    from lofit_lens.padding import Pair

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
