"""ModelRunner: the target model's forward over a batch of KV cache slots, and nothing else.

It prefills joining rows (a shared prompt prefix from the prefix cache, read in place by every row where the
kernels allow, else copied into each row; then the left-padded rest of each prompt),
runs one pass over every row's [pending token + draft tree nodes] with per-row positions and a tree attention mask,
keeps the accepted path's cache slots and masks the rest, compacts the cache when masked slots pile up, and times
passes for the step-cost table. The forward is the lean one of model/fast_forward.py where it applies (Llama-family
models), else the model's own.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from tasc_ray.engine.cost import StepCostTable
from tasc_ray.engine.drafts.tree import DraftTree
from tasc_ray.engine.kv_cache import (
    BatchState,
    PrefixCache,
    PrefixKV,
    attention_mask,
    common_prefix_length,
    compact,
)
from tasc_ray.engine.model.fast_forward import FastForward, build_fast_forward
from tasc_ray.engine.request import Request
from tasc_ray.engine.verify import Verdict


class ModelRunner:
    """One model's forward over batches of cache slots; `fast_forward` as SpeculativeGenerator takes it."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        fast_forward: bool | FastForward = True,
        prefix_cache_min_tokens: int = 16,
        prefix_cache_entries: int = 4,
    ) -> None:
        self.model = model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.vocab = min(len(tokenizer), int(getattr(model.config, "vocab_size", len(tokenizer))))
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.prefix_cache = PrefixCache(prefix_cache_min_tokens, prefix_cache_entries)
        forward_params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._can_keep_last = "logits_to_keep" in forward_params
        if isinstance(fast_forward, FastForward):
            self.fast_forward: FastForward | None = fast_forward
        else:
            self.fast_forward = build_fast_forward(model) if fast_forward else None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def shares_prefix(self) -> bool:
        """Whether a batch's shared prompt prefix is stored once and read by every row (the batch-invariant CPU
        kernels' attention), rather than copied into each row's cache."""
        return self.fast_forward is not None and self.fast_forward.batch_invariant

    @torch.inference_mode()
    def prefill(
        self, rows: Sequence[Request], running: BatchState | None = None
    ) -> tuple[BatchState, torch.Tensor, int]:
        """The rows' batch with their prompts in its cache (no pending tokens yet), the logits [B, 1, V] of each
        prompt's last position, and how many prompt tokens in all the prefix cache served. With `running`, the
        batch the rows will join: they read its shared prefix (as far as their prompts agree with it)."""
        device = self.device
        prompts = [r.prompt_ids for r in rows]
        found = self.prefix_cache.lookup(prompts, self._prefill_prefix)
        if self.shares_prefix:
            shared = running.prefix if running is not None and running.prefix is not None else found
            shared = shared or self.prefix_cache.closest(prompts)
            seen = [min(common_prefix_length([shared.tokens, p]), len(p) - 1) if shared else 0 for p in prompts]
            if not any(seen) and (running is None or running.prefix is None):
                shared = None  # nothing to share (a batch keeps its own prefix for the rows that read it)
        else:
            shared, seen = None, [0] * len(prompts)
        # Slots of the prefix cache's entry beyond what the shared prefix covers (all of it where nothing is
        # shared) are copied into each row's own cache where the rows agree on where that starts, and prefilled
        # again otherwise: a token's keys and values depend only on the tokens before it.
        uniform = len(set(seen)) == 1
        copied = len(found.tokens) - seen[0] if found is not None and uniform and len(found.tokens) > seen[0] else 0
        cache = DynamicCache(config=self.model.config)
        if copied:
            found.fill(cache, len(prompts), start=seen[0])  # type: ignore[union-attr]  # copied > 0 needs `found`
        rests = [p[n + copied :] for p, n in zip(prompts, seen)]
        width = max(len(r) for r in rests)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rests], device=device)
        valid = torch.tensor(
            [[1] * copied + [0] * (width - len(r)) + [1] * len(r) for r in rests], device=device, dtype=torch.bool
        )
        first = torch.tensor([n + copied for n in seen], device=device)[:, None]
        positions = first + (valid[:, copied:].long().cumsum(-1) - 1).clamp(min=0)
        prefix_seen = torch.tensor(seen, device=device) if shared is not None else None
        logits = self.forward(ids, valid, positions, cache, last_only=True, prefix=shared, prefix_seen=prefix_seen)
        pending = torch.zeros(len(rows), dtype=torch.long, device=device)
        next_pos = torch.tensor([len(p) for p in prompts], device=device)
        served = sum(seen) + copied * len(rows)
        return BatchState(list(rows), cache, valid, pending, next_pos, shared, prefix_seen), logits, served

    def _prefill_prefix(self, tokens: list[int]) -> PrefixKV:
        """Keys and values of a prompt prefix, computed at batch 1."""
        device, n = self.device, len(tokens)
        cache = DynamicCache(config=self.model.config)
        ones = torch.ones(1, n, dtype=torch.bool, device=device)
        self.forward(torch.tensor([tokens], device=device), ones, torch.arange(n, device=device)[None], cache, True)
        return PrefixKV(tuple(tokens), [(layer.keys, layer.values) for layer in cache.layers])

    @torch.inference_mode()
    def verify_pass(self, batch: BatchState, trees: Sequence[DraftTree]) -> torch.Tensor:
        """Logits [B, 1 + k, V] of [pending token + tree nodes] of every row (padded to the largest tree, k nodes):
        node j at position pending + its depth, seeing only its ancestors (a chain's mask is the causal one). The
        step's slots join the cache; `accept` then masks the ones verification rejected."""
        device, k = self.device, max(len(t) for t in trees)
        ids = torch.tensor([[0] + t.tokens + [self.pad_id] * (k - len(t)) for t in trees], device=device)
        ids[:, 0] = batch.pending
        depth = torch.tensor([[0] + [t.depth(j) for j in range(len(t))] + [0] * (k - len(t)) for t in trees])
        positions = batch.next_pos[:, None] + depth.to(device)
        step_valid = torch.tensor(
            [[1] * (len(t) + 1) + [0] * (k - len(t)) for t in trees], device=device, dtype=torch.bool
        )
        batch.valid = torch.cat([batch.valid, step_valid], dim=1)
        tree_mask = None if all(t.is_chain for t in trees) else _tree_mask(trees, k).to(device)
        return self.forward(
            ids, batch.valid, positions, batch.cache, tree=tree_mask, prefix=batch.prefix, prefix_seen=batch.prefix_seen
        )

    def accept(self, batch: BatchState, trees: Sequence[DraftTree], verdict: Verdict) -> None:
        """Keep the accepted path's slots of the last pass, move each row past them, and make the target's own
        token each row's pending token."""
        k = max(len(t) for t in trees)
        keep = torch.zeros(len(trees), k + 1, dtype=torch.bool)
        keep[:, 0] = True
        for i, path in enumerate(verdict.paths):
            keep[i, [1 + j for j in path]] = True
        batch.valid[:, -(k + 1) :] &= keep.to(self.device)
        accepted = torch.tensor([len(p) for p in verdict.paths], device=self.device)
        batch.next_pos = batch.next_pos + accepted + 1
        self.set_pending(batch, verdict)

    def set_pending(self, batch: BatchState, verdict: Verdict) -> None:
        """Each row's next pending token: the target's own token after its accepted path (after a prefill: the
        row's first output token)."""
        batch.pending = torch.tensor([tokens[-1] for tokens in verdict.tokens], device=self.device)

    def compact(self, batch: BatchState, waste: float) -> None:
        """Drop masked slots once more than `waste` of the cache's slots are masked for every row."""
        if batch.valid.shape[1] > 16 and 1 - batch.valid.sum(-1).max().item() / batch.valid.shape[1] > waste:
            batch.valid = compact(batch.cache, batch.valid)

    def forward(
        self,
        ids: torch.Tensor,
        valid: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        last_only: bool = False,
        tree: torch.Tensor | None = None,
        prefix: PrefixKV | None = None,
        prefix_seen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `ids` (only the last position's with `last_only`), which occupy the last ids.shape[1] slots
        of `valid` (the mask over all cache slots); `tree`: which of those slots each query sees (default causal);
        `prefix`: a shared prefix each row sees the first `prefix_seen[b]` slots of (needs `shares_prefix`)."""
        if self.fast_forward is not None:
            return self.fast_forward(ids, valid, positions, cache, last_only, tree, prefix, prefix_seen)
        if prefix is not None:
            raise ValueError("a shared prefix needs the fast forward's batch-invariant kernels")
        mask = attention_mask(valid, ids.shape[1], self.model.dtype, tree)
        extra = {"logits_to_keep": 1} if last_only and self._can_keep_last else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: cache},
            **extra,
        )
        return out.logits[:, -1:].float() if last_only else out.logits.float()

    @torch.inference_mode()
    def profile(
        self,
        table: StepCostTable,
        rows: Sequence[int],
        queries: Sequence[int] = (1, 2, 4, 8),
        context: int = 256,
        repeats: int = 1,
    ) -> None:
        """Time a verification pass of q query tokens per row over a `context`-token cache for each (rows, q) and
        put the medians in `table`; with the fast forward, also the padding share of a ragged pass."""
        device = self.device
        context = max(1, min(context, self.max_context - max(queries) - 1))
        random = torch.Generator().manual_seed(0)
        for b in rows:
            cache = DynamicCache(config=self.model.config)
            valid = torch.ones(b, context, dtype=torch.bool, device=device)
            prompt = torch.randint(self.vocab, (b, context), generator=random).to(device)
            self.forward(prompt, valid, torch.arange(context, device=device).expand(b, -1), cache, last_only=True)
            for q in queries:
                step = torch.randint(self.vocab, (b, q), generator=random).to(device)
                table.set(b, q, self._time_pass(step, context, cache, repeats))
            if b > 1 and self.fast_forward is not None:  # one row drafting q - 1 tokens, the others none
                q = max(queries)
                step = torch.randint(self.vocab, (b, q), generator=random).to(device)
                seconds = self._time_pass(step, context, cache, repeats, longest_row_only=True)
                table.observe_ragged(b, (b - 1 + q) / b, q, seconds, replace=True)

    def _time_pass(
        self, step: torch.Tensor, context: int, cache: DynamicCache, repeats: int, longest_row_only: bool = False
    ) -> float:
        """Median seconds of a pass over `step` [B, q] after a `context`-token cache (the first pass is a warm-up);
        `longest_row_only`: every row but the first verifies only its first token, the rest is padding."""
        (b, q), device = step.shape, step.device
        step_valid = torch.ones(b, context + q, dtype=torch.bool, device=device)
        if longest_row_only:
            step_valid[1:, context + 1 :] = False
        positions = torch.arange(context, context + q, device=device).expand(b, -1)
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            self.forward(step, step_valid, positions, cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cache.crop(-q)
        return statistics.median(times[1:])


def _tree_mask(trees: Sequence[DraftTree], k: int) -> torch.Tensor:
    """[B, 1 + k, 1 + k] bool: which of the step's slots each query sees (the pending token, its ancestors, itself)."""
    sees = torch.zeros(len(trees), k + 1, k + 1, dtype=torch.bool)
    for i, t in enumerate(trees):
        sees[i, :, 0] = True
        sees[i].diagonal().fill_(True)
        for j, parent in enumerate(t.parents):  # a node sees what its parent sees, and itself
            sees[i, 1 + j, : j + 1] |= sees[i, 1 + parent, : j + 1] if parent != -1 else sees[i, 0, : j + 1]
    return sees
