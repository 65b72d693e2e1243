"""The compared methods (LoFiT's baselines, LoFiT's own head selection among them), one module
each, registered in ``METHODS``; ``compare`` tabulates them.

Importing this package registers the built-in methods in the order of the imports below,
which is the order of ``compare``'s table.
"""

from lofit_lens.methods.base import (
    METHODS, Method, MethodOptions, MethodRun, RunContext, check_methods, get_method,
    known_methods, register_method, unregister_method,
)
from lofit_lens.methods import zero_shot, iti, selectors, red, lora, jola, reft, repe  # noqa: I001
from lofit_lens.methods.compare import compare, load_intervention, markdown_table, summary_table
from lofit_lens.methods.selectors import register_selector

BUILT_IN = (zero_shot, iti, selectors, red, lora, jola, reft, repe)
"""The modules imported above for their registry lines."""

__all__ = ["METHODS", "Method", "MethodOptions", "MethodRun", "RunContext", "check_methods",
           "compare", "get_method", "known_methods", "load_intervention", "markdown_table",
           "register_method", "register_selector", "summary_table", "unregister_method"]
