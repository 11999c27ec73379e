"""Linear layers on oneDNN-packed weights: the CPU fast path for the small products decoding makes.

A decode step multiplies a few rows (one per query token) by every weight matrix, and on a CPU eager `F.linear`
runs those products far below the memory bandwidth: on 2 cores the 49152 x 576 lm_head takes ~10 ms at 1 row and
~24 ms at 2 rows. With the weight reordered once into oneDNN's blocked layout (what Inductor's weight freezing
does for fp32 on CPU) the same product takes ~4 ms at 1 row, ~5 ms at 2 and ~8 ms at 9, so a verification pass
over a draft costs far less relative to a plain step. The layers keep their parameters (state-dict keys, tied
embeddings, `save_pretrained`); the packed copy serves inference only. Results are not bit-identical to `F.linear`
(a different summation order): the spec benchmark reports its greedy match rate against transformers' `generate`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward runs on a oneDNN-packed copy of its weight (no gradient flows to the weight)."""

    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], y.shape[-1])


def pack_linear_layers(model: nn.Module) -> int:
    """Switch every nn.Linear of a float32 CPU model to PackedLinear; returns how many were switched (0, with the
    reason logged, where the fast path does not apply: another device or dtype, or no oneDNN)."""
    params = next(model.parameters(), None)
    reason = None
    if params is None or params.device.type != "cpu" or params.dtype != torch.float32:
        reason = "it applies to float32 models on CPU"
    elif not torch.backends.mkldnn.is_available():
        reason = "this torch build has no oneDNN (mkldnn)"
    if reason:
        logger.info("packed linear layers not used: %s", reason)
        return 0
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    try:
        packed = [torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 1) for m in layers]
    except (RuntimeError, AttributeError) as exc:
        logger.warning("packed linear layers not used: oneDNN could not pack the weights (%s)", exc)
        return 0
    for module, weight in zip(layers, packed):
        module.__class__ = PackedLinear
        module.packed = weight
    logger.info("%d linear layers run on oneDNN-packed weights", len(layers))
    return len(layers)
