"""SpeculativeGenerator: batched, lossless speculative decoding over any Hugging Face causal LM; the offline API.

It puts the engine's parts together (runner.py: the model's forward over cache slots; proposer.py with a drafter
from drafts/: what each row drafts; verify.py: the acceptance rule; outputs.py: stops and results) and hands them
to a Scheduler, which owns the running batch. `generate` decodes a list of prompts; `request` and `scheduler` are
for servers (an EngineLoop runs a scheduler on its own thread). Greedy decoding emits exactly what plain greedy
decoding emits, sampling exactly what seeded plain sampling emits (verify.py); `speculative=False` runs plain
decoding through the same loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tasc_ray.engine.config import EngineConfig
from tasc_ray.engine.cost import StepCostTable
from tasc_ray.engine.drafts.drafter import Drafter
from tasc_ray.engine.model.fast_forward import FastForward
from tasc_ray.engine.outputs import OutputProcessor, find_stop
from tasc_ray.engine.prompts import Prompt, PromptError, PromptTooLongError, encode_prompt
from tasc_ray.engine.proposer import Proposer
from tasc_ray.engine.request import GenerationResult, Request, RowStats, TokenCallback
from tasc_ray.engine.runner import ModelRunner
from tasc_ray.engine.sampling import SamplingParams
from tasc_ray.engine.scheduler import EngineTimings, Scheduler

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


class SpeculativeGenerator:
    """Batched greedy/sampled decoding with n-gram drafts; one engine for the CLI, Ray jobs and Serve."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        drafter: Drafter | None = None,
        config: EngineConfig | None = None,
        fast_forward: bool | FastForward | None = None,
        **settings: Any,
    ) -> None:
        """`config` gives the batch size, the scheduler's settings and the experimental switches (its model and
        index are load_engine's business); `settings`: EngineConfig fields to set instead, at the top level or of a
        block (`max_batch_size=4, compact_waste=0.2, speculation_gate=False`). `fast_forward`: overrides the
        config's switch, or is one already built for the same model (generators can share its weights). The fast
        forward reads the weights once, so a model whose weights change afterwards needs a new generator."""
        if config is not None and settings:
            config = EngineConfig.model_validate({**config.model_dump(), **settings})
        self.config = config or EngineConfig.model_validate(settings)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size = self.config.max_batch_size
        self.runner = ModelRunner(
            model,
            tokenizer,
            fast_forward if fast_forward is not None else self.config.experimental.fast_forward,
            self.config.scheduler.prefix_cache_min_tokens,
            self.config.scheduler.prefix_cache_entries,
        )
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.outputs = OutputProcessor(tokenizer, set(eos if isinstance(eos, list) else [eos]) - {None})
        ragged = self.runner.fast_forward is not None  # its products skip padding: rows may draft different lengths
        self.proposer = Proposer(None, ragged, self.config.experimental.speculation_gate)
        self.drafter = drafter
        self.timings = EngineTimings()

    @property
    def drafter(self) -> Drafter | None:
        return self.proposer.drafter

    @drafter.setter
    def drafter(self, drafter: Drafter | None) -> None:
        """Swap the drafter (between steps, on the decode thread); refuses an index built for another tokenizer."""
        if drafter is not None and drafter.index is not None:
            drafter.index.check_tokenizer(self.tokenizer)
        self.proposer.drafter = drafter

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    @property
    def fast_forward(self) -> FastForward | None:
        return self.runner.fast_forward

    # ----- public API -----
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt, checked (see tasc_ray.engine.prompts.encode_prompt)."""
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

    def scheduler(self, max_rows: int | None = None) -> Scheduler:
        """A scheduler decoding with this generator's parts (one per thread: the generator holds no batch)."""
        return Scheduler(
            self.runner,
            self.proposer,
            self.outputs,
            max_rows or self.max_batch_size,
            self.config.scheduler,
            self.timings,
        )

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | None = None,
        stream: StreamCallback | None = None,
    ) -> list[GenerationResult]:
        """Decode every prompt, up to max_batch_size rows at a time, a finished row's place taken by the next
        prompt (shortest prompts first); raises the first row's error if any row fails."""
        requests = self._requests(prompts, params, stream)
        self._run(requests)
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
        self._run([r for r in requests if r.error is None])
        for i, r in enumerate(requests):
            if out[i] is not None:
                continue
            if r.error is not None and not isinstance(r.error, PromptError):
                logger.warning("row %d failed in a batch (%s); decoding it alone", i, r.error)
                alone = self._requests([prompts[i]], params, _one_row(stream, i), first_row=i)[0]
                self._run([alone])
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
        the medians in the step-cost table that sizes drafts, and return the table (seconds).

        The default grid is small (17 forwards over a 256-token cache, the length of a typical few-shot prompt; ~2 s
        for SmolLM2-135M on 2 CPU threads): a start-up cost every replica and label actor pays; the engine's own
        passes refine the cells they use."""
        table = self.proposer.step_cost
        self.runner.profile(table, rows or sorted({1, self.max_batch_size}), queries, context, repeats)
        return table.table()

    @property
    def step_cost(self) -> StepCostTable:
        """What a verification pass costs by (rows, query tokens): what draft lengths are sized on."""
        return self.proposer.step_cost

    @step_cost.setter
    def step_cost(self, table: StepCostTable) -> None:
        self.proposer.step_cost = table

    # ----- running requests to the end -----
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

    def _run(self, requests: list[Request]) -> None:
        t0 = time.perf_counter()
        scheduler = self.scheduler()
        for request in sorted(requests, key=lambda r: r.prompt_len):  # fewer pad slots among rows admitted together
            scheduler.add(request)
        scheduler.run()
        self.timings.generate_s += time.perf_counter() - t0


def _one_row(stream: StreamCallback | None, index: int) -> StreamCallback | None:
    """A stream callback for a one-prompt call that reports its tokens under the caller's prompt index."""
    return None if stream is None else (lambda _k, ids: stream(index, ids))
