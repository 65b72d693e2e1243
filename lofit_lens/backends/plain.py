"""The plain view: the HF model a ``TransformerBridge`` wraps, as plain HF modules that share
its weights, for the hot paths (training steps, generation, MC scoring).

A bridge swaps its components into the HF model it wraps and reimplements attention (eager)
so that every hook point fires; on a GPU that costs 1.4-1.9x a plain HF forward. The plain
view is a second module tree over the same parameter and buffer tensors (nothing is
copied), without bridge components, running HF's own attention implementation (the one HF
picks when it loads the model: sdpa for Llama and Gemma).

Hooks added through ``backends.hooked.attached_hooks`` (every intervention of lofit-lens) are
mirrored onto the view at the HF module where the bridge fires them, with the hook point's
own shape conversion, so the same function sees the same tensor:

- ``hook_in`` of a linear, block or norm component -> a forward pre-hook on its HF module
  (``blocks.{l}.attn.hook_z`` is ``attn.o.hook_in``: the ``o_proj`` input, ``[batch, pos,
  n_heads * d_head]`` shown to the hook as ``[batch, pos, n_heads, d_head]``);
- ``hook_out`` of one -> a forward hook on its output (``hook_resid_post``, ``hook_q``...).

Hooks on points the bridge fires inside its own attention (``hook_pattern``,
``hook_attn_scores``, ``hook_rot_q``...) have no plain counterpart. ``plain_runner`` hands a
hot path the view only while every hook on the bridge and on the HF model it wraps is a
mirrored one; any other hook (``model.add_hook``, ``run_with_hooks``, a torch hook on a
module) keeps that forward on the bridge, where it fires. ``doctor`` checks that both paths
compute the same logits.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from torch import Tensor, nn

logger = logging.getLogger(__name__)

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
"""The per-module hook registries of torch (``*_with_kwargs`` are flags on these entries)."""

VIEW_ATTRIBUTE = "_lofit_plain_view"
LIBRARY_HOOK_MODULES = ("transformers.", "transformer_lens.model_bridge.")


class PlainViewUnavailable(Exception):
    """The bridge's modules cannot be viewed as plain HF modules (the reason is the message)."""


@dataclass
class PlainView:
    """The plain model of one bridge and what it takes to mirror that bridge's hooks."""

    hf: nn.Module
    """The plain ``PreTrainedModel`` (``...ForCausalLM``), in eval mode."""
    attn_implementation: str
    twins: dict[int, nn.Module]
    """``id(HF module inside the bridge)`` -> its plain twin."""
    owners: dict[int, tuple[str, nn.Module]]
    """``id(HookPoint)`` -> ("in" or "out", the bridge component that fires it around its HF
    module), for the hook points that can be mirrored."""
    watched: list[dict]
    """Every hook registry of the bridge's modules and of the HF model it wraps."""
    mirrored: int = 0
    """How many of the hooks in ``watched`` have a twin on the view right now."""
    live: int = 0
    """Hooks the view holds right now (``doctor``: none may be left behind)."""

    def foreign_hooks(self) -> int:
        """Hooks on the bridge that are neither the libraries' own nor mirrored (0: the view
        computes what the bridge computes)."""
        total = self.total_hooks()
        if total == self.mirrored:
            return 0
        own = sum(_library_hook(fn) for hooks in self.watched if hooks for fn in hooks.values())
        return total - self.mirrored - own

    def total_hooks(self) -> int:
        return sum(map(len, self.watched))

    @contextlib.contextmanager
    def mirror(self, points: Sequence[tuple[Any, Callable]], added: int) -> Iterator[None]:
        """Mirror hooks given as (HookPoint, fn) (``added``: the torch hooks the bridge got for
        them) for the ``with`` body; when any point has no plain counterpart, none is, and the
        bridge runs."""
        if any(id(point) not in self.owners for point, _ in points):
            yield
            return
        handles = [self._register(point, fn) for point, fn in points]
        self.mirrored += added
        self.live += len(handles)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.mirrored -= added
            self.live -= len(handles)

    def _register(self, point, fn: Callable):
        kind, component = self.owners[id(point)]
        twin = self.twins[id(component.original_component)]
        call = functools.partial(_call_hook, point, fn)
        if kind == "in":
            return twin.register_forward_pre_hook(functools.partial(_edit_input, call), with_kwargs=True)
        return twin.register_forward_hook(functools.partial(_edit_output, call))


def _library_hook(fn: Callable) -> bool:
    """Whether a torch hook is one the libraries put on their own modules: transformers' output
    capturing and the bridge's capture of the residual at its norms. They record what passes;
    every other hook (a ``HookPoint``'s included) may edit it."""
    return (getattr(fn, "__module__", None) or "").startswith(LIBRARY_HOOK_MODULES)


def _call_hook(point, fn: Callable, x: Tensor) -> Optional[Tensor]:
    """``fn`` on ``x`` as the hook point shows it (its shape conversion there and back)."""
    conversion = point.hook_conversion
    result = fn(conversion.convert(x) if conversion is not None else x, hook=point)
    if result is None or conversion is None:
        return result
    return conversion.revert(result)


def _edit_input(call: Callable, module, args: tuple, kwargs: dict):
    """Forward pre-hook: the module's first tensor input (positional or ``hidden_states``)."""
    if args and isinstance(args[0], Tensor):
        result = call(args[0])
        return None if result is None else ((result, *args[1:]), kwargs)
    if isinstance(kwargs.get("hidden_states"), Tensor):
        result = call(kwargs["hidden_states"])
        return None if result is None else (args, {**kwargs, "hidden_states": result})
    return None


def _edit_output(call: Callable, module, args: tuple, output: Any):
    """Forward hook: the module's output tensor (or the first element of its output tuple)."""
    if isinstance(output, Tensor):
        return call(output)
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        result = call(output[0])
        return None if result is None else (result, *output[1:])
    return None


def plain_view(model) -> Optional[PlainView]:
    """The plain view of a ``TransformerBridge`` (built once, kept on the model), or ``None``
    for a TL 3.x ``HookedTransformer`` and for a model whose modules cannot be viewed (an
    accelerate device map with dispatch hooks: logged once, the bridge runs)."""
    if not hasattr(model, "original_model"):
        return None
    view = model.__dict__.get(VIEW_ATTRIBUTE)
    if view is None:
        try:
            view = _build(model)
        except PlainViewUnavailable as why:
            logger.info("%s: hot paths run through the bridge (%s)",
                        getattr(model, "lofit_model_id", type(model).__name__), why)
            view = False
        model.__dict__[VIEW_ATTRIBUTE] = view
    return view or None


def plain_runner(model) -> Optional[nn.Module]:
    """The plain HF model to run ``model``'s forward on, or ``None`` (run the bridge): the view
    when every hook on the bridge is mirrored on it."""
    view = plain_view(model)
    if view is None:
        return None
    if view.foreign_hooks():
        logger.debug("a hook lofit-lens did not mirror is attached: this forward runs the bridge")
        return None
    return view.hf


def _build(model) -> PlainView:
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    hf = model.original_model
    implementation = attn_implementation(model)
    configs = _config_twins(hf.config, implementation)
    twins: dict[int, nn.Module] = {}

    def twin_of(module: nn.Module) -> nn.Module:
        while isinstance(module, GeneralizedComponent):
            module = module.original_component
        if id(module) in twins:
            return twins[id(module)]
        if "forward" in module.__dict__ or hasattr(module, "_hf_hook"):
            raise PlainViewUnavailable(f"{type(module).__name__} has its forward replaced "
                                       "(accelerate dispatch hooks of a device map)")
        twin = copy.copy(module)
        twins[id(module)] = twin
        # The same parameter and buffer registries: a later .to() reaches both trees.
        twin._parameters, twin._buffers = module._parameters, module._buffers
        twin._modules = {name: None if child is None else twin_of(child)
                         for name, child in module._modules.items()}
        for name in HOOK_DICTS + ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                  "_forward_pre_hooks_with_kwargs"):
            if hasattr(module, name):  # the view starts with no hooks of its own
                setattr(twin, name, type(getattr(module, name))())
        for name, value in vars(module).items():
            if id(value) in configs:
                setattr(twin, name, configs[id(value)])
        return twin

    plain = twin_of(hf).eval()
    modules = {id(m): m for m in (*model.modules(), *hf.modules())}
    watched = [getattr(m, name) for m in modules.values() for name in HOOK_DICTS]
    return PlainView(plain, implementation, twins, _mirrorable_points(model, twins), watched)


def _mirrorable_points(model, twins: dict[int, nn.Module]) -> dict[int, tuple[str, nn.Module]]:
    """``id(HookPoint)`` -> (kind, component) for the hook_in / hook_out of the bridge's
    linear, block and norm components (each calls its HF module between the two)."""
    from transformer_lens.model_bridge.generalized_components.block import BlockBridge
    from transformer_lens.model_bridge.generalized_components.linear import LinearBridge
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

    owners: dict[int, tuple[str, nn.Module]] = {}
    for component in model.modules():
        if not isinstance(component, (LinearBridge, BlockBridge, NormalizationBridge)):
            continue
        if id(getattr(component, "original_component", None)) not in twins:
            continue
        for kind in ("in", "out"):
            point = getattr(component, f"hook_{kind}", None)
            if point is not None:
                owners[id(point)] = (kind, component)
    return owners


def _config_twins(config, implementation: str) -> dict[int, Any]:
    """``id(config)`` -> a deep copy set to ``implementation``, for the config and each of its
    sub-configs (a composite model's text config)."""
    from transformers import PretrainedConfig

    twin = copy.deepcopy(config)
    twin._attn_implementation = implementation
    mapping = {id(config): twin}
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            mapping[id(value)] = getattr(twin, name)
    return mapping


def attn_implementation(model) -> str:
    """The attention implementation of ``model``'s plain view: what HF chose when it loaded the
    model (``load_model`` records it), else sdpa where the architecture supports it."""
    chosen = getattr(model, "lofit_attn_implementation", None)
    if chosen:
        return chosen
    return "sdpa" if getattr(model.original_model, "_supports_sdpa", False) else "eager"
