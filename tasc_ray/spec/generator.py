"""SpeculativeGenerator: batched, lossless speculative decoding over any Hugging Face causal LM.

Each step runs one forward pass over every row's pending token plus its draft, with per-row position ids and
an explicit 4D attention mask. A row accepts the longest draft prefix the target agrees with, plus the
target's own next token; the cache slots of rejected draft tokens are masked out (never recomputed) and
compacted away when they pile up. Finished rows leave the batch. A prompt prefix shared by the whole batch
(a few-shot template, a system prompt) is prefilled once at batch 1, and its keys and values serve every row
and later batches that share it (kv_cache.py).

Greedy decoding emits exactly what plain greedy decoding emits. Sampling is exact too: the draft is a point
mass, so sampling x ~ p at each position and accepting the draft token iff x equals it (else emitting x and
stopping) draws from p itself (sampling.py). `speculative=False` runs plain decoding through the same loop.
"""

from __future__ import annotations

import inspect
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.logits_process import LogitsProcessorList

from tasc_ray.spec.draft_length import StepCostTable
from tasc_ray.spec.drafter import DraftContext, Drafter
from tasc_ray.spec.kv_cache import PrefixCache, PrefixKV, attention_mask, compact, select_rows
from tasc_ray.spec.prompts import Prompt, PromptError, PromptTooLongError, encode_prompt
from tasc_ray.spec.sampling import SamplingParams, accepted_lengths, logits_warpers, target_tokens
from tasc_ray.spec.stopping import cut_at_eos, find_stop

__all__ = [
    "GenerationResult",
    "PromptError",
    "PromptTooLongError",
    "RowStats",
    "SamplingParams",
    "SpeculativeGenerator",
    "find_stop",
]

logger = logging.getLogger(__name__)

StreamCallback = Callable[[int, list[int]], None]  # (prompt index, newly emitted token ids)


@dataclass
class RowStats:
    """What speculation did for one output: passes, drafted and accepted tokens, time."""

    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_hist: list[int] = field(default_factory=list)  # accepted_hist[n]: passes that accepted n drafts
    draft_s: float = 0.0  # time of the batch steps this row took part in
    verify_s: float = 0.0

    def record(self, drafted: int, accepted: int) -> None:
        self.forward_passes += 1
        self.drafted += drafted
        self.accepted += accepted
        if len(self.accepted_hist) <= accepted:
            self.accepted_hist.extend([0] * (accepted + 1 - len(self.accepted_hist)))
        self.accepted_hist[accepted] += 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EngineTimings:
    """Batch-level totals across generate() calls: wall time of drafting, verifying and the whole call."""

    draft_s: float = 0.0
    verify_s: float = 0.0
    generate_s: float = 0.0
    steps: int = 0  # batched forward passes after prefill
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from the shared-prefix cache instead of prefilled

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids, EOS or the token completing a stop string included
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: RowStats

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class _DecodingRow:
    """One prompt while it decodes."""

    index: int  # position in the caller's prompt list
    prompt_len: int
    max_new: int
    draft_context: DraftContext | None  # what the drafter knows of this row (None: no speculation)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_text_end: int | None = None
    stats: RowStats = field(default_factory=RowStats)


@dataclass
class _Batch:
    """The rows decoding together and their shared KV cache: `valid` [B, S] masks the cache slots per row,
    `pending` [B] is each row's next token (emitted, not yet in the cache), `next_pos` [B] its position."""

    rows: list[_DecodingRow]
    cache: DynamicCache
    valid: torch.Tensor
    pending: torch.Tensor
    next_pos: torch.Tensor

    def keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        sel = torch.tensor(keep, device=self.valid.device)
        self.valid, self.pending, self.next_pos = self.valid[sel], self.pending[sel], self.next_pos[sel]
        select_rows(self.cache, sel)


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
    ) -> None:
        """`prefix_cache_min_tokens`: the shortest shared prompt prefix worth caching (0 turns the cache off)."""
        self.model, self.tokenizer, self.drafter = model, tokenizer, drafter
        self.max_batch_size, self.compact_waste = max_batch_size, compact_waste
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
        forward_params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._can_keep_last = "logits_to_keep" in forward_params

    # ----- public API -----
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt, checked (see tasc_ray.spec.prompts.encode_prompt)."""
        return encode_prompt(self.tokenizer, prompt, self.max_context)

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | None = None,
        stream: StreamCallback | None = None,
    ) -> list[GenerationResult]:
        """Decode every prompt; batches of up to max_batch_size rows, grouped by prompt length."""
        params = params or SamplingParams()
        if params.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {params.max_new_tokens}")
        encoded = []
        for i, prompt in enumerate(prompts):
            try:
                encoded.append(self.encode(prompt))
            except PromptError as exc:
                raise type(exc)(f"prompt {i}: {exc}") from exc
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.model.device).manual_seed(params.seed)
        results: list[GenerationResult | None] = [None] * len(encoded)
        t0 = time.perf_counter()
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            for row in self._generate_batch([encoded[i] for i in chunk], chunk, params, generator, stream):
                results[row.index] = self._result(row)
        self.timings.generate_s += time.perf_counter() - t0
        return results  # type: ignore[return-value]

    def generate_each(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | None = None,
        stream: StreamCallback | None = None,
    ) -> list[GenerationResult | Exception]:
        """generate(), but a failure stays in its own row: when the batch fails, the rows are decoded one at a
        time and each failing row's exception takes the place of its result."""
        try:
            return list(self.generate(prompts, params, stream))
        except Exception as exc:
            logger.warning("batched decode of %d rows failed (%s); decoding them one by one", len(prompts), exc)
        out: list[GenerationResult | Exception] = []
        for i, prompt in enumerate(prompts):
            row_stream = None if stream is None else (lambda _k, ids, i=i: stream(i, ids))
            try:
                out.append(self.generate([prompt], params, row_stream)[0])
            except Exception as exc:
                out.append(exc)
        return out

    @torch.inference_mode()
    def profile_step_costs(
        self,
        rows: Sequence[int] | None = None,
        queries: Sequence[int] = (1, 2, 4, 8),
        context: int = 64,
        repeats: int = 1,
    ) -> dict[int, dict[int, float]]:
        """Time a verification pass of q query tokens per row over a `context`-token cache for each (rows, q), put
        the medians in the step-cost table that chooses draft lengths, and return the table (seconds).

        The default grid is small (16 forwards, ~2 s for SmolLM2-135M on one CPU thread): a start-up cost every
        replica and label actor pays; the engine's own passes refine the cells they use."""
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
                step_valid = torch.ones(b, context + q, dtype=torch.bool, device=device)
                positions = torch.arange(context, context + q, device=device).expand(b, -1)
                times = []
                for _ in range(repeats + 1):  # the first is a warm-up
                    t0 = time.perf_counter()
                    self._forward(step, step_valid, positions, cache)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    cache.crop(-q)
                self.step_cost.set(b, q, statistics.median(times[1:]))
        return self.step_cost.table()

    # ----- the decoding loop -----
    @torch.inference_mode()
    def _generate_batch(
        self,
        prompts: list[list[int]],
        indices: list[int],
        params: SamplingParams,
        generator: torch.Generator | None,
        stream: StreamCallback | None,
    ) -> list[_DecodingRow]:
        """Decode one batch until every row is done; finished rows leave the batch as they finish."""
        use_draft = params.speculative and self.drafter is not None
        rows = [
            _DecodingRow(
                i,
                len(p),
                min(params.max_new_tokens, self.max_context - len(p)),
                self.drafter.new_row(p) if use_draft and self.drafter is not None else None,
            )
            for i, p in zip(indices, prompts)
        ]
        warpers = logits_warpers(params)
        batch = self._prefill(rows, prompts, warpers, generator)
        done = [self._emit(row, [int(t)], params, stream) for row, t in zip(rows, batch.pending.tolist())]
        finished: list[_DecodingRow] = []
        while True:
            finished += [row for row, d in zip(batch.rows, done) if d]
            keep = [i for i, d in enumerate(done) if not d]
            if not keep:
                return finished
            batch.keep(keep)
            waste = 1 - batch.valid.sum(-1).max().item() / batch.valid.shape[1]
            if batch.valid.shape[1] > 16 and waste > self.compact_waste:
                batch.valid = compact(batch.cache, batch.valid)
            done = self._step(batch, use_draft, params, warpers, generator, stream)

    def _prefill(
        self,
        rows: list[_DecodingRow],
        prompts: list[list[int]],
        warpers: LogitsProcessorList | None,
        generator: torch.Generator | None,
    ) -> _Batch:
        """The shared prefix's cached keys and values, then the left-padded rest of each prompt; each row's first
        new token comes from its last position's logits."""
        device = self.model.device
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
        pending = target_tokens(logits, warpers, generator)[:, 0]
        self.timings.prompt_tokens += sum(len(p) for p in prompts)
        self.timings.cached_prompt_tokens += n_prefix * len(prompts)
        return _Batch(rows, cache, valid, pending, valid.sum(-1))

    def _prefill_prefix(self, tokens: list[int]) -> PrefixKV:
        """Keys and values of a prompt prefix, computed at batch 1."""
        device, n = self.model.device, len(tokens)
        cache = DynamicCache(config=self.model.config)
        ones = torch.ones(1, n, dtype=torch.bool, device=device)
        self._forward(torch.tensor([tokens], device=device), ones, torch.arange(n, device=device)[None], cache, True)
        return PrefixKV(tuple(tokens), [(layer.keys, layer.values) for layer in cache.layers])

    def _step(
        self,
        batch: _Batch,
        use_draft: bool,
        params: SamplingParams,
        warpers: LogitsProcessorList | None,
        generator: torch.Generator | None,
        stream: StreamCallback | None,
    ) -> list[bool]:
        """One pass: draft for every row, verify [pending token + draft] in one forward, emit what was accepted.
        Returns which rows are done."""
        t0 = time.perf_counter()
        drafts = self._propose(batch.rows) if use_draft else [[] for _ in batch.rows]
        t1 = time.perf_counter()
        n_accepted = self._verify(batch, drafts, warpers, generator)
        t2 = time.perf_counter()
        self.timings.draft_s += t1 - t0
        self.timings.verify_s += t2 - t1
        self.timings.steps += 1
        self.step_cost.observe(len(drafts), max(len(d) for d in drafts) + 1, t2 - t1)
        done = []
        for row, draft, n, bonus in zip(batch.rows, drafts, n_accepted.tolist(), batch.pending.tolist()):
            row.stats.record(len(draft), n)
            row.stats.draft_s += t1 - t0
            row.stats.verify_s += t2 - t1
            done.append(self._emit(row, draft[:n] + [bonus], params, stream))
        return done

    def _propose(self, rows: list[_DecodingRow]) -> list[list[int]]:
        assert self.drafter is not None
        limits = [r.max_new - len(r.generated) - 1 for r in rows]  # the step also emits the target's own token
        contexts = [r.draft_context for r in rows if r.draft_context is not None]
        return self.drafter.propose(contexts, limits, self.step_cost)

    def _verify(
        self,
        batch: _Batch,
        drafts: list[list[int]],
        warpers: LogitsProcessorList | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Run [pending token + draft] of every row (padded to the longest draft) through the model; keep the
        accepted slots and set each row's next pending token to the target's own. Returns accepted lengths."""
        device, k = self.model.device, max(len(d) for d in drafts)
        draft_ids = torch.tensor([d + [self.pad_id] * (k - len(d)) for d in drafts], device=device, dtype=torch.long)
        step_ids = torch.cat([batch.pending[:, None], draft_ids], dim=1)
        step_valid = torch.tensor(
            [[1] * (len(d) + 1) + [0] * (k - len(d)) for d in drafts], device=device, dtype=torch.bool
        )
        step_pos = batch.next_pos[:, None] + torch.arange(k + 1, device=device)
        batch.valid = torch.cat([batch.valid, step_valid], dim=1)
        logits = self._forward(step_ids, batch.valid, step_pos, batch.cache)
        target = target_tokens(logits, warpers, generator)  # [B, k+1]: the target's token at each position
        n_accepted = accepted_lengths(draft_ids, target, step_valid[:, 1:])
        slot = torch.arange(k + 1, device=device)
        batch.valid[:, -(k + 1) :] &= slot[None, :] <= n_accepted[:, None]  # mask rejected draft slots
        batch.next_pos = batch.next_pos + n_accepted + 1
        batch.pending = target.gather(1, n_accepted[:, None])[:, 0]
        return n_accepted

    def _forward(
        self,
        ids: torch.Tensor,
        valid: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for `ids` (only the last position's with `last_only`), which occupy the last ids.shape[1] slots
        of `valid` (the mask over all cache slots)."""
        mask = attention_mask(valid, ids.shape[1], self.model.dtype)
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

    def _emit(
        self, row: _DecodingRow, tokens: list[int], params: SamplingParams, stream: StreamCallback | None
    ) -> bool:
        """Append newly decoded tokens, cut at EOS, a stop string or max_new_tokens; return whether the row is done."""
        tokens, hit_eos = cut_at_eos(tokens[: row.max_new - len(row.generated)], self.eos_ids)
        if hit_eos:
            row.finish_reason = "stop"
        start = len(row.generated)
        row.generated.extend(tokens)
        if params.stop and row.finish_reason is None:
            cut = find_stop(self.tokenizer, row.generated, params.stop, start)
            if cut is not None:  # cut after the token completing the stop string; remember where the text ends
                del row.generated[cut[0] :]
                row.finish_reason, row.stop_text_end = "stop", cut[1]
        emitted = row.generated[start:]
        if row.draft_context is not None:
            row.draft_context.extend(emitted)
        if stream is not None and emitted:
            stream(row.index, emitted)
        if row.finish_reason is None and len(row.generated) >= row.max_new:
            row.finish_reason = "length"
        return row.finish_reason is not None

    def _result(self, row: _DecodingRow) -> GenerationResult:
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        if row.stop_text_end is not None:
            text = text[: row.stop_text_end]
        return GenerationResult(text, row.generated, row.prompt_len, row.finish_reason or "length", row.stats)
