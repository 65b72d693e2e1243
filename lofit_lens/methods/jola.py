"""JoLA (Lai, Fraser and Titov, ICML 2025, arXiv 2502.01179): LoFiT's A and v on every head,
each behind a HardConcrete gate, trained in one stage with an expected-L0 penalty.

At ``blocks.{l}.attn.hook_z``, for every head ``(l, h)`` and every position::

    z <- (1 + g_A[l, h] * A[l, h]) * z + g_v[l, h] * v[l, h]

with two gates per head, each a HardConcrete variable (Louizos, Welling and Kingma 2018) of
its own ``log_alpha``, temperature ``beta = 0.33`` and stretch ``(gamma, zeta) = (-0.1, 1.1)``:

- training: ``u ~ U(eps, 1 - eps)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
  ``g = clamp(s * (zeta - gamma) + gamma, 0, 1)``; one draw per head and forward pass, shared
  by the batch and the positions, as in JoLA's code;
- evaluation: deterministic, ``g = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``
  (no noise, no temperature): a gate with ``sigmoid(log_alpha) <= 1/12`` is exactly 0;
- the probability that a gate is not exactly zero, its expected L0 norm, is
  ``P(open) = sigmoid(log_alpha - beta * log(-gamma / zeta))``.

The loss is the task loss plus ``l0_lambda`` times the MEAN of ``P(open)`` over all ``2 L H``
gates (``JoLAOptions.l0_lambda``, ``--jola-l0-lambda``, default 0.05), the one weight of this
implementation. JoLA's trainer (``JoLATrainer.compute_loss`` in wenlai-lavine/jola) instead
adds ``lambda_t / (L H^2)`` per v-gate and ``(1 - lambda_t) / (L H^2)`` per A-gate
(``get_penalty`` averages over a layer's heads, then the sum over layers is divided by
``L * H`` again), with ``lambda_t = 0.1 * exp(-0.01 t)`` (its default "expon" schedule; the
``gate_lambda`` of its config.yaml is not read by the trainer). So it penalises almost only
the A-gates, by about ``2 / H`` in our units: 0.056 for Llama-3.1-8B's 32 heads per layer,
which is where 0.05 comes from. Here both kinds of gates get the same weight.

Initialisation as JoLA's code: A, v ~ N(0, ``init_std``) (1e-3), each layer's log-alphas
``xavier_uniform`` on an ``[H, 1]`` tensor, i.e. U(-b, b) with ``b = sqrt(6 / (H + 1))``.
Training is LoFiT's loop (``training.train_intervention``: AdamW, linear decay, no L1), for
``epochs_bias`` epochs at ``jola_lr`` (default: the run's ``lr_select``, LoFiT's rate for A on
every head; 5e-3 for the three tasks, the rate of JoLA's own config, which trains 20 epochs).
Step 2's ``lr_bias`` is meant for v on K heads: at the quick budget's 5e-2, A and v on all
heads diverged on TruthfulQA (DPO) with SmolLM2. ``JoLA.head_scores()`` is the probability that a head is edited at all,
``1 - (1 - P_A(open)) (1 - P_v(open))``; ``jola_result`` wraps it in a ``LoFiTResult`` so that
``plot_heads`` and ``head_overlap`` read JoLA's heads as they read LoFiT's.

Trainable parameters: ``2 * L * H * d_head`` (A and v) + ``2 * L * H`` (the log-alphas).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

from lofit_lens.backends.hooked import ModelDims, attached_hooks, hook_z_name, model_dims
from lofit_lens.config import LoFiTConfig
from lofit_lens.errors import ModelMismatchError
from lofit_lens.history import RunHistory, TrainingHistory
from lofit_lens.intervention import Head, register_intervention, top_heads
from lofit_lens.methods.base import Method, MethodOptions, MethodRun, RunContext, register_method
from lofit_lens.result import LoFiTResult
from lofit_lens.tasks.base import Task
from lofit_lens.training import TrainingSet, train_intervention

TEMPERATURE = 0.33
"""beta of the HardConcrete gates (JoLA's ``gate_hp['temperature']``)."""
STRETCH = (-0.1, 1.1)
"""(gamma, zeta): the interval the concrete sample is stretched to before clamping to [0, 1]."""
EPS = 1e-6
"""The uniform noise is drawn from (EPS, 1 - EPS), as JoLA's code does."""


# ---------------------------------------------------------------------- HardConcrete gates
def sample_gate(log_alpha: Tensor, noise: Tensor) -> Tensor:
    """A training-time gate for uniform ``noise`` in (0, 1) (see the module docstring)."""
    gamma, zeta = STRETCH
    s = torch.sigmoid((torch.log(noise) - torch.log1p(-noise) + log_alpha) / TEMPERATURE)
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)


def deterministic_gate(log_alpha: Tensor) -> Tensor:
    """The evaluation-time gate: ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``."""
    gamma, zeta = STRETCH
    return torch.clamp(torch.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def open_probability(log_alpha: Tensor) -> Tensor:
    """P(gate != 0), the gate's expected L0 norm: ``sigmoid(log_alpha - beta log(-gamma/zeta))``."""
    gamma, zeta = STRETCH
    return torch.sigmoid(log_alpha - TEMPERATURE * math.log(-gamma / zeta))


# ---------------------------------------------------------------------- the intervention
@register_intervention
class JoLA(nn.Module):
    """Gated scales A and offsets v on every head (``[L, H, d_head]`` fp32) with per-head
    log-alphas for the A-gates and the v-gates (``[L, H]``)."""

    kind: ClassVar[str] = "jola"

    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dims = ModelDims(*dims)
        n_layers, n_heads, d_head = self.dims
        self.scale = nn.Parameter(torch.zeros(n_layers, n_heads, d_head))
        self.bias = nn.Parameter(torch.zeros(n_layers, n_heads, d_head))
        self.log_alpha_scale = nn.Parameter(torch.zeros(n_layers, n_heads))
        self.log_alpha_bias = nn.Parameter(torch.zeros(n_layers, n_heads))
        self.noise: Optional[torch.Generator] = None
        """Draws the training-time gate noise (seeded by ``init``; ``None``: torch's global RNG)."""

    @classmethod
    def for_model(cls, model) -> "JoLA":
        return cls(model_dims(model))

    @torch.no_grad()
    def init(self, std: float = 1e-3, seed: int = 0) -> "JoLA":
        """JoLA's initialisation (module docstring), seeded; the gate noise seeded from it."""
        generator = torch.Generator().manual_seed(seed)
        n_heads = self.dims.n_heads
        bound = math.sqrt(6.0 / (n_heads + 1))  # xavier_uniform_ of an [H, 1] tensor
        for param in (self.scale, self.bias):
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        for param in (self.log_alpha_scale, self.log_alpha_bias):
            param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
        self.noise = torch.Generator().manual_seed(seed + 1)
        return self

    # ------------------------------------------------------------------ the protocol
    def trainable(self) -> list[nn.Parameter]:
        return [self.scale, self.bias, self.log_alpha_scale, self.log_alpha_bias]

    def l1_parameters(self) -> list[nn.Parameter]:
        return []  # the penalty is the expected L0 of the gates (``penalty``), not an L1

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable())

    def first_layer(self) -> int:
        return 0  # every head of every layer has its gates

    def spec(self) -> dict[str, Any]:
        return {"dims": list(self.dims)}

    def state_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).detach()
                for name in ("scale", "bias", "log_alpha_scale", "log_alpha_bias")}

    @classmethod
    def from_saved(cls, spec: dict[str, Any], tensors: dict[str, Tensor]) -> "JoLA":
        module = cls(ModelDims(*spec["dims"]))
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(module, name).copy_(value)
        return module.eval()

    # ------------------------------------------------------------------ reading the gates
    def open_probabilities(self) -> tuple[Float[Tensor, "layer head"], Float[Tensor, "layer head"]]:
        """P(open) of the A-gates and of the v-gates (detached)."""
        return (open_probability(self.log_alpha_scale.detach()),
                open_probability(self.log_alpha_bias.detach()))

    def head_scores(self) -> Float[Tensor, "layer head"]:
        """P(a head is edited at all) = ``1 - (1 - P_A) (1 - P_v)`` (the gates are independent)."""
        p_scale, p_bias = self.open_probabilities()
        return 1 - (1 - p_scale) * (1 - p_bias)

    def eval_gates(self) -> tuple[Float[Tensor, "layer head"], Float[Tensor, "layer head"]]:
        """The deterministic (evaluation) gates of A and of v."""
        return (deterministic_gate(self.log_alpha_scale.detach()),
                deterministic_gate(self.log_alpha_bias.detach()))

    @property
    def active_heads(self) -> list[Head]:
        """Heads edited at evaluation (either deterministic gate above 0), by score."""
        g_scale, g_bias = self.eval_gates()
        edited = (g_scale > 0) | (g_bias > 0)
        return [h for h in top_heads(self.head_scores(), edited.numel()) if edited[h]]

    def penalty(self) -> Float[Tensor, ""]:
        """The mean expected L0 over all ``2 L H`` gates (differentiable)."""
        return 0.5 * (open_probability(self.log_alpha_scale).mean()
                      + open_probability(self.log_alpha_bias).mean())

    # ------------------------------------------------------------------ applying
    def _gates(self, layer: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if not self.training:
            return deterministic_gate(self.log_alpha_scale[layer]), deterministic_gate(self.log_alpha_bias[layer])
        shape = (2, self.dims.n_heads)
        noise = (1 - 2 * EPS) * torch.rand(shape, generator=self.noise) + EPS
        noise = noise.to(device)
        return (sample_gate(self.log_alpha_scale[layer], noise[0]),
                sample_gate(self.log_alpha_bias[layer], noise[1]))

    def edit(self, z: Float[Tensor, "batch pos head d_head"], layer: int) -> Float[Tensor, "batch pos head d_head"]:
        """``(1 + g_A A) z + g_v v`` on every head of ``layer``."""
        if z.ndim != 4 or tuple(z.shape[-2:]) != (self.dims.n_heads, self.dims.d_head):
            raise ValueError(f"blocks.{layer}.attn.hook_z has shape {tuple(z.shape)}; expected "
                             f"[batch, pos, {self.dims.n_heads}, {self.dims.d_head}]")
        g_scale, g_bias = self._gates(layer, z.device)
        factor = (1 + g_scale[:, None] * self.scale[layer]).to(z.dtype)  # [head, d_head]
        offset = (g_bias[:, None] * self.bias[layer]).to(z.dtype)
        return z * einops.rearrange(factor, "head d -> 1 1 head d") \
            + einops.rearrange(offset, "head d -> 1 1 head d")

    def hooks(self) -> list[tuple[str, Callable]]:
        def hook_fn(z: Tensor, hook, layer: int) -> Tensor:
            return self.edit(z, layer)

        return [(hook_z_name(layer), functools.partial(hook_fn, layer=layer))
                for layer in range(self.dims.n_layers)]

    @contextlib.contextmanager
    def attach(self, model) -> Iterator["JoLA"]:
        """Apply JoLA to ``model`` inside the ``with`` body (hooks removed after)."""
        dims = model_dims(model)
        if dims != self.dims:
            raise ModelMismatchError(f"JoLA built for {self.dims}, model has {dims}: "
                                     "apply it to a model of that shape (the one it "
                                     "was trained on)")
        self.to(next(iter(model.parameters())).device)
        with attached_hooks(model, self.hooks()):
            yield self


# ---------------------------------------------------------------------- objectives
class DelegatingObjective:
    """An objective that runs another one (``inner``): its data, its DPO reference log-probs
    and its frozen-prefix store are the inner objective's. Subclasses change ``loss``."""

    def __init__(self, inner):
        self.__dict__["inner"] = inner

    def __getattr__(self, name: str):  # everything not defined here is the inner objective's
        return getattr(self.__dict__["inner"], name)

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def prefix_store(self):
        return self.inner.prefix_store

    @prefix_store.setter
    def prefix_store(self, store) -> None:
        self.inner.prefix_store = store

    @property
    def reference(self):
        return self.inner.reference

    @reference.setter
    def reference(self, value) -> None:
        self.inner.reference = value

    def loss(self, model, indices: Sequence[int]) -> Tensor:
        return self.inner.loss(model, indices)

    def check_value(self, model, indices: Sequence[int]) -> Tensor:
        return self.inner.check_value(model, indices)


class L0PenalisedObjective(DelegatingObjective):
    """The task loss plus ``weight * jola.penalty()`` (training only: validation losses are
    the task's own)."""

    def __init__(self, inner, jola: JoLA, weight: float):
        super().__init__(inner)
        self.__dict__.update(jola=jola, weight=weight)

    def loss(self, model, indices: Sequence[int]) -> Tensor:
        loss = self.inner.loss(model, indices)
        return loss + self.weight * self.jola.penalty() if self.weight else loss


# ---------------------------------------------------------------------- training
def train_jola(model, task: Task, cfg: LoFiTConfig, *, l0_lambda: float, lr: Optional[float] = None,
               progress: bool = True,
               data: Optional[TrainingSet] = None) -> tuple[JoLA, TrainingHistory, Tensor]:
    """JoLA trained in one stage on the run's data; returns it (in eval mode), the history
    (its step losses include the penalty, its validation losses do not) and the head scores
    at initialisation."""
    data = data or TrainingSet.build(model, task, cfg)
    jola = JoLA.for_model(model).init(cfg.init_std, cfg.seed)
    initial = jola.head_scores()
    train = L0PenalisedObjective(data.train, jola, l0_lambda)
    history = train_intervention(
        model, jola, train, data.val, epochs=cfg.epochs_bias, lr=lr or cfg.lr_select,
        l1_lambda=0.0, batch_size=cfg.batch_size, seed=cfg.seed + 1,
        weight_decay=cfg.weight_decay, adam_eps=cfg.adam_eps, max_grad_norm=cfg.max_grad_norm,
        prefix_budget_mb=cfg.prefix_cache_mb, desc="JoLA", progress=progress)
    history.data_hash, history.n_train = data.data_hash, len(data.train)
    history.trainable_parameters = jola.num_trainable_parameters()
    return jola, history, initial


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two equally shaped tensors (average ranks for ties)."""
    from scipy.stats import spearmanr

    x, y = a.flatten().numpy(), b.flatten().numpy()
    if x.min() == x.max() or y.min() == y.max():
        return float("nan")  # a constant map has no ranking
    return float(spearmanr(x, y).statistic)


def jola_result(jola: JoLA, cfg: LoFiTConfig, model_name: str, k: Optional[int] = None,
                history: Optional[TrainingHistory] = None) -> LoFiTResult:
    """A ``LoFiTResult`` of JoLA's heads for the head-set analyses (``plot_heads``,
    ``head_overlap``): ``head_scores`` = P(head edited), ``selected_heads`` = the top ``k``
    by it (``None``: the heads edited at evaluation), ``scale`` and ``bias`` = A and v times
    their deterministic gates. Its ``intervention()`` is LoFiT's bias-only one, so it does not
    reproduce JoLA's edit: evaluate the ``JoLA`` module itself for that."""
    g_scale, g_bias = jola.eval_gates()
    scores = jola.head_scores()
    heads = jola.active_heads if k is None else top_heads(scores, k)
    return LoFiTResult(config=cfg, model_id=model_name, head_scores=scores,
                       scale=(jola.scale.detach() * g_scale[..., None]).cpu(),
                       bias=(jola.bias.detach() * g_bias[..., None]).cpu(),
                       selected_heads=heads,
                       history=RunHistory(history) if history is not None else RunHistory(),
                       data_hash=history.data_hash if history is not None else "")


def jola_info(jola: JoLA, initial_scores: Tensor, l0_lambda: float, lr: float) -> dict[str, Any]:
    """What a ``compare`` run records of JoLA's gates (JSON-able)."""
    p_scale, p_bias = jola.open_probabilities()
    g_scale, g_bias = jola.eval_gates()
    scores = jola.head_scores()
    return {
        "l0_lambda": l0_lambda, "lr": lr,
        "head_scores": [[round(float(x), 6) for x in row] for row in scores],
        "open_scale_gates": int((g_scale > 0).sum()), "open_bias_gates": int((g_bias > 0).sum()),
        "edited_heads": len(jola.active_heads), "total_heads": jola.dims.total_heads,
        "mean_open_probability": {"scale": float(p_scale.mean()), "bias": float(p_bias.mean())},
        "spearman_with_init": spearman(scores, initial_scores),
    }


@dataclass(frozen=True)
class JoLAOptions(MethodOptions):
    """JoLA's settings (``compare(jola_l0_lambda=...)``, ``--jola-l0-lambda``)."""

    l0_lambda: float = field(default=0.05, metadata={
        "help": "weight of the mean expected L0 over all gates"})
    lr: Optional[float] = field(default=None, metadata={
        "help": "learning rate (default: the run's lr_select, LoFiT's rate for A on every head)"})


def run_jola(ctx: RunContext, options: JoLAOptions) -> MethodRun:
    """JoLA: gated A and v on every head, one stage, expected-L0 penalty."""
    module, _, initial = train_jola(ctx.model, ctx.task, ctx.cfg, l0_lambda=options.l0_lambda,
                                    lr=options.lr, progress=ctx.progress)
    return MethodRun(module, module.num_trainable_parameters(), module.active_heads,
                     jola_info(module, initial, options.l0_lambda, options.lr or ctx.cfg.lr_select))


register_method(Method("jola", run_jola, JoLAOptions))
