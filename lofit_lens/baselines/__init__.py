"""Baselines of the LoFiT paper on the same hook machinery, and ``compare`` to tabulate them."""

from lofit_lens.baselines.compare import compare, load_intervention, markdown_table, summary_table
from lofit_lens.baselines.methods import METHODS, BaselineOptions, MethodRun, RunContext, get_method

__all__ = ["METHODS", "BaselineOptions", "MethodRun", "RunContext", "compare", "get_method", "load_intervention",
           "markdown_table", "summary_table"]
