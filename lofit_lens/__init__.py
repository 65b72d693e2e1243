"""lofit-lens: LoFiT (localized fine-tuning of attention-head outputs) on TransformerLens.

    import lofit_lens as ll
    model = ll.load_model()                       # embedded SmolLM2-135M, offline
    result = ll.lofit(model, "clutrr", k=0.1, seed=0)
    ll.plot_heads(result)
"""

import importlib
import sys
import types

# Importing the package imports none of its modules (nor torch): a public name loads its
# module on first use (PEP 562), so that ``lofit-lens`` can set up the process first
# (``cli.main``: OMP_WAIT_POLICY, docs/gotchas.md "CPU threads").
_PUBLIC = {  # module -> the public names it defines
    "lofit_lens.api": "lofit",
    "lofit_lens.methods.compare": "compare load_intervention",
    "lofit_lens.methods.base": "Method MethodOptions MethodRun register_method",
    "lofit_lens.methods.selectors": "register_selector",
    "lofit_lens.selection_quality": "SelectionQuality selection_quality",
    "lofit_lens.budgets": "BUDGETS budget_settings",
    "lofit_lens.config": "LoFiTConfig",
    "lofit_lens.doctor": "DoctorReport doctor",
    "lofit_lens.errors": "ArtifactError BrokenEnvironmentError ConfigError LoFiTLensError "
                         "OutputLockedError PromptTooLongError ResultExistsError "
                         "SelectionQualityWarning TrainingDivergedError UnsupportedModelError",
    "lofit_lens.history": "RunHistory RunTimings TrainingHistory",
    "lofit_lens.eval.evaluate": "evaluate",
    "lofit_lens.eval.generation": "generate",
    "lofit_lens.analysis.cells": "head_selection random_selection",
    "lofit_lens.analysis.granularity": "granularity_table layer_distribution layer_summary",
    "lofit_lens.intervention": "HeadIntervention Intervention",
    "lofit_lens.analysis.logit_lens": "bias_logit_lens",
    "lofit_lens.backends.hf": "EMBEDDED_MODELS load_hf",
    "lofit_lens.backends.hooked": "ModelDims model_dims model_id",
    "lofit_lens.backends.models": "load_model",
    "lofit_lens.analysis.overlap": "head_overlap paper_style_matrix",
    "lofit_lens.analysis.plotting": "plot_heads plot_layer_distribution plot_overlap "
                                    "plot_transfer plot_k_sweep plot_data_efficiency save_figure",
    "lofit_lens.result": "LoFiTResult",
    "lofit_lens.analysis.sweeps": "data_efficiency k_sweep",
    "lofit_lens.tasks": "get_task list_tasks register_task",
    "lofit_lens.training": "select_heads tune_biases",
    "lofit_lens.analysis.transfer": "transfer_matrix",
    "lofit_lens.analysis.claims": "ClaimsReport replicate_claims",
    "lofit_lens.analysis.claim_figures": "ClaimFigures claim_figures",
}
_RENAMED = {"generate": "greedy_generate"}  # public name -> its name in its module
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names.split()}


def _load(name: str):
    value = getattr(importlib.import_module(_MODULE_OF[name]), _RENAMED.get(name, name))
    globals()[name] = value  # later reads find it without __getattr__
    return value


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _load(name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Loading the submodule lofit_lens.doctor binds it to the package as ``doctor``:
        # the public function keeps that name.
        if name in _MODULE_OF and isinstance(value, types.ModuleType):
            value = _load(name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__version__ = "0.2.0"

__all__ = [
    "BrokenEnvironmentError", "DoctorReport", "EMBEDDED_MODELS", "HeadIntervention", "LoFiTLensError", "LoFiTConfig", "LoFiTResult", "bias_logit_lens",
    "evaluate", "get_task", "granularity_table", "head_overlap", "layer_distribution",
    "layer_summary", "list_tasks", "load_hf", "load_model", "lofit", "paper_style_matrix",
    "plot_heads", "plot_layer_distribution", "plot_overlap", "plot_transfer", "register_task",
    "save_figure", "select_heads", "tune_biases", "data_efficiency", "k_sweep", "transfer_matrix",
    "compare", "doctor", "generate", "load_intervention", "Intervention", "TrainingHistory",
    "RunHistory", "RunTimings", "ArtifactError", "ConfigError", "OutputLockedError",
    "PromptTooLongError", "ResultExistsError", "TrainingDivergedError", "UnsupportedModelError",
    "head_selection", "random_selection", "ModelDims", "model_dims", "model_id", "BUDGETS",
    "budget_settings", "ClaimsReport", "replicate_claims", "ClaimFigures", "claim_figures",
    "plot_k_sweep", "plot_data_efficiency", "Method", "MethodOptions", "MethodRun",
    "register_method", "register_selector", "SelectionQuality", "selection_quality",
    "SelectionQualityWarning",
]
