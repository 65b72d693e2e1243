"""lofit-lens: LoFiT (localized fine-tuning of attention-head outputs) on TransformerLens.

    import lofit_lens as ll
    model = ll.load_model()                       # embedded SmolLM2-135M, offline
    result = ll.lofit(model, "clutrr", k=0.1, seed=0)
    ll.plot_heads(result)
"""

import os

# PyTorch's OpenMP threads spin-wait by default; with another process on the same cores a
# step gets 4-5x slower. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lofit_lens.api import lofit  # noqa: E402
from lofit_lens.baselines.compare import compare, load_intervention  # noqa: E402
from lofit_lens.budgets import BUDGETS, budget_settings  # noqa: E402
from lofit_lens.config import LoFiTConfig  # noqa: E402
from lofit_lens.doctor import DoctorReport, doctor  # noqa: E402
from lofit_lens.errors import (  # noqa: E402
    ArtifactError, BrokenEnvironmentError, ConfigError, LoFiTLensError, OutputLockedError,
    PromptTooLongError, ResultExistsError, TrainingDivergedError, UnsupportedModelError,
)
from lofit_lens.history import RunHistory, RunTimings, TrainingHistory  # noqa: E402
from lofit_lens.eval.evaluate import evaluate  # noqa: E402
from lofit_lens.eval.generation import greedy_generate as generate  # noqa: E402
from lofit_lens.analysis.cells import head_selection, random_selection  # noqa: E402
from lofit_lens.analysis.granularity import granularity_table, layer_distribution, layer_summary  # noqa: E402
from lofit_lens.intervention import HeadIntervention, Intervention  # noqa: E402
from lofit_lens.analysis.logit_lens import bias_logit_lens  # noqa: E402
from lofit_lens.backends.hf import EMBEDDED_MODELS, load_hf  # noqa: E402
from lofit_lens.backends.hooked import ModelDims, model_dims, model_id  # noqa: E402
from lofit_lens.backends.models import load_model  # noqa: E402
from lofit_lens.analysis.overlap import head_overlap, paper_style_matrix  # noqa: E402
from lofit_lens.analysis.plotting import (  # noqa: E402
    plot_heads, plot_layer_distribution, plot_overlap, plot_transfer, save_figure,
)
from lofit_lens.result import LoFiTResult  # noqa: E402
from lofit_lens.analysis.sweeps import data_efficiency, k_sweep  # noqa: E402
from lofit_lens.tasks import get_task, list_tasks, register_task  # noqa: E402
from lofit_lens.training import select_heads, tune_biases  # noqa: E402
from lofit_lens.analysis.transfer import transfer_matrix  # noqa: E402
from lofit_lens.analysis.claims import ClaimsReport, replicate_claims  # noqa: E402
from lofit_lens.analysis.claim_figures import ClaimFigures, claim_figures  # noqa: E402

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
]
