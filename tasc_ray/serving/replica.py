"""One Serve replica's engine: the generator, its decode thread, prompt checks, index reloads, health.

The generator (`tasc_ray.spec.engine.load_engine`: model and index loaded once per replica) runs only on the
replica's single decode thread, so the event loop keeps accepting requests while a batch decodes. Prompts are
encoded on the event loop with a second tokenizer: a Rust tokenizer must not be used by two threads at once.
A reload (`IndexUpdate`, the deployment's user_config) swaps the drafter between batches.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from tasc_ray.models import load_tokenizer
from tasc_ray.serving.batching import Work, group, row_stream
from tasc_ray.serving.config import IndexUpdate, ServeConfig
from tasc_ray.serving.protocol import APIError, TextPrompt
from tasc_ray.spec.drafter import build_drafter
from tasc_ray.spec.engine import load_engine
from tasc_ray.spec.generator import GenerationResult, SpeculativeGenerator
from tasc_ray.spec.index import NgramIndex
from tasc_ray.spec.prompts import Prompt, PromptError, encode_prompt

if TYPE_CHECKING:  # metrics import Ray Serve; this module stays importable without it
    from tasc_ray.serving.metrics import ServeMetrics

logger = logging.getLogger(__name__)

RowResult = GenerationResult | Exception  # a failed row's exception stays in its place


class Replica:
    """The replica's state: the generator and its decode thread, the request-side tokenizer, the batch counters."""

    def __init__(self, config: ServeConfig, metrics: ServeMetrics) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        t0 = time.perf_counter()
        self.generator: SpeculativeGenerator = load_engine(config.engine)
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(config.engine.model)  # the event loop's own
        self.metrics = metrics
        self.model_name = config.served_model_name
        self.lock = threading.Lock()  # held by a decode; a drafter swap waits for it
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tasc-decode")
        self.index_path = config.engine.index
        self.index_version: str | int | None = None
        self.drafter_config = config.engine.drafter
        self.replica_id = uuid.uuid4().hex[:12]
        self.batches = 0
        self.batched_rows = 0
        logger.info(
            "replica %s: model %s (index %s) loaded in %.1f s",
            self.replica_id,
            config.engine.model,
            self.index_path,
            time.perf_counter() - t0,
        )

    # ----- prompts (on the event loop) -----
    def encode(self, prompt: TextPrompt | list[dict[str, str]], param: str) -> list[int]:
        """Token ids of a request's prompt; one the engine would refuse is a 400 naming `param`."""
        try:
            return encode_prompt(self.tokenizer, prompt, self.generator.max_context)
        except PromptError as exc:
            raise APIError(400, str(exc), param=param, code=exc.code) from exc

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of chat messages through the model's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        return self.encode(messages, "messages")

    # ----- decoding (on the decode thread) -----
    async def decode(self, works: list[Work]) -> list[RowResult]:
        """run_batch on the decode thread, awaited without blocking the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.run_batch, works)

    def run_batch(self, works: Sequence[Work]) -> list[RowResult]:
        """Decode a batch: one generate call per group of compatible parameters; a failure stays in its rows."""
        results: list[RowResult | None] = [None] * len(works)
        self.batches += 1
        self.batched_rows += len(works)
        with self.lock:
            for members in group(works):
                self.metrics.batch(len(members))
                rows = [works[i] for i in members]
                prompts: list[Prompt] = [w.prompt_ids for w in rows]
                out = self.generator.generate_each(prompts, rows[0].params, row_stream(rows))
                for i, result in zip(members, out):
                    results[i] = result
        self.metrics.results([r for r in results if isinstance(r, GenerationResult)])
        return results  # type: ignore[return-value]  # every position was filled

    # ----- index reloads (Serve's reconfigure) -----
    def apply(self, update: IndexUpdate) -> dict[str, Any]:
        """Swap the drafter (a new index, or new drafter settings) between batches, without a restart."""
        given = update.model_fields_set
        settings = update.drafter_config(self.drafter_config)
        path = update.index if "index" in given else self.index_path
        reload_index = path != self.index_path or (
            "index_version" in given and update.index_version != self.index_version
        )
        changed = reload_index or settings != self.drafter_config
        if changed:
            index = self._load_index(path) if reload_index else self._index()
            drafter = build_drafter(index, settings)
            with self.lock:  # between batches: a running decode keeps its drafter until it ends
                self.generator.drafter = drafter
            self.index_path, self.drafter_config = path, settings
        if "index_version" in given:
            self.index_version = update.index_version
        return {"index": self.index_path, "index_version": self.index_version, "changed": changed}

    def _index(self) -> NgramIndex | None:
        drafter = self.generator.drafter
        return drafter.index if drafter is not None else None

    def _load_index(self, path: str | None) -> NgramIndex | None:
        """The index at `path` (None: no index), checked against the model's tokenizer."""
        if not path:
            return None
        t0 = time.perf_counter()
        index = NgramIndex.load(path)
        index.check_tokenizer(self.generator.tokenizer)
        logger.info("replica %s: loaded index %s in %.2f s", self.replica_id, path, time.perf_counter() - t0)
        return index

    # ----- health -----
    def check_health(self) -> None:
        if self.executor._shutdown or self.generator is None:
            raise RuntimeError("the decode thread is not running")

    def info(self) -> dict[str, Any]:
        drafter = self.generator.drafter
        index = self._index()
        return {
            "status": "ok",
            "model": self.model_name,
            "replica": self.replica_id,
            "index": self.index_path,
            "index_version": self.index_version,
            "index_sequences": index.n_sequences if index is not None else 0,
            "draft_mode": drafter.config.mode.value if drafter is not None else None,
            "max_context": self.generator.max_context,
            "batches": self.batches,
            "batched_rows": self.batched_rows,
        }
