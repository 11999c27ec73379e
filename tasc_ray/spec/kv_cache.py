"""The KV cache around the generator's batch: the attention mask over its slots, dropping rows, compacting masked
slots away, and the shared prompt-prefix cache.

Rows of a batch share one DynamicCache whose slots are masked per row (`valid` [B, S]): left padding of the
prompts and the slots of rejected draft tokens are masked out, never recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache


def attention_mask(valid: torch.Tensor, q: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, q, S] mask for q queries in the last q of S slots: each sees the valid slots up to its own."""
    s = valid.shape[1]
    slots = torch.arange(s, device=valid.device)
    causal = slots[None, :] <= torch.arange(s - q, s, device=valid.device)[:, None]
    allowed = valid[:, None, None, :] & causal[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep only the given batch rows of every cache layer."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[rows], layer.values[rows]


def compact(cache: DynamicCache, valid: torch.Tensor) -> torch.Tensor:
    """Drop masked cache slots: gather each row's valid slots, left-aligned to the longest row. Returns the new mask."""
    counts = valid.sum(-1)
    width = int(counts.max())
    # Sorting slot indices by (valid, index) puts each row's valid slots last, in order.
    slots = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    order = torch.argsort(valid.long() * valid.shape[1] + slots, dim=-1)[:, -width:]
    new_valid = torch.arange(width, device=valid.device)[None, :] >= (width - counts)[:, None]
    for layer in cache.layers:
        idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
    return new_valid


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n


@dataclass
class PrefixKV:
    """Keys and values of a prompt prefix for every layer, computed once at batch 1."""

    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def cut(self, n: int) -> PrefixKV:
        return PrefixKV(self.tokens[:n], [(k[:, :, :n], v[:, :, :n]) for k, v in self.layers])

    def fill(self, cache: DynamicCache, rows: int) -> None:
        """Put the prefix in every row of an empty cache."""
        for layer, (keys, values) in enumerate(self.layers):
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer)


class PrefixCache:
    """The longest prompt prefix a batch shares (a few-shot template, a system prompt), prefilled once and kept
    for later batches while they share it. A batch of one prompt (an online request) is compared with the
    previous batch's first prompt, so consecutive requests with one system prompt share its prefill."""

    def __init__(self, min_tokens: int) -> None:
        """`min_tokens`: the shortest prefix worth caching (0 turns the cache off)."""
        self.min_tokens = min_tokens
        self.kept: PrefixKV | None = None
        self.last_prompt: list[int] | None = None

    def lookup(self, prompts: list[list[int]], prefill: Callable[[list[int]], PrefixKV]) -> PrefixKV | None:
        """The prefix every prompt shares (each keeps at least one token to prefill), reusing the kept one when
        it still applies and calling `prefill(tokens)` otherwise; None when shorter than `min_tokens`."""
        if self.min_tokens <= 0:
            return None
        limit = min(len(p) for p in prompts) - 1
        last, self.last_prompt = self.last_prompt, prompts[0]
        if self.kept is not None:
            n = min(common_prefix_length([list(self.kept.tokens), *prompts]), limit)
            if n >= self.min_tokens:
                if n < len(self.kept.tokens):
                    self.kept = self.kept.cut(n)
                return self.kept
        group = prompts if len(prompts) > 1 else [p for p in (last, prompts[0]) if p is not None]
        if len(group) < 2:
            return None
        n = min(common_prefix_length(group), limit)
        if n < self.min_tokens:
            return None
        self.kept = prefill(prompts[0][:n])
        return self.kept
