"""Frozen-prefix caching: train only the layers that change.

The model is frozen and an intervention whose lowest edited layer is ``l0`` leaves the
residual stream entering block ``l0`` unchanged. ``PrefixStore`` computes it once per
training row (no grad), and every later forward of those rows, training steps, validation
and the DPO reference alike, runs only blocks ``l0`` .. L-1 from it
(``backends.hooked.final_residual``). Rows are right-padded, so a row's residual does not
depend on the batch it is computed in.

The store lives in memory up to ``budget_mb``, on disk (a memory-mapped temporary file)
above it, and is not built at all, with a logged reason, when the disk cannot hold it or
when a check batch computed both ways differs (an architecture that edits its input
embeddings inside its forward, for instance).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from lofit_lens.backends.hooked import (
    Prefix, model_device, model_dims, residual_entering, supports_prefix,
)
from lofit_lens.tolerance import logit_tolerance, model_dtype
from lofit_lens.padding import Pair, collate

logger = logging.getLogger(__name__)

class PrefixStore:
    """The residual stream entering block ``layer`` for each of ``len(self)`` rows
    (``[n_tokens_i, d_model]`` each, fp32), in memory or memory-mapped from disk."""

    def __init__(self, layer: int, lengths: Sequence[int], d_model: int,
                 data: "np.ndarray | list[Tensor]", folder: Optional[tempfile.TemporaryDirectory] = None,
                 dtype: torch.dtype = torch.float32):
        self.layer, self.lengths, self.d_model, self.dtype = layer, list(lengths), d_model, dtype
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self._data, self._folder = data, folder

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def on_disk(self) -> bool:
        return isinstance(self._data, np.ndarray)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1]) * self.d_model * 4

    def row(self, i: int) -> Float[Tensor, "pos d_model"]:
        if self.on_disk:
            return torch.from_numpy(np.array(self._data[self.offsets[i]:self.offsets[i + 1]]))
        return self._data[i]

    def gather(self, indices: Sequence[int], width: int,
               device: torch.device) -> Float[Tensor, "batch pos d_model"]:
        """The rows ``indices`` right-padded with zeros to ``width`` positions (a padded
        position's residual never reaches a real one: causal attention, right padding)."""
        out = torch.zeros(len(indices), width, self.d_model)
        for b, i in enumerate(indices):
            out[b, :self.lengths[i]] = self.row(i)
        return out.to(device, self.dtype)  # the model's dtype: fp32 holds bf16 values exactly

    def close(self) -> None:
        """Drop the data (and the temporary file of a disk store)."""
        self._data = []
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    @classmethod
    @torch.no_grad()
    def build(cls, model, pairs: Sequence[Pair], pad: int, layer: int, batch_size: int,
              budget_mb: float) -> Optional["PrefixStore"]:
        """The store for ``pairs`` (prompt + continuation ids), or ``None`` (logged) when it
        would not fit in ``budget_mb`` of memory nor on the temporary disk."""
        lengths = [len(p) + len(c) for p, c in pairs]
        d_model = int(model.cfg.d_model)
        nbytes = sum(lengths) * d_model * 4
        folder = None
        if nbytes <= budget_mb * 2**20:
            data: "np.ndarray | list[Tensor]" = []
        else:
            free = shutil.disk_usage(tempfile.gettempdir()).free
            if nbytes > 0.5 * free:
                logger.warning("frozen prefix: the cache needs %.0f MB, over its memory budget "
                               "(%.0f MB) and half the free disk: training runs every layer",
                               nbytes / 2**20, budget_mb)
                return None
            folder = tempfile.TemporaryDirectory(prefix="lofit-lens-prefix-")
            data = np.lib.format.open_memmap(Path(folder.name) / "prefix.npy", mode="w+",
                                             dtype=np.float32, shape=(sum(lengths), d_model))
            logger.info("frozen prefix: %.0f MB over the %.0f MB memory budget, kept on disk",
                        nbytes / 2**20, budget_mb)
        offset, dtype = 0, torch.float32
        device = model_device(model)
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = collate(chunk, pad).to(device)
            resid = residual_entering(model, batch.tokens, batch.attention_mask, layer)
            dtype, resid = resid.dtype, resid.float().cpu()
            for b, n in enumerate(lengths[start:start + batch_size]):
                if isinstance(data, list):
                    data.append(resid[b, :n].clone())
                else:
                    data[offset:offset + n] = resid[b, :n].numpy()
                offset += n
        return cls(layer, lengths, d_model, data, folder, dtype)

    def prefix(self, indices: Sequence[int], width: int, device: torch.device) -> Prefix:
        return Prefix(self.layer, self.gather(indices, width, device))


def first_edited_layer(intervention) -> int:
    """The lowest layer ``intervention`` edits (``Intervention.first_layer``; 0 when it does
    not say)."""
    first = getattr(intervention, "first_layer", None)
    return int(first()) if first is not None else 0


@contextlib.contextmanager
def frozen_prefix(model, objectives: Sequence, layer: int, batch_size: int,
                  budget_mb: float) -> Iterator[bool]:
    """Give ``objectives`` (``None`` entries skipped) a ``PrefixStore`` at ``layer`` for the
    ``with`` body; yields whether they use it. Call with the intervention attached: the check
    compares, on the first rows of the first objective, the value computed from the prefix
    with the full forward's, and a difference beyond rounding in the model's dtype
    (``lofit_lens.tolerance``) keeps the full path."""
    objectives = [o for o in objectives if o is not None and len(o)]
    if layer <= 0 or budget_mb <= 0 or not objectives:
        yield False
        return
    if not supports_prefix(model):
        logger.warning("frozen prefix: %s keeps its decoder layers where lofit-lens does not "
                       "look: training runs every layer", type(model).__name__)
        yield False
        return
    stores: list[PrefixStore] = []
    try:
        for objective in objectives:
            store = PrefixStore.build(model, objective.prefix_pairs(), objective.pad, layer,
                                      batch_size, budget_mb)
            if store is None:
                break
            stores.append(store)
        ok = len(stores) == len(objectives) and _agrees(model, objectives[0], stores[0], batch_size)
        if ok:
            for objective, store in zip(objectives, stores):
                objective.prefix_store = store
        yield ok
    finally:
        for objective in objectives:
            objective.prefix_store = None
        for store in stores:
            store.close()


@torch.no_grad()
def _agrees(model, objective, store: PrefixStore, batch_size: int) -> bool:
    rows = list(range(min(batch_size, len(objective))))
    full = objective.check_value(model, rows)
    objective.prefix_store = store
    try:
        cached = objective.check_value(model, rows)
    finally:
        objective.prefix_store = None
    gap = float((full - cached).abs().max())
    tol = logit_tolerance(model_dtype(model), model_dims(model).n_layers, full)
    if not gap <= tol:
        logger.warning("frozen prefix: a check batch differs by %.2g from the full forward "
                       "(tolerance %.2g) on %s (its forward edits the input embeddings?): "
                       "training runs every layer", gap, tol, type(model).__name__)
        return False
    return True
