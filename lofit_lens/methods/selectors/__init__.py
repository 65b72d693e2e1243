"""Head selectors for bias tuning (LoFiT Table 2): which K heads get an offset v. Each is a
method (its heads, then v).

Adding one is a new module here with a ``@register_selector("name")`` function, plus its
import below (the order of these imports is their order in ``compare``'s table).
"""

from lofit_lens.methods.selectors.registry import register_selector
from lofit_lens.methods.selectors import lofit, uniform, iti_heads, bias_based, probe_layers  # noqa: I001
from lofit_lens.methods.selectors.probe_layers import probe_layer_heads
from lofit_lens.methods.selectors.uniform import random_heads

BUILT_IN = (lofit, uniform, iti_heads, bias_based, probe_layers)
"""The modules imported above for their ``@register_selector`` lines."""

__all__ = ["probe_layer_heads", "random_heads", "register_selector"]
