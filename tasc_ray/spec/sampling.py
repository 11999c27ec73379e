"""Sampling parameters and the verification rule: the target's token at every query position, and how many
draft tokens it accepts.

The draft is a point mass, so verification is the same for greedy and sampled rows: take the target's token
x_j at each position j (argmax, or an independent sample from the warped distribution) and accept the longest
draft prefix with d_j == x_j. The emitted tokens are then exactly what decoding without drafts would emit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    speculative: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def logits_warpers(params: SamplingParams) -> LogitsProcessorList | None:
    """Temperature, top-k and top-p as transformers' warpers; None for greedy decoding."""
    if params.greedy:
        return None
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return warpers


def target_tokens(
    logits: torch.Tensor, warpers: LogitsProcessorList | None, generator: torch.Generator | None
) -> torch.Tensor:
    """The target's token at every position of [B, q, V] logits: argmax, or an independent sample from the
    warped distribution."""
    if warpers is None:
        return logits.argmax(dim=-1)
    b, q, v = logits.shape
    scores = warpers(None, logits.reshape(b * q, v))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).reshape(b, q)


def accepted_lengths(drafts: torch.Tensor, target: torch.Tensor, draft_valid: torch.Tensor) -> torch.Tensor:
    """n_i = the length of the longest prefix of row i's draft [B, k] equal to the target's tokens [B, k + 1]."""
    agree = (drafts == target[:, :-1]) & draft_valid
    return agree.long().cumprod(dim=1).sum(dim=1)
