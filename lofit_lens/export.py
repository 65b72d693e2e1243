"""Export: fold a head intervention into plain Hugging Face weights (no hooks at inference).

At ``hook_z`` (the input of the attention output projection, heads side by side) LoFiT edits
``z' = z * (1 + a) + v`` with ``a`` and ``v`` the flattened ``[head d_head]`` scales and
offsets of one layer (zero outside the active heads). The projection is linear, so

    o_proj(z') = (W diag(1 + a)) z + (W v + b)

the scales multiply the matching input columns of ``o_proj.weight`` and ``W v`` becomes its
bias. HF attention modules take an output-projection bias through ``config.attention_bias``
(Llama, Gemma, OLMo, ...), which also gives q/k/v a bias: those are set to zero, so the
exported model computes exactly what the hooked model computes with the intervention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

from lofit_lens.backends.hf import load_hf
from lofit_lens.backends.hooked import model_dims
from lofit_lens.errors import UnsupportedModelError
from lofit_lens.intervention import HeadIntervention

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_modules(hf_model) -> list[nn.Module]:
    """Each decoder layer's attention module (``model.layers[i].self_attn``), or a named
    error when the architecture does not have that layout."""
    layers = getattr(getattr(hf_model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise UnsupportedModelError(
            f"Export needs decoder layers at model.layers[i].self_attn; "
            f"{type(hf_model).__name__} has another layout")
    return [layer.self_attn for layer in layers]


def check_exportable(hf_model) -> None:
    """Raise ``UnsupportedModelError`` unless the architecture's output projection can
    carry a bias after a save and reload (``config.attention_bias`` and ``nn.Linear``)."""
    name = type(hf_model).__name__
    if not hasattr(hf_model.config, "attention_bias"):
        raise UnsupportedModelError(
            f"{name}'s attention output projection cannot take a bias (its config has no "
            "attention_bias), so an offset v cannot be stored in plain weights; serve it "
            "with the hooks (LoFiTResult.apply) instead")
    for attn in attention_modules(hf_model):
        for proj in PROJECTIONS:
            if not isinstance(getattr(attn, proj, None), nn.Linear):
                raise UnsupportedModelError(
                    f"{name}: self_attn.{proj} is not an nn.Linear; export supports "
                    "attention with q/k/v/o_proj linear layers")


@torch.no_grad()
def fold_intervention(hf_model, intervention: HeadIntervention) -> None:
    """Fold ``intervention`` into ``hf_model``'s weights, in place (see the module doc)."""
    check_exportable(hf_model)
    dims = intervention.dims
    modules = attention_modules(hf_model)
    if len(modules) != dims.n_layers:
        raise ValueError(f"The intervention has {dims.n_layers} layers, the model {len(modules)}")
    mask = intervention.head_mask[..., None].float()  # [layer, head, 1]
    scale: Float[Tensor, "layer head d_head"] = intervention.scale.detach().float() * mask
    bias: Float[Tensor, "layer head d_head"] = intervention.bias.detach().float() * mask
    for layer, attn in enumerate(modules):
        for proj in PROJECTIONS:
            linear = getattr(attn, proj)
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                       device=linear.weight.device))
        o_proj = attn.o_proj
        weight = o_proj.weight.float()  # [d_model, head * d_head]
        if intervention.use_bias:
            v = einops.rearrange(bias[layer], "head d_head -> (head d_head)").to(weight.device)
            o_proj.bias += (weight @ v).to(o_proj.bias.dtype)
        if intervention.use_scale:
            a = einops.rearrange(scale[layer], "head d_head -> (head d_head)").to(weight.device)
            o_proj.weight.copy_((weight * (1 + a)[None, :]).to(o_proj.weight.dtype))
    hf_model.config.attention_bias = True


def hf_model_of(model_or_name: Union[str, Path, Any]):
    """A fresh HF model (and tokenizer) behind a hooked model, a name or a folder: the
    export never touches the weights of a model in use."""
    if isinstance(model_or_name, (str, Path)):
        return load_hf(str(model_or_name), device="cpu")
    name = getattr(model_or_name, "lofit_model_id", None)
    if name is None:
        raise UnsupportedModelError("Export from a hooked model needs the name it was loaded "
                                    "under (lofit_lens.load_model sets model.lofit_model_id)")
    return load_hf(name, device="cpu", dtype=getattr(model_or_name.cfg, "dtype", None))


def export_intervention(intervention: HeadIntervention, model_or_name, out_dir: Union[str, Path],
                        card: Optional[dict[str, Any]] = None) -> Path:
    """Write a plain HF model folder (weights, config, tokenizer, README.md card) that
    computes the base model with ``intervention`` applied; it loads with
    ``AutoModelForCausalLM.from_pretrained`` without lofit-lens."""
    hf_model, tokenizer = hf_model_of(model_or_name)
    if not isinstance(model_or_name, (str, Path)) and model_dims(model_or_name) != intervention.dims:
        raise ValueError(f"Intervention built for {intervention.dims}, model has "
                         f"{model_dims(model_or_name)}")
    fold_intervention(hf_model, intervention)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(model_card(card or {}, intervention))
    return out


def model_card(card: dict[str, Any], intervention: HeadIntervention) -> str:
    heads = ", ".join(f"L{l}H{h}" for l, h in intervention.active_heads)
    edits = " and ".join(n for n, on in (("scales A (o_proj input columns)", intervention.use_scale),
                                         ("offsets v (o_proj bias)", intervention.use_bias)) if on)
    lines = ["# A LoFiT model exported by lofit-lens", "",
             f"The base model's weights with {edits} folded in on {len(intervention.active_heads)} "
             f"attention heads: {heads}. It loads with `AutoModelForCausalLM.from_pretrained` and "
             "needs no lofit-lens at inference; `config.attention_bias` is true and the q/k/v "
             "biases are zero.", ""]
    if card:
        lines += ["```json", json.dumps(card, indent=2, default=str), "```", ""]
    return "\n".join(lines)
