"""``LoFiTResult``: what a LoFiT run learned and measured, saved as safetensors + a JSON card."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from lofit_lens.backends.hooked import ModelDims, model_dims, model_id
from lofit_lens.config import NON_RESULT_FIELDS, LoFiTConfig
from lofit_lens.errors import ArtifactError, ModelMismatchError, ResultExistsError
from lofit_lens.export import TrainedOn, export_intervention
from lofit_lens.history import RunHistory, RunTimings
from lofit_lens.intervention import HeadIntervention, top_heads
from lofit_lens.migrations import result_config
from lofit_lens.selection_quality import SelectionQuality
from lofit_lens.store import folder_lock, load_artifact, read_json, save_artifact, write_text
from lofit_lens.versions import library_versions

CARD_NAME = "result.json"
TENSORS_NAME = "tensors.safetensors"
PREDICTIONS_NAME = "predictions.jsonl"
RESULT_KIND = "lofit_result"
REQUIRED_KEYS = ("model_id", "config", "selected_heads")

Head = tuple[int, int]


@dataclass
class LoFiTResult:
    """A finished run: head ranking, learned offsets, metrics and provenance.

    ``head_scores[l, h]`` is ||A[l, h]||_2 after step 1 (the ranking of ALL heads);
    ``scale`` is A itself; ``bias`` is v, zero outside ``selected_heads``.
    """

    config: LoFiTConfig
    model_id: str
    head_scores: Float[Tensor, "layer head"]
    scale: Float[Tensor, "layer head d_head"]
    bias: Float[Tensor, "layer head d_head"]
    selected_heads: list[Head]
    metrics: dict[str, Any] = field(default_factory=dict)
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    history: RunHistory = field(default_factory=RunHistory)
    data_hash: str = ""
    versions: dict[str, str] = field(default_factory=library_versions)
    timings: RunTimings = field(default_factory=RunTimings)
    model_fingerprint: str = ""
    """``backends.fingerprint.model_fingerprint`` of the model it was trained on ("" when
    unknown: results saved before 0.2.0)."""
    model_dtype: str = ""
    selection_quality: Optional[SelectionQuality] = None
    """``selection_quality.selection_quality``'s diagnostic of the selected heads (``None``:
    not computed; results saved before it existed load with ``None``)."""

    def __post_init__(self) -> None:
        # A result is a record: its tensors live on the CPU (training may have run on a GPU).
        for name in ("head_scores", "scale", "bias"):
            setattr(self, name, getattr(self, name).detach().cpu())

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def dims(self) -> ModelDims:
        n_layers, n_heads, d_head = self.bias.shape
        return ModelDims(n_layers, n_heads, d_head)

    @property
    def k(self) -> int:
        return len(self.selected_heads)

    @property
    def selected_mask(self) -> torch.Tensor:
        """Bool ``[layer, head]``: True on the selected heads."""
        mask = torch.zeros(self.head_scores.shape, dtype=torch.bool)
        for layer, head in self.selected_heads:
            mask[layer, head] = True
        return mask

    def ranking(self) -> list[tuple[Head, float]]:
        """All heads, best first, with their step-1 scores."""
        heads = top_heads(self.head_scores, self.head_scores.numel())
        return [(h, float(self.head_scores[h])) for h in heads]

    def intervention(self):
        """A bias-only ``HeadIntervention`` holding v on the selected heads."""
        module = HeadIntervention(self.dims, use_scale=False, use_bias=True)
        module.set_heads(self.selected_heads)
        with torch.no_grad():
            module.bias.copy_(self.bias)
        return module

    @contextlib.contextmanager
    def apply(self, model, allow_other_model: bool = False) -> Iterator[None]:
        """Run ``model`` with the learned offsets inside the ``with`` body."""
        self.check_compatible(model, allow_other_model=allow_other_model)
        module = self.intervention()
        with module.attach(model):
            yield

    def export(self, model_or_folder, out_dir: str | Path, source: str | Path | None = None, *,
               overwrite: bool = False, allow_other_model: bool = False) -> Path:
        """Write a plain HF model folder with v folded into the attention output biases
        (``lofit_lens.export``): it loads with ``AutoModelForCausalLM.from_pretrained``
        and needs no lofit-lens. ``model_or_folder``: the hooked model, a name or an HF folder
        of the base model; ``source``: the run folder, named in the card (and never replaced).

        ``out_dir`` must be new or empty (``ResultExistsError``) unless ``overwrite``, which
        replaces the folder as a whole; it appears complete or not at all (an interrupted
        export leaves only ``<out_dir>.<pid>.partial``). The base model must have this run's
        head shape and, unless ``allow_other_model``, its weights (``model_fingerprint``;
        by ``model_id`` for results saved before 0.2.0), else ``ModelMismatchError``."""
        card = {"source_run": None if source is None else str(source), "task": self.config.task,
                "base_model": self.model_id, "seed": self.seed, "k": self.k,
                "heads": [f"L{l}H{h}" for l, h in self.selected_heads],
                "protocol": self.config.protocol, "metrics": self.metrics,
                "versions": self.versions}
        trained_on = TrainedOn(self.model_id, self.model_fingerprint, self.model_dtype)
        return export_intervention(self.intervention(), model_or_folder, out_dir, card,
                                   overwrite=overwrite, trained_on=trained_on,
                                   allow_other_model=allow_other_model,
                                   keep={} if source is None else {source: "the run's folder"})

    def check_compatible(self, model, allow_other_model: bool = False) -> None:
        """Raise ``ModelMismatchError`` (a ``ValueError``) unless ``model`` has this result's
        shape (and id)."""
        dims = model_dims(model)
        if dims != self.dims:
            raise ModelMismatchError(
                f"This result was trained on {self.model_id} with {self.dims}; the given model "
                f"({model_id(model)}) has {dims}. Load it onto a model of the same shape."
            )
        other = model_id(model)
        if other != self.model_id and not allow_other_model:
            raise ModelMismatchError(
                f"This result was trained on {self.model_id!r} but the model is {other!r}. "
                "Pass allow_other_model=True if you mean to apply it there."
            )

    # ------------------------------------------------------------------ saving / loading
    def identity(self) -> dict[str, Any]:
        """What makes two saved results "the same run": model, settings and training data."""
        return run_identity(self.model_id, self.config, self.data_hash)

    def save(self, directory: str | Path, *, overwrite: bool = False,
             attachments: Sequence[str] = ()) -> Path:
        """Write ``tensors.safetensors``, ``predictions.jsonl`` and the card ``result.json``.

        Holds the folder's lock while writing (another process writing it raises
        ``OutputLockedError``). A folder holding a *different* result raises
        ``ResultExistsError`` unless ``overwrite``; when a result is replaced, the files of the
        old one (and the ``attachments`` its card lists, e.g. the CLI's ``metrics.json``)
        are removed first, so none is left stale. ``attachments``: names of files the caller
        writes beside it after saving (removed with it when it is replaced).
        """
        out = Path(directory)
        with folder_lock(out):
            check_destination(out, self.identity(), overwrite)
            lines = [json.dumps({"split": split, **row}, ensure_ascii=False)
                     for split, rows in self.predictions.items() for row in rows]
            write_text(out / PREDICTIONS_NAME, "".join(line + "\n" for line in lines))
            card = {
                "model_id": self.model_id,
                "dims": self.dims._asdict(),
                "config": self.config.to_dict(),
                "selected_heads": [list(h) for h in self.selected_heads],
                "metrics": self.metrics,
                "history": self.history.to_dict(),
                "data_hash": self.data_hash,
                "seed": self.seed,
                "versions": self.versions,
                "timings": self.timings.to_dict(),
                "model_fingerprint": self.model_fingerprint,
                "model_dtype": self.model_dtype,
                "selection_quality": None if self.selection_quality is None
                else self.selection_quality.to_dict(),
                "attachments": list(attachments),
            }
            save_artifact(out, {"head_scores": self.head_scores, "scale": self.scale,
                                "bias": self.bias}, card, kind=RESULT_KIND,
                          card_name=CARD_NAME, tensors_name=TENSORS_NAME,
                          files=(PREDICTIONS_NAME,))
        return out

    @classmethod
    def load(cls, directory: str | Path, model=None,
             allow_other_model: bool = False) -> "LoFiTResult":
        """Read a saved result (also one written by lofit-lens 0.1.0); with ``model``, check
        that it fits that model. A damaged folder raises ``ArtifactError`` naming the file."""
        src = Path(directory)
        if not (src / CARD_NAME).is_file():
            raise FileNotFoundError(f"{src} holds no {CARD_NAME}: not a saved LoFiTResult")
        tensors, card = load_artifact(src, kind=RESULT_KIND, card_name=CARD_NAME,
                                      tensors_name=TENSORS_NAME, required=REQUIRED_KEYS)
        missing = [k for k in ("head_scores", "scale", "bias") if k not in tensors]
        if missing:
            raise ArtifactError(f"{src / TENSORS_NAME} lacks the tensors {missing}")
        predictions: dict[str, list[dict[str, Any]]] = {}
        if (src / PREDICTIONS_NAME).is_file():
            for number, line in enumerate((src / PREDICTIONS_NAME).read_text().splitlines(), 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ArtifactError(f"{src / PREDICTIONS_NAME}:{number}: not JSON ({err})") from err
                predictions.setdefault(row.pop("split"), []).append(row)
        try:
            cfg = LoFiTConfig.from_dict(result_config(card))
        except (TypeError, ValueError) as err:
            raise ArtifactError(f"{src / CARD_NAME}: its config does not load ({err})") from err
        result = cls(
            config=cfg,
            model_id=card["model_id"],
            head_scores=tensors["head_scores"],
            scale=tensors["scale"],
            bias=tensors["bias"],
            selected_heads=[tuple(h) for h in card["selected_heads"]],
            metrics=card.get("metrics", {}),
            predictions=predictions,
            history=RunHistory.from_dict(card.get("history")),
            data_hash=card.get("data_hash", ""),
            versions=card.get("versions", {}),
            timings=RunTimings.from_dict(card.get("timings")),
            model_fingerprint=card.get("model_fingerprint", ""),
            model_dtype=card.get("model_dtype", ""),
            selection_quality=SelectionQuality.from_dict(card["selection_quality"])
            if card.get("selection_quality") else None,
        )
        if model is not None:
            result.check_compatible(model, allow_other_model=allow_other_model)
        return result

    def summary(self) -> str:
        heads = ", ".join(f"L{l}H{h}" for l, h in self.selected_heads[:10])
        more = "" if self.k <= 10 else f", ... ({self.k} in all)"
        return (f"LoFiTResult(task={self.config.task}, model={self.model_id}, seed={self.seed}, "
                f"heads=[{heads}{more}], metrics={json.dumps(self.metrics)})")

    def __repr__(self) -> str:
        return self.summary()


def run_identity(model_name: str, config: LoFiTConfig, data_hash: str = "") -> dict[str, Any]:
    """Model, settings and (when known) training-data hash: equal for reruns of one run."""
    settings = {k: v for k, v in config.to_dict().items() if k not in NON_RESULT_FIELDS}
    identity = {"model_id": model_name, "config": settings}
    return identity | ({"data_hash": data_hash} if data_hash else {})


def check_destination(directory: str | Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Make ``directory`` ready for the result ``identity``: refuse (``ResultExistsError``)
    if it holds a different result and not ``overwrite``; else remove the old result's
    files. With an identity that has no ``data_hash`` (known before any work) it only checks:
    call it so early to fail before the model loads."""
    out = Path(directory)
    if not (out / CARD_NAME).is_file():
        return
    try:
        old = read_json(out / CARD_NAME)
        old_identity = run_identity(old.get("model_id", ""),
                                    LoFiTConfig.from_dict(result_config(old)),
                                    old.get("data_hash", "") if "data_hash" in identity else "")
        same = old_identity == identity
    except (ArtifactError, TypeError, ValueError, AttributeError):
        old, same = {}, False
    if not same and not overwrite:
        raise ResultExistsError(
            f"{out} holds another result ({old.get('config', {}).get('task', '?')} with "
            f"{old.get('model_id', '?')}, seed {old.get('seed', '?')}): choose another folder "
            "or pass overwrite=True (CLI: --overwrite) to replace it")
    if "data_hash" not in identity:
        return  # an early check: nothing to remove yet
    stale = {CARD_NAME, old.get("tensors_file", TENSORS_NAME), PREDICTIONS_NAME,
             *old.get("attachments", [])}
    for name in stale:
        if name and "/" not in name and (out / name).is_file():
            (out / name).unlink()
