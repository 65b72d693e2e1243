"""What lofit-lens 0.1.0 saved, read by today's code: the one place that knows its format.

0.1.0 wrote result cards without checksums (store format 1) and ran what is now
``protocol="clean"`` without naming it. Its result folders still load (``LoFiTResult.load``).
Its phase checkpoints, analysis cells and ``compare`` runs are not read: since 0.2.0 every
key covers the model's weights and the versions that compute with it, so those are computed
again rather than looked up.
"""

from __future__ import annotations

from typing import Any, Mapping

LEGACY_FORMAT = 1
"""The store format of lofit-lens 0.1.0's cards."""


def result_config(card: Mapping[str, Any]) -> dict[str, Any]:
    """A result card's config as ``LoFiTConfig.from_dict`` reads it today."""
    config = dict(card.get("config", {}))
    if card.get("format_version", LEGACY_FORMAT) == LEGACY_FORMAT:
        config.setdefault("protocol", "clean")  # 0.1.0 ran what is now protocol="clean"
    return config
