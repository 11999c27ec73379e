"""The KV cache of the running batch: its state (`BatchState`), the attention mask over its slots, dropping and
joining rows, compacting masked slots away, and the prompt-prefix cache (a few prefixes, least recently used
evicted).

Rows of a batch share one DynamicCache whose slots are masked per row (`valid` [B, S]): left padding of the
prompts and the slots of rejected draft tokens are masked out, never recomputed. Where the forward can read it
(the batch-invariant CPU kernels), a prompt prefix the rows share (the few-shot template) is stored once, in the
prefix cache's own entry, and every row's attention reads its first `prefix_seen[b]` slots before the row's own:
joining, dropping and compacting rows then move only what each row has beyond the prefix.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tasc_ray.engine.request import Request


@dataclass
class BatchState:
    """The rows decoding together and their shared KV cache: `valid` [B, S] masks the cache slots per row,
    `pending` [B] is each row's next token (emitted, not yet in the cache), `next_pos` [B] its position. `prefix`:
    a prompt prefix stored once for the batch, of which row b sees the first `prefix_seen[b]` slots before its
    own `valid` ones (None: each row's cache holds its whole prompt)."""

    rows: list[Request]
    cache: DynamicCache
    valid: torch.Tensor
    pending: torch.Tensor
    next_pos: torch.Tensor
    prefix: PrefixKV | None = None
    prefix_seen: torch.Tensor | None = None

    def keep(self, keep: list[int]) -> None:
        """Keep only these rows (by index)."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        sel = torch.tensor(keep, dtype=torch.long, device=self.valid.device)
        self.valid, self.pending, self.next_pos = self.valid[sel], self.pending[sel], self.next_pos[sel]
        select_rows(self.cache, sel)
        if self.prefix_seen is not None:
            self.prefix_seen = self.prefix_seen[sel]
            if not bool(self.prefix_seen.any()):  # no row reads it any more: the next rows may bring their own
                self.prefix, self.prefix_seen = None, None

    def extend(self, other: BatchState) -> None:
        """Append another batch's rows; the narrower cache is left-padded with masked slots (each row has its
        own positions, so where its slots sit does not matter). The two must share their prefix, or one of them
        have none (its rows then see none of the other's)."""
        if other.prefix is not None and other.prefix is not self.prefix:
            if self.prefix is not None:
                raise ValueError("rows joining a batch must read the batch's own shared prefix")
            self.prefix, self.prefix_seen = other.prefix, self.next_pos.new_zeros(len(self.rows))
        if self.prefix_seen is not None:
            seen = other.prefix_seen if other.prefix_seen is not None else other.next_pos.new_zeros(len(other.rows))
            self.prefix_seen = torch.cat([self.prefix_seen, seen])
        width = max(self.valid.shape[1], other.valid.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if not missing:
                return t
            pads = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
            return F.pad(t, pads)

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)])
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)])
        self.valid = torch.cat([pad(self.valid, 1), pad(other.valid, 1)])
        self.pending = torch.cat([self.pending, other.pending])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.rows = self.rows + other.rows


def allowed_slots(valid: torch.Tensor, q: int, tree: torch.Tensor | None = None) -> torch.Tensor:
    """[B, q, S] bool: which of S slots each of q queries in the last q slots sees: the valid slots up to its own;
    with `tree` ([B, q, q] bool, query a may see query b), among the q new slots only what `tree` allows (a token
    tree's node sees its ancestors and itself)."""
    s = valid.shape[1]
    slots = torch.arange(s, device=valid.device)
    causal = slots[None, :] <= torch.arange(s - q, s, device=valid.device)[:, None]
    allowed = valid[:, None, :] & causal[None]
    if tree is not None:
        allowed[:, :, s - q :] &= tree
    return allowed


def attention_mask(valid: torch.Tensor, q: int, dtype: torch.dtype, tree: torch.Tensor | None = None) -> torch.Tensor:
    """The additive [B, 1, q, S] form of `allowed_slots`, for a model's own forward."""
    return additive_mask(allowed_slots(valid, q, tree), dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, q, S] allowed slots as an additive [B, 1, q, S] mask: 0 where allowed, the dtype's lowest elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


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
    """How many leading tokens all the sequences share."""
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

    def fill(self, cache: DynamicCache, rows: int, start: int = 0) -> None:
        """Put the prefix's slots from `start` on in every row of an empty cache."""
        for layer, (keys, values) in enumerate(self.layers):
            k, v = keys[:, :, start:], values[:, :, start:]
            cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), layer)

    def seen_mask(self, seen: torch.Tensor, q: int) -> torch.Tensor:
        """[B, q, P] bool: which of the prefix's P slots each of q queries per row sees, row b the first seen[b]."""
        slots = torch.arange(len(self.tokens), device=seen.device)
        return (slots[None, :] < seen[:, None])[:, None, :].expand(-1, q, -1)


class PrefixCache:
    """Prompt prefixes worth sharing (a few-shot template, a system prompt), each prefilled once and kept, up to
    `capacity` of them, least recently used evicted first. A prefix is found as the longest one shared by the rows
    admitted together, or, for a row admitted alone (an online request), shared with one of the last prompts."""

    def __init__(self, min_tokens: int, capacity: int = 4) -> None:
        """`min_tokens`: the shortest prefix worth caching (0 turns the cache off); `capacity`: prefixes kept."""
        self.min_tokens, self.capacity = min_tokens, capacity
        self.entries: list[PrefixKV] = []  # most recently used first
        self.recent: deque[list[int]] = deque(maxlen=max(1, capacity))

    def lookup(self, prompts: list[list[int]], prefill: Callable[[list[int]], PrefixKV]) -> PrefixKV | None:
        """The longest kept prefix every prompt starts with (each keeps at least one token to prefill), or a new
        one found among the prompts and recent prompts and prefilled with `prefill(tokens)`; None when no
        prefix of at least `min_tokens` tokens is shared."""
        if self.min_tokens <= 0:
            return None
        limit = min(len(p) for p in prompts) - 1
        found = self._kept(prompts, limit)
        if found is None:
            found = self._discover(prompts, limit, prefill)
        self.recent.appendleft(prompts[0])
        return found

    def closest(self, prompts: list[list[int]]) -> PrefixKV | None:
        """The kept prefix that some prompt agrees with longest (at least `min_tokens`, each prompt keeping a token
        to prefill), for rows admitted together that share no prefix among themselves; None if there is none."""
        best, best_n = None, 0
        for entry in self.entries if self.min_tokens > 0 else []:
            n = max(min(common_prefix_length([entry.tokens, p]), len(p) - 1) for p in prompts)
            if n >= self.min_tokens and n > best_n:
                best, best_n = entry, n
        return best

    def _kept(self, prompts: list[list[int]], limit: int) -> PrefixKV | None:
        best, best_n = None, 0
        for entry in self.entries:
            n = min(common_prefix_length([list(entry.tokens), *prompts]), limit)
            if n >= self.min_tokens and n > best_n:
                best, best_n = entry, n
        if best is None:
            return None
        self.entries.remove(best)
        self.entries.insert(0, best)
        return best if best_n == len(best.tokens) else best.cut(best_n)

    def _discover(
        self, prompts: list[list[int]], limit: int, prefill: Callable[[list[int]], PrefixKV]
    ) -> PrefixKV | None:
        if len(prompts) > 1:
            n = min(common_prefix_length(prompts), limit)
        else:
            n = max((min(common_prefix_length([prompts[0], r]), limit) for r in self.recent), default=0)
        if n < self.min_tokens:
            return None
        entry = prefill(prompts[0][:n])
        self.entries.insert(0, entry)
        del self.entries[self.capacity :]
        return entry
