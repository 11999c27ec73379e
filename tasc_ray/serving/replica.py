"""One engine replica's state: the generator and its engine loop, the request log, index reloads, health.

The generator (`tasc_ray.engine.load.load_engine`: model and index loaded once per replica) runs only on the
replica's engine loop (`tasc_ray.engine.loop.EngineLoop`): one decode thread that admits each request's
rows at its next step (continuous batching), so the event loop keeps accepting requests while rows decode, a
short request never waits for a long one, and a request whose client went away is cancelled and leaves at the
next step. Prompts arrive as token ids (the ingress tokenizes them); the request log decodes them with a second
tokenizer, as a Rust tokenizer must not be used by two threads at once. A reload (`IndexUpdate`, the deployment's
user_config) swaps the drafter between steps. `overlay()` reads the drafter's live overlay (the outputs the replica
learned from) between steps, for `tasc-ray overlay export` (through the ingress's `GET /v1/tasc/overlay`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from tasc_ray.engine.config import DrafterConfig
from tasc_ray.engine.drafts.drafter import build_drafter
from tasc_ray.engine.drafts.index import NgramIndex, tokenizer_fingerprint
from tasc_ray.engine.generator import GenerationResult, SpeculativeGenerator
from tasc_ray.engine.load import load_engine
from tasc_ray.engine.loop import EngineLoop
from tasc_ray.engine.request import ONLINE, Request, TokenCallback
from tasc_ray.engine.sampling import SamplingParams
from tasc_ray.models import load_tokenizer
from tasc_ray.serving.config import IndexUpdate, ServeConfig
from tasc_ray.serving.request_log import LoggedRequest, RequestLog

if TYPE_CHECKING:  # metrics import Ray Serve; this module stays importable without it
    from tasc_ray.serving.metrics import ServeMetrics

logger = logging.getLogger(__name__)


class Replica:
    """The replica's state: the generator and its engine loop, the request log, the index in use."""

    def __init__(self, config: ServeConfig, metrics: ServeMetrics) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        t0 = time.perf_counter()
        self.generator: SpeculativeGenerator = load_engine(config.engine)
        self.metrics = metrics
        self.model_name = config.served_model_name
        self.loop = EngineLoop(self.generator, max_rows=config.engine.max_batch_size)
        self.index_path = config.engine.index
        self.index_version: str | int | None = None
        self.drafter_config = config.engine.drafter
        self.replica_id = uuid.uuid4().hex[:12]
        self.request_log: RequestLog | None = None
        self.log_tokenizer: PreTrainedTokenizerBase | None = None  # the event loop's own, for logged prompts
        self.tokenizer_source = config.engine.model
        # overlay(): its own tokenizer (loaded on first use), one caller at a time, since it may run in any thread
        self._overlay_lock = threading.Lock()
        self._overlay_tokenizer: PreTrainedTokenizerBase | None = None
        self._overlay_tokenizer_meta: dict[str, Any] = {}
        if config.log_dir:
            self.log_tokenizer = load_tokenizer(config.engine.model)
            self.request_log = RequestLog(config.log_dir, self.replica_id, config.log_max_rows, config.log_max_seconds)
        logger.info(
            "replica %s: model %s (index %s) loaded in %.1f s",
            self.replica_id,
            config.engine.model,
            self.index_path,
            time.perf_counter() - t0,
        )

    # ----- decoding (on the engine loop) -----
    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        row: int = 0,
        on_tokens: TokenCallback | None = None,
        request_id: str = "",
        priority: int = ONLINE,
    ) -> GenerationResult:
        """Decode one prompt on the engine loop; cancelled (freed at the next step) if the caller is cancelled.
        `on_tokens` runs on the decode thread. `priority` orders admission (online requests before batch rows). A
        finished row goes to the request log, if there is one, and to the drafter's live overlay (the scheduler's
        doing), whatever its priority."""
        request = Request.new(prompt_ids, params, row, on_tokens, on_finish=self._finished, priority=priority)
        result = await self.loop.submit_async(request)
        if self.request_log is not None and self.log_tokenizer is not None and result.finish_reason != "cancelled":
            self.request_log.record(
                LoggedRequest(
                    request_id=request_id,
                    row=row,
                    created=time.time(),
                    model=self.model_name,
                    prompt=self.log_tokenizer.decode(prompt_ids),
                    output=result.text,
                    finish_reason=result.finish_reason,
                    prompt_tokens=result.prompt_tokens,
                    output_tokens=result.new_tokens,
                    forward_passes=result.stats.forward_passes,
                    accepted_tokens=result.stats.accepted,
                    latency_s=time.perf_counter() - request.submitted_at,
                    params=LoggedRequest.params_json(params),
                )
            )
        return result

    def shutdown(self) -> None:
        """Stop the engine loop (failing what is left) and write the request log's last file."""
        self.loop.stop(timeout=5.0)
        if self.request_log is not None:
            self.request_log.close()

    def _finished(self, request: Request) -> None:  # decode thread
        self.metrics.finished(request, self.loop.stats)
        self.metrics.prefix_cache(self.loop.scheduler.timings)

    def set_max_rows(self, rows: int) -> None:
        """Rows decoding at once on this replica (applied between steps)."""
        self.loop.call_soon(lambda: setattr(self.loop.scheduler, "max_rows", rows)).result()

    # ----- index reloads (Serve's reconfigure) -----
    def apply(self, update: IndexUpdate) -> dict[str, Any]:
        """Swap the drafter (a new index, or new drafter settings) between steps, without a restart; rows already
        decoding keep their own context and draft with the new drafter from then on, and what the replica learned
        (the live overlay of finished outputs, the acceptance calibration) carries over to it."""
        given = update.model_fields_set
        settings = update.drafter_config(self.drafter_config)
        path = update.index if "index" in given else self.index_path
        reload_index = path != self.index_path or (
            "index_version" in given and update.index_version != self.index_version
        )
        changed = reload_index or settings != self.drafter_config
        if changed:
            index = self._load_index(path) if reload_index else self._index()
            self.loop.call_soon(lambda: self._swap_drafter(index, settings)).result()  # between steps
            self.index_path, self.drafter_config = path, settings
        if "index_version" in given:
            self.index_version = update.index_version
        return {"index": self.index_path, "index_version": self.index_version, "changed": changed}

    def _swap_drafter(self, index: NgramIndex | None, settings: DrafterConfig) -> None:  # decode thread
        current = self.generator.drafter
        swapped = current.reconfigured(index, settings) if current is not None else build_drafter(index, settings)
        self.generator.drafter = swapped

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

    # ----- the live overlay (what the replica learned), for `tasc-ray overlay export` -----
    def overlay(self, timeout: float | None = 60.0) -> dict[str, Any]:
        """The finished outputs the drafter's live overlay holds, oldest first: token ids (`outputs`), and their
        texts (`texts`, special tokens left out, as a completion's text is); empty lists, and `live` False, when the
        drafter keeps no overlay. The ids are read on the decode thread between steps; the texts are decoded in the
        calling thread with the replica's own overlay tokenizer (a Rust tokenizer must not be used by two threads
        at once). `tokenizer` is what an index records of it (name, fingerprint, vocab size)."""
        if not self.loop.alive:
            raise RuntimeError("the engine loop is not running")
        outputs, capacity = self.loop.call_soon(self._overlay_outputs).result(timeout)
        with self._overlay_lock:
            tokenizer = self._overlay_decoder()
            texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
            meta = dict(self._overlay_tokenizer_meta)
        return {
            "replica": self.replica_id,
            "model": self.model_name,
            "live": capacity is not None,
            "capacity": capacity,
            "tokenizer": meta,
            "outputs": outputs,
            "texts": texts,
        }

    def _overlay_outputs(self) -> tuple[list[list[int]], int | None]:  # decode thread
        drafter = self.generator.drafter
        live = getattr(drafter, "live", None) if drafter is not None else None
        if live is None:
            return [], None
        return live.outputs(), live.capacity

    def _overlay_decoder(self) -> PreTrainedTokenizerBase:  # under _overlay_lock
        if self._overlay_tokenizer is None:
            tokenizer = load_tokenizer(self.tokenizer_source)
            self._overlay_tokenizer_meta = {  # as an index's manifest records its tokenizer
                "name": str(getattr(tokenizer, "name_or_path", "")),
                "fingerprint": tokenizer_fingerprint(tokenizer),
                "vocab_size": len(tokenizer),
            }
            self._overlay_tokenizer = tokenizer
        return self._overlay_tokenizer

    # ----- health -----
    def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError("the engine loop is not running")

    def prefix_cache_stats(self) -> dict[str, int]:
        """Prompt tokens admitted, and those served from the shared-prefix cache instead of prefilled."""
        timings = self.loop.scheduler.timings
        return {"prompt_tokens": timings.prompt_tokens, "cached_prompt_tokens": timings.cached_prompt_tokens}

    def info(self) -> dict[str, Any]:
        drafter = self.generator.drafter
        index = self._index()
        return {
            "status": "ok",
            "model": self.model_name,
            "replica": self.replica_id,
            "pid": os.getpid(),
            "index": self.index_path,
            "index_version": self.index_version,
            "index_sequences": index.n_sequences if index is not None else 0,
            "draft_mode": drafter.config.mode.value if drafter is not None else None,
            "max_context": self.generator.max_context,
            "model_source": self.tokenizer_source,  # what the engine loaded (a name or a path): its tokenizer's too
            "max_rows": self.loop.scheduler.max_rows,
            "engine": self.loop.stats.to_dict(),
            "prefix_cache": self.prefix_cache_stats(),
            "request_log": self.request_log.stats() if self.request_log is not None else None,
        }
