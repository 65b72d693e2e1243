"""Export: fold a head intervention into plain Hugging Face weights (no hooks at inference).

At ``hook_z`` (the input of the attention output projection, heads side by side) LoFiT edits
``z' = z * (1 + a) + v`` with ``a`` and ``v`` the flattened ``[head d_head]`` scales and
offsets of one layer (zero outside the active heads). The projection is linear, so

    o_proj(z') = (W diag(1 + a)) z + (W v + b)

the scales multiply the matching input columns of ``o_proj.weight`` and ``W v`` becomes its
bias. HF attention modules take an output-projection bias through ``config.attention_bias``
(Llama, Gemma, OLMo, ...), which also gives q/k/v a bias: those are set to zero, so the
exported model computes exactly what the hooked model computes with the intervention.

Writing is safe to interrupt and never mixes folders: the export refuses a non-empty ``out``
unless ``overwrite`` (then the old folder is replaced as a whole: no stale file of it, say
another tokenizer's ``chat_template.jinja``, survives), builds the new folder beside it as
``<out>.<pid>.partial`` and renames it into place at the end. A killed export leaves only
that ``.partial`` folder; ``out`` is either absent, the old folder, or the complete export.

Before anything is folded the base model is checked against the run: its head shape must be
the run's (always), and its weights must hash to the run's ``model_fingerprint`` unless
``allow_other_model`` (a folder whose weights were replaced, a fine-tune, or another model
of the same shape would otherwise take offsets learned on a model it is not).
"""

from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Union

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

from lofit_lens.backends.fingerprint import weights_sha256
from lofit_lens.backends.hf import EMBEDDED_MODELS, cache_dir, load_hf
from lofit_lens.backends.hooked import ModelDims, model_dims, model_id
from lofit_lens.errors import ModelMismatchError, ResultExistsError, UnsupportedModelError
from lofit_lens.intervention import HeadIntervention
from lofit_lens.disk import check_writable, discard, staged

logger = logging.getLogger(__name__)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
OUT_FIX = "choose another folder (CLI: --out)"


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
    if hf_dims(hf_model) != dims:
        raise ModelMismatchError(f"The intervention is for {shape(dims)}; "
                                 f"{type(hf_model).__name__} has {shape(hf_dims(hf_model))}")
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


def hf_dims(hf_model) -> ModelDims:
    """The head layout of a plain HF model: decoder layers, query heads, head size."""
    config = hf_model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = int(config.num_attention_heads)
    d_head = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return ModelDims(len(attention_modules(hf_model)), n_heads, int(d_head))


def shape(dims: ModelDims) -> str:
    return f"{dims.n_layers} layers x {dims.n_heads} heads x {dims.d_head} dims"


@dataclass(frozen=True)
class TrainedOn:
    """The model a run was trained on, as its ``LoFiTResult`` records it."""

    model_id: str
    fingerprint: str = ""
    """``backends.fingerprint.model_fingerprint``; "" for results saved before 0.2.0."""
    dtype: str = ""
    """The run's model dtype, e.g. ``"torch.bfloat16"`` ("" when unknown)."""


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


def base_model_name(model_or_name: Union[str, Path, Any]) -> str:
    """The name (embedded short name, Hub id or folder) the base model loads under."""
    if isinstance(model_or_name, (str, Path)):
        return str(model_or_name)
    return model_id(model_or_name)


def _local_folder(name: str) -> Optional[Path]:
    """The folder the weights of ``name`` are read from, when it is one on this machine."""
    if name in EMBEDDED_MODELS:
        return cache_dir() / "hf" / name
    path = Path(name).expanduser()
    return path if path.exists() else None


def _same_model_name(a: str, b: str) -> bool:
    if a == b:
        return True
    folder_a, folder_b = _local_folder(a), _local_folder(b)
    return (folder_a is not None and folder_b is not None
            and os.path.realpath(folder_a) == os.path.realpath(folder_b))


def _torch_dtype(name: str) -> Optional[torch.dtype]:
    """``"torch.bfloat16"`` -> ``torch.bfloat16``; None for "" or an unknown name."""
    found = getattr(torch, name.rsplit(".", 1)[-1], None) if name else None
    return found if isinstance(found, torch.dtype) else None


# ---------------------------------------------------------------------- the base model
def check_base_model(hf_model, name: str, trained_on: TrainedOn, dims: ModelDims,
                     allow_other_model: bool = False) -> str:
    """Raise ``ModelMismatchError`` unless ``hf_model`` (loaded as ``name``) is the model the
    run was trained on: the same head shape (``dims``; always), and the same weights (their
    SHA-256 in the run's dtype equals ``trained_on.fingerprint``) unless
    ``allow_other_model``. A run that records no fingerprint (saved before 0.2.0) is checked
    by its model name, with a warning that the weights could not be. Returns the base
    model's fingerprint ("" when not computed)."""
    found_dims = hf_dims(hf_model)
    if found_dims != dims:
        raise ModelMismatchError(
            f"The run was trained on {trained_on.model_id!r} with {shape(dims)}; the base model "
            f"{name!r} has {shape(found_dims)}. v cannot be folded into another head layout: "
            f"export onto {trained_on.model_id!r} (CLI: --model) or a model of its shape")
    if not trained_on.fingerprint:
        if not _same_model_name(name, trained_on.model_id) and not allow_other_model:
            raise ModelMismatchError(
                f"The run was trained on {trained_on.model_id!r}, the base model is {name!r}, "
                "and the run's result records no weights fingerprint (saved before lofit-lens "
                "0.2.0), so the two cannot be compared. Export onto "
                f"{trained_on.model_id!r}, or pass allow_other_model=True (CLI: "
                "--allow-other-model) to fold the offsets into this model anyway")
        logger.warning(
            "export: the run's result records no weights fingerprint (saved before lofit-lens "
            "0.2.0): the base model %r was taken for the run's %r by its name; its weights "
            "could not be checked", name, trained_on.model_id)
        return ""
    dtype = _torch_dtype(trained_on.dtype)
    found = weights_sha256(hf_model, dtype=dtype)
    if found != trained_on.fingerprint:
        as_dtype = f" in {dtype}" if dtype is not None else ""
        what = (f"{name!r} has other weights than when the run was trained on it"
                if _same_model_name(name, trained_on.model_id)
                else f"{name!r} is not the run's model {trained_on.model_id!r}")
        if not allow_other_model:
            raise ModelMismatchError(
                f"The base model {what}: weights fingerprint {found}{as_dtype}, the run's "
                f"{trained_on.fingerprint}. Offsets learned on one model do not carry their "
                f"measured effect to another. Export onto the model the run was trained on, or "
                "pass allow_other_model=True (CLI: --allow-other-model) to fold them into this "
                "one anyway")
        logger.warning("export: the base model %s (fingerprint %s, the run's %s); exporting "
                       "it anyway (allow_other_model)", what, found, trained_on.fingerprint)
    return found


# ---------------------------------------------------------------------- the output folder
def check_export_destination(out_dir: Union[str, Path], overwrite: bool = False,
                             keep: Mapping[Union[str, Path], str] = MappingProxyType({})) -> Path:
    """The real path the export will take; raises, before any model is loaded,
    ``ResultExistsError`` when ``out_dir`` is not empty and not ``overwrite``, or is (or holds)
    the current folder or a folder in ``keep`` (folder -> what it is: the base model's, the
    run's), which are never replaced, ``overwrite`` or not; and ``OutputNotWritableError``
    when the folder it goes in cannot be written. Warns about ``.partial`` folders an
    interrupted export left beside it."""
    given = Path(out_dir).expanduser()
    out = Path(os.path.realpath(given))
    for folder, what in {Path.cwd(): "the current folder", **keep}.items():
        real = Path(os.path.realpath(Path(folder).expanduser()))
        if out == real or out in real.parents:
            holds = "is" if out == real else "holds"
            raise ResultExistsError(
                f"{given} {holds} {what} ({real}): it is never replaced, --overwrite or not; "
                f"{OUT_FIX}")
    if out.exists() and not out.is_dir():
        if not overwrite:
            raise ResultExistsError(
                f"{given} is a file, not a folder; {OUT_FIX}, or pass overwrite=True "
                "(CLI: --overwrite) to replace it")
    elif out.is_dir() and not overwrite:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} in all)"
                                               if len(entries) > 5 else "")
            raise ResultExistsError(
                f"{given} is not empty ({shown}): exporting into it would mix the new "
                "model's files with these (a stale tokenizer file or chat_template.jinja "
                f"would load with it); {OUT_FIX}, or pass overwrite=True (CLI: --overwrite) "
                "to replace the folder and everything in it")
    check_writable(out.parent, fix=OUT_FIX)
    for suffix, what in (("partial", "incomplete; safe to delete"),
                         ("old", "the folder it was replacing, moved aside")):
        left = sorted(out.parent.glob(f"{out.name}.*.{suffix}")) if out.parent.is_dir() else []
        if left:
            logger.warning("export: %s: left by an interrupted export (%s)",
                           ", ".join(map(str, left)), what)
    return out


def write_folder(out: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run ``write(tmp)`` on a new sibling folder ``<out>.<pid>.partial`` and rename it to
    ``out`` when it returns: ``out`` is never half-written. With ``overwrite`` an existing
    ``out`` is renamed aside (``<out>.<pid>.old``) and removed once the new one is in place;
    without, an ``out`` that gained files meanwhile raises ``ResultExistsError``. On any
    failure (or an interrupt) the ``.partial`` folder is removed and ``out`` is as before."""
    with staged(out, OUT_FIX) as tmp:
        tmp.mkdir()
        write(tmp)
        _move_into_place(tmp, out, overwrite)
    return out


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if overwrite and (out.exists() or out.is_symlink()):
        old = out.with_name(f"{out.name}.{os.getpid()}.old")
        discard(old)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        discard(old)
        return
    try:
        os.rename(tmp, out)  # takes the place of an empty folder, never of a non-empty one
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise ResultExistsError(
                f"{out} was filled by something else while this export ran; nothing was "
                f"written there. {OUT_FIX.capitalize()}, or pass overwrite=True (CLI: "
                "--overwrite)") from err
        raise


# ---------------------------------------------------------------------- the export
def export_intervention(intervention: HeadIntervention, model_or_name, out_dir: Union[str, Path],
                        card: Optional[dict[str, Any]] = None, *, overwrite: bool = False,
                        trained_on: Optional[TrainedOn] = None, allow_other_model: bool = False,
                        keep: Mapping[Union[str, Path], str] = MappingProxyType({})) -> Path:
    """Write a plain HF model folder (weights, config, tokenizer, README.md card) that
    computes the base model with ``intervention`` applied; it loads with
    ``AutoModelForCausalLM.from_pretrained`` without lofit-lens.

    ``model_or_name``: the hooked model (its weights are reloaded by name, never changed), an
    embedded short name, a Hub id or an HF folder. ``out_dir`` must be new or empty, else
    ``ResultExistsError`` unless ``overwrite`` (the whole folder is replaced); it is written
    as a whole at the end (see the module doc), and is never the base model's folder, the
    current folder or a folder in ``keep`` (folder -> what it is, for the message). A base model of another head shape raises
    ``ModelMismatchError``; with ``trained_on`` (the run's model), so do other weights unless
    ``allow_other_model`` (``check_base_model``)."""
    name = base_model_name(model_or_name)
    base_folder = _local_folder(name)
    out = check_export_destination(out_dir, overwrite, {
        **keep, **({base_folder: "the base model's folder"} if base_folder else {})})
    if not isinstance(model_or_name, (str, Path)) and model_dims(model_or_name) != intervention.dims:
        raise ModelMismatchError(f"The intervention is for {shape(intervention.dims)}; the model "
                                 f"{name!r} has {shape(model_dims(model_or_name))}")
    hf_model, tokenizer = hf_model_of(model_or_name)
    card = dict(card or {})
    if trained_on is not None:
        found = check_base_model(hf_model, name, trained_on, intervention.dims, allow_other_model)
        card["exported_onto"] = {"model": name, "weights_fingerprint": found or None,
                                 "run_weights_fingerprint": trained_on.fingerprint or None}
    elif hf_dims(hf_model) != intervention.dims:
        raise ModelMismatchError(f"The intervention is for {shape(intervention.dims)}; the base "
                                 f"model {name!r} has {shape(hf_dims(hf_model))}")
    fold_intervention(hf_model, intervention)
    size = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    check_writable(out.parent, need_bytes=size, fix=OUT_FIX)

    def write(folder: Path) -> None:
        hf_model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "README.md").write_text(model_card(card, intervention))

    write_folder(out, write, overwrite)
    return Path(out_dir).expanduser()


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
