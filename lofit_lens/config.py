"""``LoFiTConfig``: every knob of a LoFiT run, serialisable to and from JSON and checked when
built (``ConfigError`` naming the field and the value, before any model work).

It is also the one source of the command-line settings: ``add_config_arguments`` derives the
flags (type, default, help) of ``lofit-lens`` and of the ``analysis`` modules from the fields
below, ``config_overrides`` reads them back, and ``parse_k`` / ``parse_epochs`` are the only
parsers of K and of the epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence, Union

from lofit_lens.batching import EVAL_BATCH_TOKENS
from lofit_lens.errors import ConfigError
from lofit_lens.tasks.base import ProtocolName, TaskHyperparams, check_protocol


def parse_k(value: Union[str, int, float]) -> Union[int, float]:
    """``27`` / ``"27"`` is a head count, ``0.1`` / ``"0.1"`` a fraction of all heads."""
    number = float(value)
    return int(number) if number.is_integer() and number >= 1 else number


def parse_epochs(value: Union[int, str, Sequence[Union[int, str]]]) -> tuple[int, int]:
    """``(epochs of step 1, epochs of step 2)`` from one number (both steps) or exactly two
    (step 1, step 2): ``3``, ``"3"`` or ``[3]`` give (3, 3); ``(2, 5)``, ``["2", "5"]`` or
    ``"2 5"`` give (2, 5). Three or more numbers, or a number that is not a whole one, are a
    ``ConfigError``; the range (>= 1) is checked by ``LoFiTConfig``."""
    if isinstance(value, str):
        items: list[Any] = value.replace(",", " ").split()
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        items = [value]
    if len(items) not in (1, 2):
        shown = " ".join(str(v) for v in items) or "nothing"
        raise ConfigError(f"epochs: give one number (both steps) or two (step 1, step 2), got "
                          f"{len(items)}: {shown}")
    counts = tuple(_whole_number("epochs", v) for v in items)
    return counts[0], counts[-1]


def _whole_number(name: str, value: Any) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{name}={value!r}: must be a whole number")


STEPS = ("select", "tune")
"""The training steps: head selection (step 1) and bias tuning (step 2)."""


def _setting(default: Any = dataclasses.MISSING, help: str = "", *, minimum: Any = None,
             above: Any = None, none: str = "", cli: bool = True, zero_is_none: bool = False,
             steps: tuple[str, ...] = (), default_factory: Any = dataclasses.MISSING):
    """A field with its help text and its valid range in the metadata (read by ``validate``
    and ``add_config_arguments``). ``minimum``: smallest valid value; ``above``: values must
    exceed it; ``none``: what ``None`` means (when the field is optional); ``cli=False``: no
    command-line flag; ``zero_is_none``: on the command line 0 means ``None`` (all);
    ``steps``: the training steps whose result the field changes (their cache keys hold it)."""
    metadata = {"help": help, "minimum": minimum, "above": above, "none": none, "cli": cli,
                "zero_is_none": zero_is_none, "steps": steps}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def step_fields(step: str) -> tuple[str, ...]:
    """The ``LoFiTConfig`` fields that change what ``step`` ("select" or "tune") learns."""
    if step not in STEPS:
        raise ConfigError(f"step={step!r}: one of {STEPS}")
    return tuple(f.name for f in dataclasses.fields(LoFiTConfig) if step in f.metadata["steps"])


NON_RESULT_FIELDS = ("eval_batch_size", "eval_batch_tokens", "prefix_cache_mb", "strict_data",
                     "selection_bootstrap")
"""``LoFiTConfig`` fields that change speed, memory or checks, not results: left out of cache
keys and of what makes two saved results "the same run"."""


@dataclass
class LoFiTConfig:
    """Settings of a two-step LoFiT run. ``None`` learning rates / lambda take the task's
    defaults (see ``lofit_lens.tasks`` and docs/hyperparameters in the README). Every value
    is checked when the config is built (``validate``)."""

    task: str = _setting("clutrr", "task name or task file", cli=False)
    protocol: ProtocolName = _setting(
        "official", "official: the authors' code, point by point; clean: their quirks removed "
                    "(docs/protocol.md)", steps=STEPS)
    k: Union[int, float] = _setting(
        0.1, "heads to keep: a count (int >= 1) or a fraction of all heads (0 < float < 1)")
    seed: int = _setting(0, "random seed (initialisation, data order, data sample)", minimum=0,
                         steps=STEPS)
    l1_lambda: Optional[float] = _setting(None, "step-1 L1 penalty on the scales A",
                                          minimum=0, none="the task's", steps=("select",))
    lr_select: Optional[float] = _setting(None, "step-1 (head selection) learning rate",
                                          above=0, none="the task's", steps=("select",))
    lr_bias: Optional[float] = _setting(None, "step-2 (offsets v) learning rate", above=0,
                                        none="the task's", steps=("tune",))
    epochs_select: int = _setting(2, "epochs of step 1 (head selection)", minimum=1,
                                  steps=("select",))
    epochs_bias: int = _setting(3, "epochs of step 2 (offsets v)", minimum=1, steps=("tune",))
    batch_size: int = _setting(8, "training batch size", minimum=1, steps=STEPS)
    init_std: float = _setting(1e-3, "standard deviation of the initial A and v", minimum=0,
                               steps=STEPS)
    weight_decay: float = _setting(0.0, "AdamW weight decay", minimum=0, steps=STEPS)
    adam_eps: float = _setting(1e-8, "AdamW epsilon", above=0, steps=STEPS)
    dpo_beta: float = _setting(0.5, "DPO beta (preference tasks such as TruthfulQA)", above=0,
                               steps=STEPS)
    max_grad_norm: Optional[float] = _setting(
        None, "gradient clipping by total norm; 0 turns it off", minimum=0,
        none="the protocol's: official 1.0 (HF Trainer's default in the authors' code), "
             "clean none", steps=STEPS)
    max_train_examples: Optional[int] = _setting(
        None, "training examples used, at most", minimum=1, none="all", zero_is_none=True)
    max_val_examples: Optional[int] = _setting(
        64, "val rows for the teacher-forced validation loss after each epoch (0 = none)",
        minimum=0, none="all")
    max_eval_examples: Optional[int] = _setting(
        None, "test examples evaluated per split, at most", minimum=1, none="all",
        zero_is_none=True)
    eval_splits: tuple[str, ...] = _setting(("test",), "splits evaluated", cli=False)
    eval_batch_size: int = _setting(16, "evaluation batch size (rows), at most", minimum=1)
    eval_batch_tokens: int = _setting(
        EVAL_BATCH_TOKENS, "evaluation batch size in tokens (rows x padded length), at most: one long row "
               "runs with fewer others, or alone", minimum=1)
    prefix_cache_mb: float = _setting(
        1024.0, "memory (MB) for the frozen-prefix cache of a step whose heads all lie at or "
                "above a layer l0 > 0 (blocks below l0 then run once per row; above the budget "
                "the cache goes to disk; 0 turns it off)", minimum=0)
    strict_data: bool = _setting(
        False, "stop with DataError, before any model work, when the task data has duplicate "
               "rows or val/test rows whose prompt is also a training row's (without it: a "
               "DataWarning naming the rows; docs/gotchas.md)")
    selection_bootstrap: int = _setting(
        0, "step-1 refits on bootstrap resamples of the training data, to measure how stable "
           "the selected heads are (the selection-quality diagnostic, docs/gotchas.md); each "
           "costs one more step 1 (0: not measured)", minimum=0)
    extra: dict[str, Any] = _setting(
        help="free-form task options (e.g. {'fold': 1} for TruthfulQA, data_dir)", cli=False,
        default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "LoFiTConfig":
        """Raise ``ConfigError`` (naming the field and its value) for a value of the wrong
        type or out of range; return the config. Runs whenever a config is built (also by
        ``dataclasses.replace`` and ``from_dict``), so bad settings fail before any model
        work."""
        for f in dataclasses.fields(self):
            kind, optional = _field_kinds()[f.name]
            value = getattr(self, f.name)
            if value is None and optional:
                continue
            if kind == "k":
                _check_k(value)
            elif kind == "choice":
                try:
                    check_protocol(value)
                except ValueError as err:
                    raise ConfigError(f"{f.name}={value!r}: {err}") from None
            elif kind in ("int", "float"):
                _check_number(f, value, kind, optional)
            elif kind == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{f.name}={value!r}: must be True or False")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra={self.extra!r}: must be a dict of task options")
        return self

    def resolved(self, defaults: TaskHyperparams) -> "LoFiTConfig":
        """A copy with unset learning rates, lambda and clipping filled from the task's and
        the protocol's defaults."""
        check_protocol(self.protocol)
        clip = self.max_grad_norm
        return dataclasses.replace(
            self,
            max_grad_norm=(1.0 if self.protocol == "official" else 0.0) if clip is None else clip,
            l1_lambda=defaults.l1_lambda if self.l1_lambda is None else self.l1_lambda,
            lr_select=defaults.lr_select if self.lr_select is None else self.lr_select,
            lr_bias=defaults.lr_bias if self.lr_bias is None else self.lr_bias,
        )

    def is_resolved(self) -> bool:
        """Whether ``resolved`` has filled every task- and protocol-dependent default."""
        return None not in (self.l1_lambda, self.lr_select, self.lr_bias, self.max_grad_norm)

    def num_heads(self, total_heads: int) -> int:
        """``k`` as a head count out of ``total_heads`` (a fraction rounds, at least 1)."""
        k = self.k
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise TypeError(f"k must be an int count or a float fraction, got {k!r}")
        if isinstance(k, float) and not k.is_integer():
            if not 0 < k < 1:
                raise ValueError(f"k={k}: a fraction must lie in (0, 1)")
            return max(1, round(k * total_heads))
        if not 1 <= int(k) <= total_heads:
            raise ValueError(f"k={int(k)} heads: the model has {total_heads} heads")
        return int(k)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_splits"] = list(self.eval_splits)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoFiTConfig":
        """The config of ``to_dict``'s output (a config file), checked like any other."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"Unknown LoFiTConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "eval_splits" in d:
            d["eval_splits"] = tuple(d["eval_splits"])
        return cls(**d)


# ---------------------------------------------------------------------- checks
@functools.lru_cache(maxsize=None)
def _field_kinds() -> dict[str, tuple[str, bool]]:
    """``{field: (kind, optional)}``, kind one of bool, int, float, k, choice, other."""
    kinds = {}
    for name, hint in typing.get_type_hints(LoFiTConfig).items():
        optional = False
        if typing.get_origin(hint) is Union:
            args = typing.get_args(hint)
            rest = tuple(a for a in args if a is not type(None))
            optional = len(rest) < len(args)
            hint = rest[0] if len(rest) == 1 else Union[rest]
        if hint is bool:
            kind = "bool"
        elif hint is int:
            kind = "int"
        elif hint is float:
            kind = "float"
        elif hint == Union[int, float]:
            kind = "k"
        elif typing.get_origin(hint) is Literal:
            kind = "choice"
        else:
            kind = "other"
        kinds[name] = (kind, optional)
    return kinds


def _requirement(f: dataclasses.Field, kind: str, optional: bool) -> str:
    what = "an integer" if kind == "int" else "a finite number"
    if f.metadata.get("minimum") is not None:
        what += f" >= {f.metadata['minimum']}"
    if f.metadata.get("above") is not None:
        what += f" > {f.metadata['above']}"
    if optional:
        what += f", or None ({f.metadata.get('none') or 'unset'})"
    return what


def _check_number(f: dataclasses.Field, value: Any, kind: str, optional: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(
        value, numbers.Integral if kind == "int" else numbers.Real)
    if ok and kind == "float":
        ok = math.isfinite(value)
    minimum, above = f.metadata.get("minimum"), f.metadata.get("above")
    if ok and minimum is not None:
        ok = value >= minimum
    if ok and above is not None:
        ok = value > above
    if not ok:
        raise ConfigError(f"{f.name}={value!r}: must be {_requirement(f, kind, optional)}")


def _check_k(k: Any) -> None:
    """What ``num_heads`` can check without the model: a count >= 1 or a fraction in (0, 1)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise ConfigError(f"k={k!r}: must be a head count (int >= 1) or a fraction of all "
                          "heads (0 < float < 1)")
    if isinstance(k, numbers.Integral) or float(k).is_integer():
        if k < 1:
            raise ConfigError(f"k={k!r}: a head count must be >= 1 (or give a fraction in (0, 1))")
    elif not 0 < k < 1:
        raise ConfigError(f"k={k!r}: a fraction of all heads must lie in (0, 1)")


# ---------------------------------------------------------------------- command lines
EPOCHS = "epochs"
"""The one flag for both epochs fields: ``--epochs N`` (both steps) or ``--epochs N1 N2``."""


def config_flag_names() -> tuple[str, ...]:
    """The ``LoFiTConfig`` settings a command line can take, in field order (``epochs`` for
    ``epochs_select`` and ``epochs_bias``)."""
    names = []
    for f in dataclasses.fields(LoFiTConfig):
        if not f.metadata.get("cli", True) or f.name == "epochs_bias":
            continue
        names.append(EPOCHS if f.name == "epochs_select" else f.name)
    return tuple(names)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(name: str, value: Any) -> str:
    if name == EPOCHS:
        select, bias = value if isinstance(value, tuple) else (value, value)
        return f"{select} {bias}"
    if value is None:
        return LoFiTConfig.__dataclass_fields__[name].metadata.get("none") or "none"
    return str(value)


def add_config_arguments(parser: Union[argparse.ArgumentParser, Any], names: Sequence[str], *,
                         defaults: Optional[Mapping[str, Any]] = None,
                         fallbacks: Optional[Mapping[str, Any]] = None,
                         notes: Optional[Mapping[str, str]] = None) -> None:
    """Add a ``--field-name`` flag for each ``LoFiTConfig`` field of ``names`` (``"epochs"``:
    one flag for both epochs fields), with its type, help and range from the field; a bool
    field is a switch (``--strict-data`` sets True).

    A name in ``defaults`` gets that argparse default. The others default to ``None``, which
    means "not given": ``config_overrides`` leaves them out, and the caller's layers (a
    budget, ``fallbacks``, then ``LoFiTConfig``'s default) apply; their help shows
    ``fallbacks[name]`` or else the field's default. ``notes`` adds text to a flag's help.
    """
    defaults, fallbacks, notes = dict(defaults or {}), dict(fallbacks or {}), dict(notes or {})
    fields = LoFiTConfig.__dataclass_fields__
    for name in names:
        if name == EPOCHS:
            kwargs: dict[str, Any] = dict(type=int, nargs="+", metavar="N")
            text = "epochs: one number for both steps, or two: step 1, step 2"
            config_default: Any = (fields["epochs_select"].default, fields["epochs_bias"].default)
        else:
            f = fields[name]
            kind, optional = _field_kinds()[name]
            kwargs = {"bool": dict(action="store_true"), "int": dict(type=int),
                      "float": dict(type=float), "k": dict(type=parse_k),
                      "choice": dict(choices=typing.get_args(typing.get_type_hints(
                          LoFiTConfig)[name]))}[kind]
            text = f.metadata["help"]
            if f.metadata.get("zero_is_none"):
                text += f"; 0 = {f.metadata.get('none') or 'none'}"
            config_default = f.default
        if name in defaults:
            shown = _shown(name, defaults[name])
        else:
            shown = _shown(name, fallbacks.get(name, config_default))
        help_text = f"{text} (default: {shown}){notes.get(name, '')}"
        parser.add_argument(_flag(name), default=defaults.get(name), dest=name,
                            help=help_text.replace("%", "%%"), **kwargs)


def config_overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The ``LoFiTConfig`` fields of ``names`` given on the command line (flags added by
    ``add_config_arguments``): ``--epochs`` through ``parse_epochs``, 0 as ``None`` where
    the field says so; flags not given are left out. Raises ``ConfigError`` for an epochs
    flag with three or more numbers."""
    fields = LoFiTConfig.__dataclass_fields__
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == EPOCHS:
            out["epochs_select"], out["epochs_bias"] = parse_epochs(value)
        elif fields[name].metadata.get("zero_is_none") and value == 0:
            out[name] = None
        else:
            out[name] = value
    return out
