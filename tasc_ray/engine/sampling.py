"""Sampling parameters and what they do to the target's distribution: per-row samplers, logit adjustments,
log-probabilities. (How a draft is accepted is verify.py.)

A sampled row draws the token at output position t with a generator seeded from (row seed, t), so its output
depends only on its seed: not on the drafts, nor on which other rows share its batch. A seeded request gives
the same text with or without speculation, alone or batched.

`logit_bias` and presence/frequency penalties change the target distribution itself (`adjust_logits`); they are
applied at every verified position as if the draft tokens on the path to it had been emitted, so speculation
stays lossless under them too. `logprobs` reports the model's own log-probabilities (before any adjustment) of
each emitted token and its top alternatives.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
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
    ignore_eos: bool = False  # decode through end-of-sequence tokens up to max_new_tokens (benchmarks, tests)
    logprobs: int | None = None  # report each emitted token's log-probability and this many top alternatives
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    presence_penalty: float = 0.0  # subtracted from a token's logit once it appears in the output
    frequency_penalty: float = 0.0  # subtracted once per time a token appears in the output

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def adjust_logits(
    logits: torch.Tensor, params: SamplingParams, output: Sequence[int], paths: Sequence[Sequence[int]]
) -> None:
    """Apply logit_bias and the presence/frequency penalties in place to [q, V] logits: query j follows the row's
    output so far and the draft tokens paths[j] on the way to it (what the output is if they are accepted)."""
    vocab = logits.shape[-1]
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
        bias = torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        logits[:, ids] += bias
    if params.presence_penalty == 0.0 and params.frequency_penalty == 0.0:
        return
    counts = torch.zeros(logits.shape[0], vocab, dtype=logits.dtype, device=logits.device)
    if output:
        counts += torch.bincount(torch.tensor(output, device=logits.device), minlength=vocab)[:vocab].to(logits.dtype)
    for j, path in enumerate(paths[: logits.shape[0]]):
        for token in path:
            counts[j, token] += 1
    logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


TokenLogprob = tuple[int, float, list[tuple[int, float]]]  # (token, log-probability, top (token, log-probability))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """(token, its log-probability, the `top` most probable (token, log-probability)) at each of [q, V] logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0].tolist()
    if top > 0:
        values, ids = logp.topk(top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [[] for _ in chosen]
    return [(t, lp, alt) for t, lp, alt in zip(tokens.tolist(), chosen, alternatives)]


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


def row_seed(seed: int | None, row: int = 0) -> int:
    """The sampling seed of row `row` of a request seeded with `seed` (a random one when None)."""
    if seed is None:
        return random.getrandbits(63)
    return _derived_seed(seed, row)


def _derived_seed(seed: int, n: int) -> int:
    """A 63-bit seed determined by (seed, n) (integer tuples hash the same in every process)."""
    return hash((seed, n)) & (2**63 - 1)


@dataclass
class RowSampler:
    """How one sampled row draws its tokens: its warpers and its seed."""

    warpers: LogitsProcessorList
    seed: int

    def sample(self, logits: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Tokens for [q, V] logits, query j drawing the token of output position positions[j]."""
        probs = torch.softmax(self.warpers(None, logits), dim=-1)
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for j in range(logits.shape[0]):
            draw = torch.Generator(logits.device).manual_seed(_derived_seed(self.seed, positions[j]))
            tokens[j] = torch.multinomial(probs[j], 1, generator=draw)[0]
        return tokens


def row_sampler(params: SamplingParams, row: int = 0) -> RowSampler | None:
    """The sampler of row `row` of a request with these parameters; None for greedy rows."""
    warpers = logits_warpers(params)
    return None if warpers is None else RowSampler(warpers, row_seed(params.seed, row))
