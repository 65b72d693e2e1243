"""How a generated answer is compared with the accepted answers of a user's task.

- ``exact``: equal after ``strip().lower()``.
- ``normalized`` (SQuAD's rule, the default for file tasks): lower-cased, punctuation and
  the articles a/an/the removed, whitespace collapsed; ``" Elizabeth II.\\n"`` matches
  ``"Elizabeth II"``.
- ``prefix``: the normalized prediction starts with a normalized accepted answer, word by
  word (``"paris france"`` matches ``"Paris"``; ``"parisian"`` does not).
"""

from __future__ import annotations

import re
import string
from typing import Iterable, Literal

MatchMode = Literal["exact", "normalized", "prefix"]
MATCH_MODES: tuple[str, ...] = ("exact", "normalized", "prefix")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def check_match_mode(mode: str) -> str:
    if mode not in MATCH_MODES:
        raise ValueError(f"match must be one of {MATCH_MODES}, got {mode!r}")
    return mode


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_matches(prediction: str, answers: Iterable[str], mode: MatchMode) -> bool:
    """Whether ``prediction`` matches one of ``answers`` under ``mode``."""
    if mode == "exact":
        return prediction.strip().lower() in {a.strip().lower() for a in answers}
    pred = normalize_answer(prediction)
    golds = {normalize_answer(a) for a in answers}
    if mode == "normalized":
        return pred in golds
    check_match_mode(mode)
    return any(g and (pred == g or pred.startswith(g + " ")) for g in golds)
