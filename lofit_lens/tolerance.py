"""How far two correct computations of the same logits may differ in a given precision.

Two paths that compute the same thing (a KV cache against a full forward, sdpa against eager
attention, a padded batch against one row, a frozen prefix against the whole model) round
differently. The difference grows with the dtype's epsilon, with depth (roughly as the
square root of the layer count: independent rounding errors add up) and with the size of
the logits. The bound used here:

    tolerance = per_layer(dtype) * sqrt(n_layers) * scale
    per_layer = max(EPS_FACTOR * finfo(dtype).eps, REORDER_FLOOR)

``scale`` is the largest reference logit magnitude. Measured (docs/gpu.md): correct paths
differ by up to 0.023 x scale in bf16 on SmolLM2-135M on a CPU (30 layers; 3 epsilon), by up
to 0.06 x scale on a random-init Llama-2-7B shape in bf16 on an H200 (32 layers), and by
1.8e-6 x scale in fp32 (reductions in another order, 15 epsilon); the faults the doctor looks
for (a lost KV cache, attention to padding) differ by 0.4 x scale or more on SmolLM2 in
either dtype. The bound is 0.17 x scale in bf16 and 1.1e-4 x scale in fp32 at 30 layers:
3-7 times the rounding, 2.5 times below the faults.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPS_FACTOR = 4.0
"""bf16 and fp16 matrix products accumulate in fp32: what differs is the rounding of results,
a few epsilon per layer."""
REORDER_FLOOR = 2e-5
"""fp32: the order of a reduction (kernel, batch shape, attention implementation) changes
results by about 1e-6 relative per layer; this is the floor of ``per_layer``."""


def per_layer(dtype: torch.dtype) -> float:
    """Relative rounding difference allowed per layer in ``dtype``."""
    return max(EPS_FACTOR * torch.finfo(dtype).eps, REORDER_FLOOR)


def logit_tolerance(dtype: torch.dtype, n_layers: int, reference: Tensor) -> float:
    """The largest difference allowed between logits computed two correct ways, given the
    ``reference`` logits (any shape) of a model of ``n_layers`` layers in ``dtype``."""
    scale = float(reference.detach().abs().max()) if reference.numel() else 0.0
    return per_layer(dtype) * math.sqrt(max(1, n_layers)) * scale


def model_dtype(model) -> torch.dtype:
    """The dtype a hooked model computes in (its first floating-point parameter's)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32
