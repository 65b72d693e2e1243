"""What every compared method shares: its options, its record in the registry, one (seed,
fold) run's context (ITI probes fitted once, on demand) and what a method returns.

A method is a function ``(ctx, options) -> MethodRun`` registered in one line, e.g. at the
bottom of ``methods/lora.py``: ``register_method(Method("lora", run_lora, LoRAOptions))``.
Its options' fields become ``compare``'s keywords ``<method>_<field>`` (``lora_rank``) and the
CLI's flags ``--<method>-<field>`` (``--lora-rank``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from lofit_lens import engine
from lofit_lens.backends.hooked import model_dims
from lofit_lens.checkpoint import PhaseCheckpoint
from lofit_lens.config import LoFiTConfig
from lofit_lens.errors import ConfigError
from lofit_lens.intervention import Head
from lofit_lens.methods.probes import (
    Probes, end_q_statements, fit_probes, head_activations, statements,
)
from lofit_lens.tasks.base import Task
from lofit_lens.tasks.truthfulqa import TruthfulQA


@dataclass(frozen=True)
class MethodOptions:
    """A method's settings: subclass it as a frozen dataclass whose every field has
    ``metadata={"help": ...}``. Methods without settings use this one, which has none."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MethodOptions":
        """The options of ``to_dict``'s output (JSON lists read back as tuples)."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"Unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class MethodRun:
    """What a method produced: the thing to attach (``None``: the plain model), its
    trainable-parameter count, the heads it acts on (``None``: all or not head-based)."""

    intervention: Optional[Any]
    params: int
    heads: Optional[list[Head]] = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A compared method: ``run(ctx, options) -> MethodRun`` on one (seed, fold) run, with
    ``options`` an instance of ``options`` (``ctx.options_for(name)``)."""

    name: str
    run: Callable[["RunContext", Any], MethodRun]
    options: type[MethodOptions] = MethodOptions
    seed_independent: bool = False
    """Its result does not depend on the seed: ``compare`` runs it for the first seed only."""
    doc: str = ""
    """One line (default: the first line of ``run``'s docstring)."""

    def __post_init__(self) -> None:
        if not self.doc:
            object.__setattr__(self, "doc", (self.run.__doc__ or "").strip().split("\n")[0])

    def __call__(self, ctx: "RunContext") -> MethodRun:
        return self.run(ctx, ctx.options_for(self.name))

    def keywords(self, options: Optional[MethodOptions] = None) -> dict[str, Any]:
        """``options`` (default: the defaults) under ``compare``'s keywords ``<name>_<field>``."""
        values = (self.options() if options is None else options).to_dict()
        return {f"{self.name}_{k}": v for k, v in values.items()}


RESERVED_KEYWORDS = ("methods", "seeds", "epochs", "out", "extra", "progress", "executor", "task",
                     "model", "device", "device_map", "dtype", "data_dir", "quiet", "budget",
                     "num_processes", "overwrite", "allow_other_model", "fast", "fold", "match")
"""``compare``'s own parameters and the CLI's fixed flags: no method option may take them."""

METHODS: dict[str, Method] = {}
"""Every registered method by name, in registration order (the order of ``compare``'s
table): the built-in ones as ``lofit_lens.methods`` imports them, then any registered since."""


def register_method(method: Method) -> Method:
    """Add ``method`` to ``METHODS``. Its name is new, its options a frozen ``MethodOptions``
    dataclass with help on every field, and its keywords clash with no ``LoFiTConfig`` field
    nor another method's keyword."""
    if method.name in METHODS:
        raise ValueError(f"A method named {method.name!r} is already registered")
    cls = method.options
    if not (issubclass(cls, MethodOptions) and cls.__dataclass_params__.frozen):
        raise TypeError(f"{method.name}: options must be a frozen dataclass subclassing "
                        f"MethodOptions, got {cls!r}")
    undocumented = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]
    if undocumented:
        raise ValueError(f"{cls.__name__}: no help text on {', '.join(undocumented)} "
                         '(field(default=..., metadata={"help": "..."}))')
    taken = (set(option_keywords()) | {f.name for f in dataclasses.fields(LoFiTConfig)}
             | set(RESERVED_KEYWORDS))
    clashes = sorted(set(method.keywords()) & taken)
    if clashes:
        raise ValueError(f"{method.name}: its keywords {clashes} are already taken")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> Method:
    """Remove the method ``name`` from ``METHODS`` (and return it)."""
    return METHODS.pop(name)


def get_method(name: str) -> Method:
    """The registered method ``name`` (``ConfigError`` listing the known ones if none)."""
    check_methods([name])
    return METHODS[name]


def known_methods() -> list[str]:
    return list(METHODS)


def check_methods(names: Sequence[str]) -> None:
    """``ConfigError`` naming every unknown method in ``names`` and listing the known ones
    (the CLI calls it before a model loads)."""
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(f"Unknown method{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; known methods: "
                          f"{', '.join(known_methods())}")


def option_keywords() -> dict[str, tuple[str, str]]:
    """``{"<method>_<field>": (method, field)}`` over every registered method's options:
    ``compare``'s keywords (and, dashed, the CLI's flags)."""
    return {f"{m.name}_{f.name}": (m.name, f.name)
            for m in METHODS.values() for f in dataclasses.fields(m.options)}


def split_options(overrides: Mapping[str, Any]) -> tuple[dict[str, MethodOptions], dict[str, Any]]:
    """``(options per method named by a keyword, the other overrides)``: ``lora_rank=16``
    gives ``{"lora": LoRAOptions(rank=16)}``."""
    keywords = option_keywords()
    given: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key in keywords:
            method, name = keywords[key]
            given.setdefault(method, {})[name] = value
    options = {method: METHODS[method].options(**values) for method, values in given.items()}
    return options, {k: v for k, v in overrides.items() if k not in keywords}


class RunContext:
    """One (seed, fold) run shared by all methods; ITI probes are fitted once, on demand."""

    def __init__(self, model, task: Task, cfg: LoFiTConfig,
                 options: Optional[Mapping[str, MethodOptions]] = None,
                 progress: bool = True, phases: Optional[PhaseCheckpoint] = None):
        self.model, self.task, self.cfg, self.progress = model, task, cfg, progress
        self.options = dict(options or {})
        """Options per method name; a method not here runs with its defaults."""
        self.phases = phases
        """The engine's store its phases are read from and saved in; ``None``: not saved."""
        self.dims = model_dims(model)
        self.k = cfg.num_heads(self.dims.total_heads)
        self._probes: Optional[Probes] = None
        self.probe_seconds: Optional[float] = None

    def options_for(self, name: str) -> MethodOptions:
        """The options the method ``name`` runs with."""
        return self.options[name] if name in self.options else get_method(name).options()

    @property
    def honest_llama(self) -> bool:
        """ITI as honest_llama runs it (official protocol, TruthfulQA's CSV splits)."""
        return self.task.protocol == "official" and isinstance(self.task, TruthfulQA)

    def probes(self) -> Probes:
        if self._probes is None:
            start = time.perf_counter()
            train = self.task.train_examples(self.cfg.seed, self.cfg.max_train_examples)
            joint, batch = self.task.protocol == "official", self.cfg.eval_batch_size
            if self.honest_llama:  # train CSV fits, val CSV scores; sigma from all questions
                val = self.task.examples("val")
                found = statements(self.task, [*train, *val], self.cfg.seed)
                is_val = (found.groups >= len(train)).numpy()
                everything = [ex for split in ("train", "val", "test") for ex in self.task.examples(split)]
                sigma_acts = head_activations(self.model, end_q_statements(everything, self.cfg.seed),
                                              batch, joint=True)
            else:
                found, is_val, sigma_acts = statements(self.task, train, self.cfg.seed), None, None
            acts = head_activations(self.model, found.pairs, batch, joint=joint)
            self._probes = fit_probes(acts, found.labels, found.groups, self.cfg.seed,
                                      is_val=is_val, sigma_acts=sigma_acts)
            self.probe_seconds = time.perf_counter() - start
        return self._probes

    def tune(self, heads: Optional[Sequence[Head]], use_scale: bool = False) -> MethodRun:
        """Bias tuning (LoFiT step 2) on ``heads`` (``None``: all heads; ``use_scale``: A
        too), through the engine's ``tune`` phase in ``phases``."""
        tuned = engine.tuning(self.model, self.task, self.cfg, heads, self.phases, self.progress,
                              use_scale=use_scale)
        return MethodRun(tuned.intervention, tuned.intervention.num_trainable_parameters(),
                         None if heads is None else list(heads))
