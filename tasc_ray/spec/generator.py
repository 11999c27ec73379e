"""SpeculativeGenerator: batched, lossless speculative decoding over any Hugging Face causal LM.

Each step runs one forward pass over every row's pending token plus its draft, with per-row position ids and
an explicit 4D attention mask. A row accepts the longest draft prefix the target agrees with, plus the
target's own next token; the cache slots of rejected draft tokens are masked out (never recomputed) and
compacted away when they pile up. Which rows decode together is the scheduler's business (scheduler.py):
rows join the running batch between steps and leave it as they finish. A prompt prefix shared by the rows
admitted together, or by consecutive requests (a few-shot template, a system prompt), is prefilled once and
its keys and values serve every row that shares it (kv_cache.py).

Greedy decoding emits exactly what plain greedy decoding emits. Sampling is exact too: the draft is a point
mass, so sampling x ~ p at each position and accepting the draft token iff x equals it (else emitting x and
stopping) draws from p itself (sampling.py). `speculative=False` runs plain decoding through the same loop.
"""

from __future__ import annotations

import inspect
import logging
import statistics
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from tasc_ray.spec.draft_length import SpeculationGate, StepCostTable, trees_pay
from tasc_ray.spec.drafter import Drafter, DraftTree
from tasc_ray.spec.fast_forward import FastForward, build_fast_forward
from tasc_ray.spec.kv_cache import PrefixCache, PrefixKV, attention_mask, compact, select_rows
from tasc_ray.spec.prompts import Prompt, PromptError, PromptTooLongError, encode_prompt
from tasc_ray.spec.request import GenerationResult, Request, RowStats, TokenCallback
from tasc_ray.spec.sampling import (
    SamplingParams,
    TokenLogprob,
    accepted_lengths,
    adjust_logits,
    target_tokens,
    token_logprobs,
)
from tasc_ray.spec.scheduler import Scheduler
from tasc_ray.spec.stopping import cut_at_eos, find_stop

__all__ = [
    "GenerationResult",
    "PromptError",
    "PromptTooLongError",
    "Request",
    "RowStats",
    "SamplingParams",
    "SpeculativeGenerator",
    "find_stop",
]

logger = logging.getLogger(__name__)

StreamCallback = Callable[[int, list[int]], None]  # (prompt index, newly emitted token ids)


@dataclass
class EngineTimings:
    """Totals across the engine's life: wall time of drafting, verifying and generate() calls."""

    draft_s: float = 0.0
    verify_s: float = 0.0
    generate_s: float = 0.0
    prefill_s: float = 0.0
    steps: int = 0  # batched forward passes after prefill
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from the shared-prefix cache instead of prefilled

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Batch:
    """The rows decoding together and their shared KV cache: `valid` [B, S] masks the cache slots per row,
    `pending` [B] is each row's next token (emitted, not yet in the cache), `next_pos` [B] its position."""

    rows: list[Request]
    cache: DynamicCache
    valid: torch.Tensor
    pending: torch.Tensor
    next_pos: torch.Tensor

    def keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        sel = torch.tensor(keep, dtype=torch.long, device=self.valid.device)
        self.valid, self.pending, self.next_pos = self.valid[sel], self.pending[sel], self.next_pos[sel]
        select_rows(self.cache, sel)

    def extend(self, other: _Batch) -> None:
        """Append another batch's rows; the narrower cache is left-padded with masked slots (each row has its
        own positions, so where its slots sit does not matter)."""
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


class SpeculativeGenerator:
    """Batched greedy/sampled decoding with n-gram drafts; one engine for the CLI, Ray jobs and Serve."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        drafter: Drafter | None = None,
        max_batch_size: int = 8,
        compact_waste: float = 0.5,
        prefix_cache_min_tokens: int = 16,
        static_batches: bool = False,
        fast_forward: bool | FastForward = True,
        speculation_gate: bool = False,
    ) -> None:
        """`prefix_cache_min_tokens`: the shortest shared prompt prefix worth caching (0 turns the cache off);
        `static_batches`: schedulers default to fixed batches (see Scheduler); `fast_forward`: run the lean
        forward of fast_forward.py where it applies to the model (else, and without it, the model's own), or
        this one (built for the same model: generators can share its weights); it reads the weights once, so
        a model whose weights change afterwards needs a new generator; `speculation_gate`: switch drafting off
        for a batch size where passes with drafts measurably emit fewer tokens per second than passes without
        (SpeculationGate; load_engine turns it on, off by default so that what is drafted is not timing-dependent)."""
        self.model, self.tokenizer, self.drafter = model, tokenizer, drafter
        self.max_batch_size, self.compact_waste = max_batch_size, compact_waste
        self.static_batches = static_batches
        self.prefix_cache = PrefixCache(prefix_cache_min_tokens)
        if drafter is not None and drafter.index is not None:
            drafter.index.check_tokenizer(tokenizer)
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.timings = EngineTimings()
        self.step_cost = StepCostTable()
        self.gate = SpeculationGate() if speculation_gate else None
        forward_params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._can_keep_last = "logits_to_keep" in forward_params
        if isinstance(fast_forward, FastForward):
            self.fast_forward: FastForward | None = fast_forward
        else:
            self.fast_forward = build_fast_forward(model) if fast_forward else None

    # ----- public API -----
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt, checked (see tasc_ray.spec.prompts.encode_prompt)."""
        return encode_prompt(self.tokenizer, prompt, self.max_context)

    def request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        row: int = 0,
        on_tokens: TokenCallback | None = None,
        on_finish: Callable[[Request], None] | None = None,
    ) -> Request:
        """A checked request for `prompt` (text, chat messages or token ids), ready for a Scheduler or an
        EngineLoop. `row` tells apart the sampling seeds of several rows of one seeded call."""
        return Request.new(self.encode(prompt), params or SamplingParams(), row, on_tokens, on_finish)

    def scheduler(self, max_rows: int | None = None, static: bool | None = None) -> Scheduler:
        """A scheduler decoding with this generator (one per thread: the generator holds no batch itself);
        `static` defaults to the generator's `static_batches`."""
        return Scheduler(self, max_rows=max_rows, static=self.static_batches if static is None else static)

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | None = None,
        stream: StreamCallback | None = None,
        static: bool | None = None,
    ) -> list[GenerationResult]:
        """Decode every prompt, up to max_batch_size rows at a time, a finished row's place taken by the next
        prompt (shortest prompts first); raises the first row's error if any row fails. `static=True` decodes
        fixed batches instead (each batch runs until its longest row ends)."""
        requests = self._requests(prompts, params, stream)
        self._run(requests, static)
        return [r.outcome() for r in requests]

    def generate_each(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | None = None,
        stream: StreamCallback | None = None,
    ) -> list[GenerationResult | Exception]:
        """generate(), but a failure stays in its own row: the rows that failed in a batch are decoded again one
        at a time, and each row that still fails gets its exception in place of its result."""
        out: list[GenerationResult | Exception | None] = [None] * len(prompts)
        requests: list[Request] = []
        for i, prompt in enumerate(prompts):
            try:
                requests.append(self._requests([prompt], params, _one_row(stream, i), first_row=i)[0])
            except Exception as exc:
                out[i] = exc
                requests.append(Request([], params or SamplingParams(), error=exc))
        self._run([r for r in requests if r.error is None], static=None)
        for i, r in enumerate(requests):
            if out[i] is not None:
                continue
            if r.error is not None and not isinstance(r.error, PromptError):
                logger.warning("row %d failed in a batch (%s); decoding it alone", i, r.error)
                alone = self._requests([prompts[i]], params, _one_row(stream, i), first_row=i)[0]
                self._run([alone], static=None)
                r = alone
            out[i] = r.error if r.error is not None else r.result
        return out  # type: ignore[return-value]  # every position was filled

    @torch.inference_mode()
    def profile_step_costs(
        self,
        rows: Sequence[int] | None = None,
        queries: Sequence[int] = (1, 2, 4, 8),
        context: int = 256,
        repeats: int = 1,
    ) -> dict[int, dict[int, float]]:
        """Time a verification pass of q query tokens per row over a `context`-token cache for each (rows, q), put
        the medians in the step-cost table that chooses draft lengths, and return the table (seconds).

        The default grid is small (17 forwards over a 256-token cache, the length of a typical few-shot prompt; ~2 s
        for SmolLM2-135M on 2 CPU threads): a start-up cost every replica and label actor pays; the engine's own
        passes refine the cells they use."""
        device = self.model.device
        context = max(1, min(context, self.max_context - max(queries) - 1))
        vocab = min(len(self.tokenizer), int(getattr(self.model.config, "vocab_size", len(self.tokenizer))))
        random = torch.Generator().manual_seed(0)
        for b in rows or sorted({1, self.max_batch_size}):
            cache = DynamicCache(config=self.model.config)
            valid = torch.ones(b, context, dtype=torch.bool, device=device)
            prompt = torch.randint(vocab, (b, context), generator=random).to(device)
            self._forward(prompt, valid, torch.arange(context, device=device).expand(b, -1), cache, last_only=True)
            for q in queries:
                step = torch.randint(vocab, (b, q), generator=random).to(device)
                self.step_cost.set(b, q, self._time_pass(step, context, cache, repeats))
            if b > 1 and self.fast_forward is not None:  # one row drafting q - 1 tokens, the others none
                q = max(queries)
                step = torch.randint(vocab, (b, q), generator=random).to(device)
                seconds = self._time_pass(step, context, cache, repeats, longest_row_only=True)
                self.step_cost.observe_ragged(b, (b - 1 + q) / b, q, seconds, replace=True)
        return self.step_cost.table()

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
            self._forward(step, step_valid, positions, cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cache.crop(-q)
        return statistics.median(times[1:])

    # ----- the decoding loop (driven by a Scheduler) -----
    def _requests(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | None,
        stream: StreamCallback | None,
        first_row: int = 0,
    ) -> list[Request]:
        requests = []
        for i, prompt in enumerate(prompts):
            on_tokens = None if stream is None else (lambda ids, i=i: stream(i, ids))
            try:
                requests.append(self.request(prompt, params, first_row + i, on_tokens))
            except PromptError as exc:
                raise type(exc)(f"prompt {first_row + i}: {exc}") from exc
        return requests

    def _run(self, requests: list[Request], static: bool | None) -> None:
        t0 = time.perf_counter()
        scheduler = self.scheduler(static=static)
        for request in sorted(requests, key=lambda r: r.prompt_len):  # fewer pad slots among rows admitted together
            scheduler.add(request)
        scheduler.run()
        self.timings.generate_s += time.perf_counter() - t0

    @torch.inference_mode()
    def prefill(self, requests: list[Request]) -> tuple[_Batch, list[bool]]:
        """Start the requests: the shared prefix's cached keys and values, then the left-padded rest of each
        prompt in one forward; each row's first token comes from its last position's logits and is emitted.
        Returns the new rows' batch and which rows are already done."""
        t0 = time.perf_counter()
        device = self.model.device
        prompts = [r.prompt_ids for r in requests]
        for r in requests:
            r.max_new = min(r.params.max_new_tokens, self.max_context - r.prompt_len)
            use_draft = r.params.speculative and self.drafter is not None
            r.draft_context = self.drafter.new_row(r.prompt_ids) if use_draft and self.drafter is not None else None
        cache = DynamicCache(config=self.model.config)
        prefix = self.prefix_cache.lookup(prompts, self._prefill_prefix)
        n_prefix = len(prefix.tokens) if prefix is not None else 0
        if prefix is not None:
            prefix.fill(cache, len(prompts))
        rests = [p[n_prefix:] for p in prompts]
        width = max(len(r) for r in rests)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rests], device=device)
        valid = torch.tensor(
            [[1] * n_prefix + [0] * (width - len(r)) + [1] * len(r) for r in rests], device=device, dtype=torch.bool
        )
        positions = n_prefix + (valid[:, n_prefix:].long().cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(ids, valid, positions, cache, last_only=True)
        target, logprobs = self._targets(logits, requests, [[] for _ in requests])
        pending = target[:, 0]
        self.timings.prompt_tokens += sum(len(p) for p in prompts)
        self.timings.cached_prompt_tokens += n_prefix * len(prompts)
        self.timings.prefill_s += time.perf_counter() - t0
        done = [self._emit(r, [int(t)], logprobs.get(i)) for i, (r, t) in enumerate(zip(requests, pending.tolist()))]
        return _Batch(requests, cache, valid, pending, valid.sum(-1)), done

    def _prefill_prefix(self, tokens: list[int]) -> PrefixKV:
        """Keys and values of a prompt prefix, computed at batch 1."""
        device, n = self.model.device, len(tokens)
        cache = DynamicCache(config=self.model.config)
        ones = torch.ones(1, n, dtype=torch.bool, device=device)
        self._forward(torch.tensor([tokens], device=device), ones, torch.arange(n, device=device)[None], cache, True)
        return PrefixKV(tuple(tokens), [(layer.keys, layer.values) for layer in cache.layers])

    @torch.inference_mode()
    def step(self, batch: _Batch) -> list[bool]:
        """One pass: draft for every speculating row, verify [pending token + draft] of every row in one forward,
        emit what was accepted. Returns which rows are done."""
        waste = 1 - batch.valid.sum(-1).max().item() / batch.valid.shape[1]
        if batch.valid.shape[1] > 16 and waste > self.compact_waste:
            batch.valid = compact(batch.cache, batch.valid)
        t0 = time.perf_counter()
        trees = self._propose_trees(batch.rows) if self._tree_rows(batch.rows) else None
        drafts = [t.tokens for t in trees] if trees is not None else self._propose(batch.rows)
        t1 = time.perf_counter()
        logprobs: dict[int, list[TokenLogprob]] = {}
        if trees is not None:
            n_accepted, paths = self._verify_trees(batch, trees)
            accepted = [[t.tokens[j] for j in path] for t, path in zip(trees, paths)]
        else:
            n_accepted, logprobs = self._verify(batch, drafts)
            accepted = [d[:n] for d, n in zip(drafts, n_accepted.tolist())]
        t2 = time.perf_counter()
        drafted = any(drafts)
        if self.gate is not None and self._speculating(batch.rows):
            self.gate.observe(len(drafts), drafted, int(n_accepted.sum()) + len(drafts), t2 - t0)
        if self.drafter is not None:
            self.drafter.observe(paths if trees is not None else n_accepted.tolist())
        self.timings.draft_s += t1 - t0
        self.timings.verify_s += t2 - t1
        self.timings.steps += 1
        self._observe_cost(drafts, t2 - t1)
        done = []
        bonuses = batch.pending.tolist()  # the target's own token after each row's accepted draft
        for i, (row, draft, taken, bonus) in enumerate(zip(batch.rows, drafts, accepted, bonuses)):
            row.stats.record(len(draft), len(taken))
            row.stats.draft_s += t1 - t0
            row.stats.verify_s += t2 - t1
            row_logprobs = logprobs.get(i)
            n = len(taken)
            done.append(self._emit(row, taken + [bonus], row_logprobs[: n + 1] if row_logprobs else None))
        return done

    def _observe_cost(self, drafts: list[list[int]], seconds: float) -> None:
        """Refine the step-cost table with a timed verification pass: its cell where every row had the same query
        length (or the verifier pads rows to the longest), else the share of padding a ragged pass pays."""
        longest = max(len(d) for d in drafts) + 1
        mean = sum(len(d) + 1 for d in drafts) / len(drafts)
        if self.fast_forward is None or longest == mean:
            self.step_cost.observe(len(drafts), longest, seconds)
        else:
            self.step_cost.observe_ragged(len(drafts), mean, longest, seconds)

    def _speculating(self, rows: list[Request]) -> bool:
        return self.drafter is not None and any(r.draft_context is not None for r in rows)

    def _propose(self, rows: list[Request]) -> list[list[int]]:
        """Drafts of the speculating rows (the others draft nothing), cut to a length the step costs justify."""
        if self.drafter is None or not self._speculating(rows):
            return [[] for _ in rows]
        if self.gate is not None and not self.gate.allow(len(rows)):
            return [[] for _ in rows]
        limits = [r.max_new - len(r.generated) - 1 for r in rows]  # the step also emits the target's own token
        ragged = self.fast_forward is not None  # its products skip padding: rows may draft different lengths
        return self.drafter.propose([r.draft_context for r in rows], limits, self.step_cost, ragged)

    def _tree_rows(self, rows: list[Request]) -> bool:
        """Whether this pass drafts token trees: the drafter is set to, trees pay at this batch size (`trees_pay`),
        and every row decodes greedily with no logit adjustments or log-probabilities (other rows keep chains,
        whose exact sampling rule is tested)."""
        if self.drafter is None or not self._speculating(rows):
            return False
        if not trees_pay(self.step_cost, len(rows), self.drafter.config.tree_nodes):
            return False
        return all(r.sampler is None and not r.params.adjusts_logits and r.params.logprobs is None for r in rows)

    def _propose_trees(self, rows: list[Request]) -> list[DraftTree]:
        """Token trees for the rows (none for a row that does not speculate), each cut to the number of nodes that
        the step costs justify."""
        assert self.drafter is not None
        if self.gate is not None and not self.gate.allow(len(rows)):
            return [DraftTree() for _ in rows]
        limits = [r.max_new - len(r.generated) - 1 for r in rows]
        ragged = self.fast_forward is not None  # as for chains
        return self.drafter.propose_trees([r.draft_context for r in rows], limits, self.step_cost, ragged)

    def _verify_trees(self, batch: _Batch, trees: list[DraftTree]) -> tuple[torch.Tensor, list[list[int]]]:
        """Run [pending token + tree nodes] of every row through the model in one pass, each node at position
        pending + its depth and seeing only its ancestors (a tree attention mask); follow each row's accepted path
        (the child equal to the target's own token, from the root down), keep the path's cache slots and drop the
        rest. Greedy rows only. Returns accepted lengths and each row's accepted nodes."""
        device, k = self.model.device, max(len(t) for t in trees)
        ids = torch.tensor(
            [[0] + t.tokens + [self.pad_id] * (k - len(t)) for t in trees], device=device, dtype=torch.long
        )
        ids[:, 0] = batch.pending
        depth = torch.tensor([[0] + [t.depth(j) for j in range(len(t))] + [0] * (k - len(t)) for t in trees])
        positions = batch.next_pos[:, None] + depth.to(device)
        sees = torch.zeros(len(trees), k + 1, k + 1, dtype=torch.bool)
        for i, t in enumerate(trees):
            sees[i, :, 0] = True
            sees[i].diagonal().fill_(True)
            for j, parent in enumerate(t.parents):  # a node sees what its parent sees, and itself
                sees[i, 1 + j, : j + 1] |= sees[i, 1 + parent, : j + 1] if parent != -1 else sees[i, 0, : j + 1]
        step_valid = torch.tensor(
            [[1] * (len(t) + 1) + [0] * (k - len(t)) for t in trees], device=device, dtype=torch.bool
        )
        batch.valid = torch.cat([batch.valid, step_valid], dim=1)
        logits = self._forward(ids, batch.valid, positions, batch.cache, tree=sees.to(device))
        target = target_tokens(logits, [None] * len(trees), [len(r.generated) for r in batch.rows]).tolist()
        paths = [t.accepted_path(row_target) for t, row_target in zip(trees, target)]
        keep = torch.zeros(len(trees), k + 1, dtype=torch.bool)
        keep[:, 0] = True
        for i, path in enumerate(paths):
            keep[i, [1 + j for j in path]] = True
        batch.valid[:, -(k + 1) :] &= keep.to(device)
        n_accepted = torch.tensor([len(p) for p in paths], device=device)
        batch.next_pos = batch.next_pos + n_accepted + 1
        last = [1 + p[-1] if p else 0 for p in paths]
        batch.pending = torch.tensor([row_target[j] for row_target, j in zip(target, last)], device=device)
        return n_accepted, paths

    def _verify(self, batch: _Batch, drafts: list[list[int]]) -> tuple[torch.Tensor, dict[int, list[TokenLogprob]]]:
        """Run [pending token + draft] of every row (padded to the longest draft) through the model; keep the
        accepted slots and set each row's next pending token to the target's own. Returns accepted lengths and
        the log-probabilities of the rows that asked for them (by row, one per query position)."""
        device, k = self.model.device, max(len(d) for d in drafts)
        draft_ids = torch.tensor([d + [self.pad_id] * (k - len(d)) for d in drafts], device=device, dtype=torch.long)
        step_ids = torch.cat([batch.pending[:, None], draft_ids], dim=1)
        step_valid = torch.tensor(
            [[1] * (len(d) + 1) + [0] * (k - len(d)) for d in drafts], device=device, dtype=torch.bool
        )
        step_pos = batch.next_pos[:, None] + torch.arange(k + 1, device=device)
        batch.valid = torch.cat([batch.valid, step_valid], dim=1)
        logits = self._forward(step_ids, batch.valid, step_pos, batch.cache)
        target, logprobs = self._targets(logits, batch.rows, drafts)  # [B, k+1]: the target's token at each position
        n_accepted = accepted_lengths(draft_ids, target, step_valid[:, 1:])
        slot = torch.arange(k + 1, device=device)
        batch.valid[:, -(k + 1) :] &= slot[None, :] <= n_accepted[:, None]  # mask rejected draft slots
        batch.next_pos = batch.next_pos + n_accepted + 1
        batch.pending = target.gather(1, n_accepted[:, None])[:, 0]
        return n_accepted, logprobs

    def _targets(
        self, logits: torch.Tensor, rows: list[Request], drafts: list[list[int]]
    ) -> tuple[torch.Tensor, dict[int, list[TokenLogprob]]]:
        """The target's token at every position of [B, q, V] logits, after each row's logit bias and penalties,
        and the model's log-probabilities of those tokens for the rows that asked for them."""
        raw = {i: logits[i].clone() for i, r in enumerate(rows) if r.params.logprobs is not None}
        for i, row in enumerate(rows):
            if row.params.adjusts_logits:
                adjust_logits(logits[i], row.params, row.generated, drafts[i])
        target = target_tokens(logits, [r.sampler for r in rows], [len(r.generated) for r in rows])
        logprobs = {i: token_logprobs(raw_i, target[i], rows[i].params.logprobs or 0) for i, raw_i in raw.items()}
        return target, logprobs

    def _forward(
        self,
        ids: torch.Tensor,
        valid: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        last_only: bool = False,
        tree: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `ids` (only the last position's with `last_only`), which occupy the last ids.shape[1] slots
        of `valid` (the mask over all cache slots); `tree`: which of those slots each query sees (default causal)."""
        if self.fast_forward is not None:
            return self.fast_forward(ids, valid, positions, cache, last_only, tree)
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

    def _emit(self, row: Request, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> bool:
        """Append newly decoded tokens (and their log-probabilities), cut at EOS, a stop string or max_new_tokens;
        return whether the row is done."""
        eos_ids: Collection[int] = () if row.params.ignore_eos else self.eos_ids
        tokens, hit_eos = cut_at_eos(tokens[: row.max_new - len(row.generated)], eos_ids)
        if hit_eos:
            row.finish_reason = "stop"
        start = len(row.generated)
        row.generated.extend(tokens)
        stop = row.params.stop
        if stop and row.finish_reason is None:
            cut = find_stop(self.tokenizer, row.generated, stop, start)
            if cut is not None:  # cut after the token completing the stop string; remember where the text ends
                del row.generated[cut[0] :]
                row.finish_reason, row.stop_text_end = "stop", cut[1]
        emitted = row.generated[start:]
        if logprobs is not None:
            row.logprobs = (row.logprobs or []) + logprobs[: len(emitted)]
        if row.draft_context is not None:
            row.draft_context.extend(emitted)
        if emitted:
            if row.stats.first_token_s is None:
                row.stats.first_token_s = time.perf_counter() - row.submitted_at
            if row.on_tokens is not None:
                try:
                    row.on_tokens(emitted)
                except Exception:  # the row's consumer is broken: the row leaves, the others go on
                    logger.exception("a row's token callback failed; cancelling the row")
                    row.cancel()
        if row.finish_reason is None and len(row.generated) >= row.max_new:
            row.finish_reason = "length"
        if row.finish_reason is not None and not row.cancelled and self.drafter is not None:
            self.drafter.learn(row.generated, row.draft_context)
        return row.finish_reason is not None or row.cancelled

    def result(self, row: Request) -> GenerationResult:
        """The finished row's text (cut where a stop string ended it) and its token ids, reason and statistics."""
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        if row.stop_text_end is not None:
            text = text[: row.stop_text_end]
        reason = row.finish_reason or "length"
        return GenerationResult(text, row.generated, row.prompt_len, reason, row.stats, row.logprobs)


def _one_row(stream: StreamCallback | None, index: int) -> StreamCallback | None:
    """A stream callback for a one-prompt call that reports its tokens under the caller's prompt index."""
    return None if stream is None else (lambda _k, ids: stream(index, ids))
