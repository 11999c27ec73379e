"""SpeculativeGenerator: batched, lossless speculative decoding over any Hugging Face causal LM.

Each step runs one forward pass over every row's pending token plus its draft, with per-row position ids and
an explicit 4D attention mask. A row accepts the longest draft prefix the target agrees with, plus the
target's own next token; the cache slots of rejected draft tokens are masked out (never recomputed) and
compacted away when they pile up. Finished rows leave the batch. A prompt prefix shared by the whole batch
(a few-shot template, a system prompt) is prefilled once at batch 1, and its keys and values serve every row
and later batches that share it.

Greedy decoding emits exactly what plain greedy decoding emits. Sampling is exact too: the draft is a point
mass, so sampling x ~ p at each position and accepting the draft token iff x equals it (else emitting x and
stopping) draws from p itself. `speculative=False` runs plain decoding through the same loop with no draft.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tasc_ray.spec.draft_length import StepCostModel
from tasc_ray.spec.drafter import Drafter, RowState

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int] | Sequence[dict[str, str]]
StreamCallback = Callable[[int, list[int]], None]  # (prompt index, newly emitted token ids)


class PromptError(ValueError):
    """A prompt the engine cannot decode (empty, token ids outside the vocabulary, too long for the context)."""

    code = "invalid_value"  # OpenAI's error code for it


class PromptTooLongError(PromptError):
    """A prompt that leaves no room for one new token in the model's context window."""

    code = "context_length_exceeded"


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


@dataclass
class RowStats:
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
class _PrefixKV:
    """Keys and values of a prompt prefix for every layer, computed once at batch 1."""

    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def cut(self, n: int) -> _PrefixKV:
        return _PrefixKV(self.tokens[:n], [(k[:, :, :n], v[:, :, :n]) for k, v in self.layers])


@dataclass
class _Row:
    index: int  # position in the caller's prompt list
    prompt_len: int
    max_new: int
    draft_state: RowState | None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_text_end: int | None = None
    stats: RowStats = field(default_factory=RowStats)


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
        self.prefix_cache_min_tokens = prefix_cache_min_tokens
        self._prefix: _PrefixKV | None = None
        self._last_prompt: list[int] | None = None  # lets single-prompt batches find a prefix shared across calls
        if drafter is not None and drafter.index is not None:
            drafter.index.check_tokenizer(tokenizer)
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.timings = EngineTimings()
        self.step_cost = StepCostModel()
        forward_params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._can_keep_last = "logits_to_keep" in forward_params

    # ----- public API -----
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text as is, chat messages through the chat template, ids unchanged; raises
        PromptError for a prompt the engine cannot decode (see check_prompt)."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif len(prompt) and isinstance(prompt[0], dict):
            if not getattr(self.tokenizer, "chat_template", None):
                raise PromptError("this model has no chat template; send a plain-text prompt")
            out = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        else:
            ids = [int(t) for t in prompt]
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for t in ids):
                raise PromptError(f"token ids must lie in [0, {vocab})")
        self.check_prompt(ids)
        return ids

    def check_prompt(self, ids: Sequence[int]) -> None:
        """Refuse an empty prompt and one that leaves no room for a new token in the model's context."""
        if not ids:
            raise PromptError("the prompt is empty")
        if len(ids) >= self.max_context:
            raise PromptTooLongError(f"the prompt has {len(ids)} tokens; the model's context holds {self.max_context}")

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

    # ----- the decoding loop -----
    @torch.inference_mode()
    def _generate_batch(
        self,
        prompts: list[list[int]],
        indices: list[int],
        params: SamplingParams,
        generator: torch.Generator | None,
        stream: StreamCallback | None,
    ) -> list[_Row]:
        use_draft = params.speculative and self.drafter is not None
        rows = [
            _Row(
                i,
                len(p),
                min(params.max_new_tokens, self.max_context - len(p)),
                self.drafter.new_row(p) if use_draft else None,
            )
            for i, p in zip(indices, prompts)
        ]
        warpers = self._warpers(params)
        device = self.model.device

        # Prefill: the shared prefix's cached keys and values, then the left-padded rest of each prompt;
        # the first new token comes from the last position's logits.
        cache = DynamicCache(config=self.model.config)
        prefix = self._shared_prefix(prompts)
        n_prefix = len(prefix.tokens) if prefix is not None else 0
        if prefix is not None:
            for layer, (keys, values) in enumerate(prefix.layers):
                cache.update(keys.expand(len(prompts), -1, -1, -1), values.expand(len(prompts), -1, -1, -1), layer)
        rests = [p[n_prefix:] for p in prompts]
        width = max(len(r) for r in rests)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rests], device=device)
        valid = torch.tensor(
            [[1] * n_prefix + [0] * (width - len(r)) + [1] * len(r) for r in rests], device=device, dtype=torch.bool
        )
        positions = n_prefix + (valid[:, n_prefix:].long().cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(ids, valid, positions, cache, last_only=True)
        pending = self._choose(logits, warpers, generator)[:, 0]
        next_pos = valid.sum(-1)
        self.timings.prompt_tokens += sum(len(p) for p in prompts)
        self.timings.cached_prompt_tokens += n_prefix * len(prompts)
        done = [self._emit(row, [int(t)], params, stream) for row, t in zip(rows, pending.tolist())]
        finished: list[_Row] = []

        while True:
            keep = [i for i, d in enumerate(done) if not d]
            finished += [rows[i] for i, d in enumerate(done) if d]
            if not keep:
                return finished
            if len(keep) < len(rows):
                rows = [rows[i] for i in keep]
                sel = torch.tensor(keep, device=device)
                valid, pending, next_pos = valid[sel], pending[sel], next_pos[sel]
                _select_rows(cache, sel)
            if valid.shape[1] > 16 and 1 - valid.sum(-1).max().item() / valid.shape[1] > self.compact_waste:
                valid = _compact(cache, valid)

            t0 = time.perf_counter()
            limits = [r.max_new - len(r.generated) - 1 for r in rows]  # the step also emits the target's own token
            drafts = (
                self.drafter.propose([r.draft_state for r in rows], limits, self.step_cost)
                if use_draft
                else [[] for _ in rows]
            )
            t1 = time.perf_counter()
            k = max(len(d) for d in drafts)
            step_ids = torch.tensor([d + [self.pad_id] * (k - len(d)) for d in drafts], device=device, dtype=torch.long)
            step_ids = torch.cat([pending[:, None], step_ids], dim=1)
            step_valid = torch.tensor(
                [[1] * (len(d) + 1) + [0] * (k - len(d)) for d in drafts], device=device, dtype=torch.bool
            )
            step_pos = next_pos[:, None] + torch.arange(k + 1, device=device)
            valid = torch.cat([valid, step_valid], dim=1)
            logits = self._forward(step_ids, valid, step_pos, cache)
            target = self._choose(logits, warpers, generator)  # [B, k+1]: the target's token at each position
            # n_i = length of the longest draft prefix equal to the target's tokens
            agree = (step_ids[:, 1:] == target[:, :-1]) & step_valid[:, 1:]
            n_accepted = agree.long().cumprod(dim=1).sum(dim=1)
            slot = torch.arange(k + 1, device=device)
            valid[:, -(k + 1) :] &= slot[None, :] <= n_accepted[:, None]  # mask rejected draft slots
            next_pos = next_pos + n_accepted + 1
            pending = target.gather(1, n_accepted[:, None])[:, 0]
            t2 = time.perf_counter()
            self.timings.draft_s += t1 - t0
            self.timings.verify_s += t2 - t1
            self.timings.steps += 1
            self.step_cost.observe(step_ids.numel(), t2 - t1)

            done = []
            for row, draft, n, bonus in zip(rows, drafts, n_accepted.tolist(), pending.tolist()):
                row.stats.record(len(draft), n)
                row.stats.draft_s += t1 - t0
                row.stats.verify_s += t2 - t1
                done.append(self._emit(row, draft[:n] + [bonus], params, stream))

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
        q, s = ids.shape[1], valid.shape[1]
        causal = torch.arange(s, device=ids.device)[None, :] <= torch.arange(s - q, s, device=ids.device)[:, None]
        allowed = valid[:, None, None, :] & causal[None, None]
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill(~allowed, torch.finfo(dtype).min)
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

    def _shared_prefix(self, prompts: list[list[int]]) -> _PrefixKV | None:
        """The cached keys and values of the longest prefix every prompt of the batch shares (each keeps at least
        one token to prefill), reusing the last batch's prefix when it still applies; None when shorter than
        `prefix_cache_min_tokens`. A batch of one prompt (an online request) is compared with the previous batch's
        first prompt, so consecutive requests with one system prompt or template share its prefill."""
        if self.prefix_cache_min_tokens <= 0:
            return None
        limit = min(len(p) for p in prompts) - 1
        last, self._last_prompt = self._last_prompt, prompts[0]
        kept = self._prefix
        if kept is not None:
            n = min(_common_prefix_length([list(kept.tokens), *prompts]), limit)
            if n >= self.prefix_cache_min_tokens:
                if n < len(kept.tokens):
                    self._prefix = kept = kept.cut(n)
                return kept
        group = prompts if len(prompts) > 1 else [p for p in (last, prompts[0]) if p is not None]
        if len(group) < 2:
            return None
        n = min(_common_prefix_length(group), limit)
        if n < self.prefix_cache_min_tokens:
            return None
        tokens = prompts[0][:n]
        cache = DynamicCache(config=self.model.config)
        device = self.model.device
        self._forward(
            torch.tensor([tokens], device=device),
            torch.ones(1, n, dtype=torch.bool, device=device),
            torch.arange(n, device=device)[None],
            cache,
            last_only=True,
        )
        self._prefix = _PrefixKV(tuple(tokens), [(layer.keys, layer.values) for layer in cache.layers])
        return self._prefix

    def _warpers(self, params: SamplingParams) -> LogitsProcessorList | None:
        if params.greedy:
            return None
        warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
        if params.top_k > 0:
            warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(params.top_p))
        return warpers

    def _choose(
        self, logits: torch.Tensor, warpers: LogitsProcessorList | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The target's token at every position: argmax (greedy) or an independent sample from the warped p."""
        if warpers is None:
            return logits.argmax(dim=-1)
        b, q, v = logits.shape
        scores = warpers(None, logits.reshape(b * q, v))
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).reshape(b, q)

    def _emit(self, row: _Row, tokens: list[int], params: SamplingParams, stream: StreamCallback | None) -> bool:
        """Append newly decoded tokens, cut at EOS, a stop string or max_new_tokens; return whether the row is done."""
        room = row.max_new - len(row.generated)
        tokens = tokens[:room]
        for j, tok in enumerate(tokens):
            if tok in self.eos_ids:
                tokens = tokens[: j + 1]
                row.finish_reason = "stop"
                break
        start = len(row.generated)
        row.generated.extend(tokens)
        if params.stop and row.finish_reason is None:
            self._check_stop_strings(row, start, params.stop)
        emitted = row.generated[start:]
        if row.draft_state is not None:
            row.draft_state.extend(emitted)
        if stream is not None and emitted:
            stream(row.index, emitted)
        if row.finish_reason is None and len(row.generated) >= row.max_new:
            row.finish_reason = "length"
        return row.finish_reason is not None

    def _check_stop_strings(self, row: _Row, start: int, stops: list[str]) -> None:
        """Cut the row after the first token that completes a stop string; remember where the text ends."""
        cut = find_stop(self.tokenizer, row.generated, stops, start)
        if cut is not None:
            del row.generated[cut[0] :]
            row.finish_reason, row.stop_text_end = "stop", cut[1]

    def _result(self, row: _Row) -> GenerationResult:
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        if row.stop_text_end is not None:
            text = text[: row.stop_text_end]
        return GenerationResult(text, row.generated, row.prompt_len, row.finish_reason or "length", row.stats)


def find_stop(
    tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int], stops: Sequence[str], start: int = 0
) -> tuple[int, int] | None:
    """(tokens up to the one completing the first stop string, where that string starts in the text), or None.

    Only cuts ending after token `start` are looked for (the earlier tokens were checked before)."""
    for end in range(start + 1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:end], skip_special_tokens=True)
        hits = [text.find(s) for s in stops if s and s in text]
        if hits:
            return end, min(hits)
    return None


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n


def _select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep only the given batch rows of every cache layer."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[rows], layer.values[rows]


def _compact(cache: DynamicCache, valid: torch.Tensor) -> torch.Tensor:
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
