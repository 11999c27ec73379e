"""OpenAI-compatible serving of the shared TASC engine on Ray Serve: config, request models and the deployment.

One replica holds one `SpeculativeGenerator` (built by `load_engine`, so the model and the index are loaded
once per replica). Concurrent requests meet in a `@serve.batch` queue; each batch is split into groups whose
sampling parameters can share one decode (greedy requests with the same limits, stop strings and speculative
flag) and every group is one batched `generate` call, run on the replica's single decode thread so that the
event loop keeps accepting requests. Streaming feeds the engine's per-row token callback into an asyncio queue
and renders it as server-sent events ending in `data: [DONE]`.

Requests are validated here (JSON, types, limits, model name, prompt length) before they join a batch, so a
bad request gets an OpenAI-style 4xx body and never fails the other requests of its batch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

from tasc_ray.spec.config import DrafterConfig, EngineConfig

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "TascOpenAI"
APP_NAME = "tasc"
# EngineConfig fields (and the drafter's) accepted at the top level of ServeConfig (max_batch_size stays
# ServeConfig's own: the batch size of @serve.batch, which is also the engine's batch size in a replica).
ENGINE_FIELDS = (set(EngineConfig.model_fields) | set(DrafterConfig.model_fields)) - {"max_batch_size"}


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
class AutoscalingSettings(BaseModel):
    """Serve autoscaling for the replicas (replaces a fixed num_replicas)."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump()


class IndexUpdate(BaseModel):
    """The replica's `user_config`: applied by `reconfigure` without restarting the replica.

    A field left out keeps its current value; `index: null` drops the index (prompt lookup only). Change
    `index_version` to reload an index rebuilt in place under the same path. DrafterConfig's fields (mode, lam,
    max_draft, ...) may be given at the top level; they are checked against DrafterConfig when applied.
    """

    model_config = ConfigDict(extra="forbid")
    index: str | None = None
    index_version: str | int | None = None
    drafter: dict[str, Any] = Field(default_factory=dict, description="DrafterConfig fields to change")
    max_batch_size: int | None = Field(None, ge=1)
    batch_wait_timeout_s: float | None = Field(None, ge=0.0)

    @model_validator(mode="before")
    @classmethod
    def _nest_drafter_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        drafter = dict(data.pop("drafter", None) or {})
        for key in DrafterConfig.model_fields:
            if key in data:
                drafter[key] = data.pop(key)
        if drafter:
            data["drafter"] = drafter
        return data


class ServeConfig(BaseModel):
    """Everything a TASC Serve application needs; EngineConfig's fields may also be given at the top level.

    `serve run serve_apps.openai_app:build_app model=smollm2-135m index=/path` passes flat strings; they are
    moved into `engine` here and validated by pydantic.
    """

    model_config = ConfigDict(extra="forbid")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    model_name: str | None = Field(None, description="model id served on /v1/models (default: the model's name)")
    max_batch_size: int = Field(16, ge=1, description="@serve.batch size = rows of one batched decode")
    batch_wait_timeout_s: float = Field(0.02, ge=0.0)
    default_max_tokens: int = Field(128, ge=1)
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    num_replicas: int | None = Field(1, ge=1)
    autoscaling: AutoscalingSettings | None = None
    num_cpus: float = Field(0.5, gt=0, description="CPUs per replica (fractional is fine)")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per replica; default 1 when engine.device is cuda")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica")
    max_ongoing_requests: int = Field(64, ge=1)
    api_key: str | None = Field(None, description="if set, /v1/* require 'Authorization: Bearer <key>'")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (e.g. a secret)")
    user_config: IndexUpdate | None = None

    @model_validator(mode="before")
    @classmethod
    def _lift_engine_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        engine = dict(data.pop("engine", None) or {})
        for key in list(data):
            if key in ENGINE_FIELDS:
                engine[key] = data.pop(key)
        for key, value in list(engine.items()):
            if isinstance(value, str) and value.lower() in ("none", "null", ""):
                engine[key] = None if key in ("index", "device") else value
        data["engine"] = engine
        for key in ("num_replicas", "num_gpus", "num_threads", "api_key", "api_key_env", "model_name"):
            if isinstance(data.get(key), str) and data[key].lower() in ("none", "null", ""):
                data[key] = None
        return data

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.autoscaling is not None:
            self.num_replicas = None
        return self

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.engine.model.rstrip("/")).name

    @property
    def gpus(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if (self.engine.device or "").startswith("cuda") else 0.0

    def deployment_options(self) -> dict[str, Any]:
        """The `.options(...)` of the deployment: replicas or autoscaling, resources, queue bound, user_config."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.gpus:
            actor["num_gpus"] = self.gpus
        options: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": self.max_ongoing_requests}
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.to_serve()
        else:
            options["num_replicas"] = self.num_replicas or 1
        if self.user_config is not None:
            options["user_config"] = self.user_config.model_dump(exclude_unset=True)
        return options

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


# ----------------------------------------------------------------------------------------------------------------
# Request models and errors
# ----------------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error reported to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: StrictBool = False


class _RequestBase(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=1, description="one choice per prompt")
    speculative: StrictBool = True

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
        return [s for s in stops if s]


class CompletionRequest(_RequestBase):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_RequestBase):
    messages: list[ChatMessage] = Field(min_length=1)


def parse_request(raw: bytes, model_cls: type[BaseModel]) -> Any:
    """Parse and validate a JSON body, turning every failure into a 400 APIError naming the parameter."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ())]
        param = loc[0] if loc else None  # later entries may name union branches ('str', 'list[int]')
        if err.get("type") == "missing":
            message = f"'{param}' is required" if len(loc) == 1 else f"'{'.'.join(loc)}' is required"
            code = "missing_required_parameter"
        else:
            message = f"invalid value for '{param}': {err.get('msg')}"
            code = "invalid_type" if "type" in str(err.get("type")) else "invalid_value"
        raise APIError(400, message, param=param, code=code) from exc


# ----------------------------------------------------------------------------------------------------------------
# The deployment's logic (wrapped by serve_apps.openai_app into a @serve.deployment with a FastAPI ingress)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Work:
    """One prompt of one request, as it waits in the batch queue."""

    prompt_ids: list[int]
    params: Any  # SamplingParams
    on_tokens: Callable[[list[int]], None] | None = None


def group_key(params: Any) -> tuple:
    """Requests with equal keys share one batched generate call.

    Greedy rows need only equal limits, stop strings and speculative flag. A seeded sampled request decodes
    alone, so that its output does not depend on what else was in the batch; unseeded sampled requests with
    equal parameters share a decode.
    """
    base = (params.max_new_tokens, tuple(params.stop), params.speculative)
    if params.greedy:
        return ("greedy", *base)
    if params.seed is not None:
        return ("seeded", object())  # unique
    return ("sample", *base, params.temperature, params.top_p, params.top_k)


class EngineServer:
    """The replica's state: the engine, its decode thread, the request-side tokenizer and the metrics."""

    def __init__(self, config: ServeConfig) -> None:
        import torch

        from tasc_ray.models import load_tokenizer
        from tasc_ray.spec.engine import load_engine

        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        engine_config = config.engine.model_copy(update={"max_batch_size": config.max_batch_size})
        t0 = time.perf_counter()
        self.generator = load_engine(engine_config)
        # A second tokenizer for the event loop thread: a Rust tokenizer must not be used by two threads at once.
        self.tokenizer = load_tokenizer(config.engine.model)
        self.model_name = config.served_model_name
        self.api_key = config.resolved_api_key()
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tasc-decode")
        self.index_path = config.engine.index
        self.index_version: Any = None
        self.drafter_config = engine_config.drafter
        self.created = int(time.time())
        self.replica_id = uuid.uuid4().hex[:12]
        self.batches = 0
        self.batched_rows = 0
        self._init_metrics()
        logger.info(
            "replica %s: model %s (index %s) loaded in %.1f s",
            self.replica_id,
            config.engine.model,
            self.index_path,
            time.perf_counter() - t0,
        )

    # ----- metrics -----
    def _init_metrics(self) -> None:
        from ray.serve import metrics

        self.m_requests = metrics.Counter("tasc_requests", "requests received", tag_keys=("route", "status"))
        self.m_errors = metrics.Counter(
            "tasc_request_errors", "requests answered with an error", tag_keys=("route", "code")
        )
        self.m_prompt_tokens = metrics.Counter("tasc_prompt_tokens", "prompt tokens processed")
        self.m_tokens = metrics.Counter("tasc_generated_tokens", "tokens generated")
        self.m_drafted = metrics.Counter("tasc_drafted_tokens", "draft tokens proposed")
        self.m_accepted = metrics.Counter("tasc_accepted_tokens", "draft tokens accepted")
        self.m_passes = metrics.Counter("tasc_forward_passes", "decode forward passes (per row)")
        self.m_latency = metrics.Histogram(
            "tasc_request_latency_s",
            "request latency (s)",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64],
            tag_keys=("route",),
        )
        self.m_batch = metrics.Histogram(
            "tasc_batch_rows", "rows per batched decode", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )

    def record_request(self, route: str, status: int, latency_s: float, code: str | None = None) -> None:
        self.m_requests.inc(1, tags={"route": route, "status": str(status)})
        if status >= 400:
            self.m_errors.inc(1, tags={"route": route, "code": code or str(status)})
        self.m_latency.observe(latency_s, tags={"route": route})

    def record_results(self, results: list[Any]) -> None:
        totals = usage(results)
        for counter, key in (
            (self.m_prompt_tokens, "prompt_tokens"),
            (self.m_tokens, "completion_tokens"),
            (self.m_drafted, "drafted_tokens"),
            (self.m_accepted, "accepted_tokens"),
            (self.m_passes, "forward_passes"),
        ):
            if totals[key] > 0:  # a Counter refuses inc(0)
                counter.inc(totals[key])

    # ----- auth, validation -----
    def check_auth(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(
                401,
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                type="authentication_error",
                code="invalid_api_key",
            )

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def encode(self, prompt: Any, param: str) -> list[int]:
        """Token ids of a text prompt, a token list, or chat messages (through the chat template)."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            ids = tok(prompt, add_special_tokens=True)["input_ids"]
        elif prompt and isinstance(prompt[0], dict):
            if not getattr(tok, "chat_template", None):
                raise APIError(400, "this model has no chat template; use /v1/completions", param=param)
            out = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        else:
            vocab = len(tok)
            ids = [int(t) for t in prompt]
            if any(t < 0 or t >= vocab for t in ids):
                raise APIError(400, f"token ids must lie in [0, {vocab})", param=param, code="invalid_value")
        if not ids:
            raise APIError(400, "the prompt is empty", param=param, code="invalid_value")
        if len(ids) >= self.generator.max_context:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context holds {self.generator.max_context}",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def sampling_params(self, req: _RequestBase) -> Any:
        from tasc_ray.spec.generator import SamplingParams

        max_tokens = self.config.default_max_tokens if req.max_tokens is None else req.max_tokens
        if max_tokens <= 0:
            raise APIError(
                400, f"max_tokens must be positive, got {max_tokens}", param="max_tokens", code="invalid_value"
            )
        if max_tokens > self.config.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens {max_tokens} exceeds this server's limit {self.config.max_tokens_limit}",
                param="max_tokens",
                code="invalid_value",
            )
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=req.stop_list(),
            speculative=req.speculative,
        )

    # ----- decoding (on the decode thread) -----
    def run_batch(self, works: list[Work]) -> list[Any]:
        """Decode a batch: one generate call per group of compatible parameters; a failure stays in its rows."""
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(works):
            groups.setdefault(group_key(w.params), []).append(i)
        results: list[Any] = [None] * len(works)
        self.batches += 1
        self.batched_rows += len(works)
        with self.lock:
            for members in groups.values():
                self.m_batch.observe(len(members))
                try:
                    out = self._generate([works[i] for i in members])
                except Exception as exc:  # isolate the failing row(s) by decoding one at a time
                    logger.warning("batched decode of %d rows failed (%s); retrying them one by one", len(members), exc)
                    out = []
                    for i in members:
                        try:
                            out.append(self._generate([works[i]])[0])
                        except Exception as row_exc:
                            out.append(row_exc)
                for i, r in zip(members, out):
                    results[i] = r
        self.record_results([r for r in results if not isinstance(r, Exception)])
        return results

    def _generate(self, works: list[Work]) -> list[Any]:
        params = works[0].params
        callbacks = [w.on_tokens for w in works]
        stream = None
        if any(cb is not None for cb in callbacks):

            def stream(i: int, ids: list[int]) -> None:
                if callbacks[i] is not None:
                    callbacks[i](ids)

        return self.generator.generate([w.prompt_ids for w in works], params, stream=stream)

    # ----- index reloads -----
    def apply_user_config(self, raw: dict[str, Any] | None) -> dict[str, Any]:
        """Apply an IndexUpdate: swap the drafter (new index or knobs) between batches, without a restart."""
        from tasc_ray.spec.drafter import build_drafter
        from tasc_ray.spec.index import NgramIndex

        update = IndexUpdate.model_validate(raw or {})
        given = update.model_fields_set
        settings = DrafterConfig.model_validate({**self.drafter_config.model_dump(), **update.drafter})
        path = update.index if "index" in given else self.index_path
        reload_index = path != self.index_path or (
            "index_version" in given and update.index_version != self.index_version
        )
        changed = reload_index or settings != self.drafter_config
        if changed:
            index = self.generator.drafter.index if self.generator.drafter is not None else None
            if reload_index:
                t0 = time.perf_counter()
                index = NgramIndex.load(path) if path else None
                if index is not None:
                    index.check_tokenizer(self.generator.tokenizer)
                logger.info("replica %s: loaded index %s in %.2f s", self.replica_id, path, time.perf_counter() - t0)
            drafter = build_drafter(index, settings)
            with self.lock:  # between batches: a running decode keeps its drafter until it ends
                self.generator.drafter = drafter
            self.index_path, self.drafter_config = path, settings
        if "index_version" in given:
            self.index_version = update.index_version
        return {"index": self.index_path, "index_version": self.index_version, "changed": changed}

    def info(self) -> dict[str, Any]:
        drafter = self.generator.drafter
        index = drafter.index if drafter is not None else None
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


# ----------------------------------------------------------------------------------------------------------------
# Response rendering
# ----------------------------------------------------------------------------------------------------------------
def usage(results: list[Any]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.new_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "drafted_tokens": sum(r.stats.drafted for r in results),
        "accepted_tokens": sum(r.stats.accepted for r in results),
        "forward_passes": sum(r.stats.forward_passes for r in results),
    }


def completion_body(request_id: str, model: str, results: list[Any]) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ],
        "usage": usage(results),
    }


def chat_body(request_id: str, model: str, results: list[Any]) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ],
        "usage": usage(results),
    }


class TextStream:
    """Incremental detokenization for one choice: emits only text that no later token or stop string can change."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence may still change
        for stop in self.stops:
            hit = text.find(stop)
            if hit >= 0:
                safe = min(safe, hit)
                continue
            for k in range(min(len(stop) - 1, len(text)), 0, -1):  # a suffix that may begin a stop string
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        return self._take(text, safe)

    def finish(self, final_text: str) -> str:
        return self._take(final_text, len(final_text))

    def _take(self, text: str, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = text[self.sent : upto]
        self.sent = upto
        return piece


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream_events(
    server: EngineServer,
    request_id: str,
    chat: bool,
    prompts: list[list[int]],
    params: Any,
    submit: Callable[[Work], Any],
    include_usage: bool,
) -> AsyncIterator[str]:
    """Start every prompt's decode and yield OpenAI stream chunks as tokens arrive, then `data: [DONE]`."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    streams = [TextStream(server.tokenizer, params.stop) for _ in prompts]
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())

    def chunk(i: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": request_id, "object": obj, "created": created, "model": server.model_name, "choices": [choice]}

    def make_callback(i: int) -> Callable[[list[int]], None]:
        return lambda ids: loop.call_soon_threadsafe(queue.put_nowait, ("tokens", i, list(ids)))

    async def run(i: int, ids: list[int]) -> None:
        try:
            result = await submit(Work(ids, params, make_callback(i)))
        except Exception as exc:  # reported in the stream
            result = exc
        queue.put_nowait(("done", i, result))

    tasks = [asyncio.ensure_future(run(i, ids)) for i, ids in enumerate(prompts)]
    if chat:
        for i in range(len(prompts)):
            yield sse(chunk(i, "", None, role=True))
    pending, results = len(prompts), []
    try:
        while pending:
            kind, i, payload = await queue.get()
            if kind == "tokens":
                piece = streams[i].push(payload)
                if piece:
                    yield sse(chunk(i, piece, None))
                continue
            pending -= 1
            if isinstance(payload, Exception):
                err = payload if isinstance(payload, APIError) else APIError(500, str(payload), type="server_error")
                yield sse(err.body())
                continue
            results.append(payload)
            piece = streams[i].finish(payload.text)
            yield sse(chunk(i, piece or ("" if not chat else None), payload.finish_reason))
        if include_usage and results:
            yield sse(
                {
                    "id": request_id,
                    "object": obj,
                    "created": created,
                    "model": server.model_name,
                    "choices": [],
                    "usage": usage(results),
                }
            )
        yield sse("[DONE]")
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
