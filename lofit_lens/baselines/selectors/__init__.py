"""Head selectors for bias tuning (LoFiT Table 2): which K heads get an offset v.

Adding one is a new module here with a ``@register_selector("name")`` function, plus its
import below (the order of these imports is the order of ``compare``'s table).
"""

from lofit_lens.baselines.selectors.registry import SELECTORS, Selector, register_selector
from lofit_lens.baselines.selectors import lofit, uniform, iti_heads, bias_based, probe_layers  # noqa: I001
from lofit_lens.baselines.selectors.probe_layers import probe_layer_heads
from lofit_lens.baselines.selectors.uniform import random_heads

BUILT_IN = (lofit, uniform, iti_heads, bias_based, probe_layers)
"""The modules imported above for their ``@register_selector`` lines."""

__all__ = ["SELECTORS", "Selector", "probe_layer_heads", "random_heads", "register_selector"]
