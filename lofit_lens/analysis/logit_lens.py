"""Logit-lens readout of the learned offsets v (paper App. E).

Adding ``v[l, h]`` to head ``h``'s output ``z`` adds ``v[l, h] @ W_O[l, h]`` to the residual
stream; projecting that direction through the unembedding ``W_U`` shows which tokens it
promotes. ``W_O`` is ``[n_layers, n_heads, d_head, d_model]`` per QUERY head (also under
GQA, where keys/values are shared but each query head has its own output slice).
"""

from __future__ import annotations

from typing import Optional, Sequence

import einops
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from lofit_lens.backends.hooked import hf_tokenizer
from lofit_lens.result import Head, LoFiTResult


def bias_directions(model, result: LoFiTResult,
                    heads: Sequence[Head]) -> Float[Tensor, "n_sel d_model"]:
    """``v[l, h] @ W_O[l, h]`` for each of ``heads``: what v writes into the residual stream."""
    w_o = model.W_O
    if tuple(w_o.shape[:3]) != tuple(result.bias.shape):
        raise ValueError(
            f"W_O has shape {tuple(w_o.shape)} but the result's v is "
            f"{tuple(result.bias.shape)} ([layer, head, d_head]): result from another model?")
    layers = torch.tensor([l for l, _ in heads], dtype=torch.long)
    index = torch.tensor([h for _, h in heads], dtype=torch.long)
    v = result.bias[layers, index].to(device=w_o.device, dtype=w_o.dtype)
    return einops.einsum(v, w_o[layers.to(w_o.device), index.to(w_o.device)],
                         "n d_head, n d_head d_model -> n d_model")


def bias_logit_lens(model, result: LoFiTResult, top_k: int = 10,
                    heads: Optional[Sequence[Head]] = None,
                    apply_ln: bool = False) -> pd.DataFrame:
    """Top tokens of each head's offset direction ``v[l, h] @ W_O[l, h] @ W_U``.

    One row per head (default: the selected heads, best first) with ``layer``, ``head``,
    ``rank``, ``v_norm`` (||v||), ``out_norm`` (||v W_O||), ``top_tokens`` (decoded strings)
    and ``top_logits``. The unembedding bias is left out (it does not depend on v).
    ``apply_ln=False`` (default) projects the raw direction, as App. E does;
    ``apply_ln=True`` first passes it through ``model.ln_final``, which applies the final
    norm's gain (and, for LayerNorm, centring) as if the direction were the whole residual.
    """
    heads = list(heads) if heads is not None else list(result.selected_heads)
    if not heads:
        raise ValueError("No heads to read: the result selected none and heads= was not given")
    with torch.no_grad():
        direction = bias_directions(model, result, heads)
        readout = model.ln_final(direction) if apply_ln else direction
        logits = readout @ model.W_U
        top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    rank = {head: i + 1 for i, head in enumerate(result.selected_heads)}
    rows = []
    for i, (layer, head) in enumerate(heads):
        ids = top.indices[i].tolist()
        rows.append({
            "layer": layer, "head": head, "rank": rank.get((layer, head)),
            "v_norm": float(result.bias[layer, head].float().norm()),
            "out_norm": float(direction[i].float().norm()),
            "top_tokens": [hf_tokenizer(model).decode([t]) for t in ids],
            "top_logits": top.values[i].float().tolist(),
        })
    return pd.DataFrame(rows)
