"""Baselines of the LoFiT paper on the same hook machinery, and ``compare`` to tabulate them."""

from lofit_lens.baselines.compare import compare, load_intervention, markdown_table, summary_table
from lofit_lens.baselines.base import BaselineOptions, MethodRun, RunContext
from lofit_lens.baselines.methods import METHODS, get_method
from lofit_lens.baselines.selectors import SELECTORS, register_selector

__all__ = ["METHODS", "SELECTORS", "register_selector", "BaselineOptions", "MethodRun", "RunContext", "compare", "get_method", "load_intervention",
           "markdown_table", "summary_table"]
