"""The Serve application: the OpenAI ingress (FastAPI), its engine deployment, `build_app` and its YAML config.

    serve run tasc_ray.serving.app:build_app model=smollm2-135m index=/path/to/index
    serve deploy serve_apps/config.yaml          # the same application, from its YAML config

Two deployments: `OpenAIIngress` (HTTP, light: auth, body size, JSON and types, model name, limits, prompt
tokenization, rendering) and `TascEngine` (engine_deployment.py: the model, the index and the engine loop;
replicas and autoscaling as configured). A request is checked here before its rows reach the engine, so a bad
request gets an OpenAI-style 4xx body and never touches other requests' rows. A client that goes away (a closed
stream, a timed-out call) cancels its handle calls and so its rows. An engine replica that dies mid-request gives
its clients a 503 with an OpenAI error body (streams: an error event, then `data: [DONE]`); `/health` is
answered here, never by a process busy decoding. `GET /v1/tasc/overlay` (same API key as /v1/*) returns one engine
replica's live overlay, the outputs it learned from (`tasc-ray overlay export`).
`python -m tasc_ray.serving.app --write-config` (or `python -m serve_apps.openai_app --write-config`)
regenerates serve_apps/config.yaml from `default_config()`; a test keeps them in sync.
"""

# No `from __future__ import annotations` here: Serve reads build_app's parameter annotation as a class to
# validate the `key=value` arguments into ServeConfig.

import argparse
import asyncio
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from tasc_ray.engine.generator import GenerationResult
from tasc_ray.engine.prompts import PromptError, encode_prompt
from tasc_ray.engine.request import TokenCallback
from tasc_ray.engine.sampling import SamplingParams
from tasc_ray.models import load_tokenizer, model_context_length
from tasc_ray.serving.config import APP_NAME, ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, OVERLAY_ROUTE, ServeConfig
from tasc_ray.serving.engine_deployment import TascEngine
from tasc_ray.serving.metrics import ServeMetrics
from tasc_ray.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    ChunkRenderer,
    CompletionRequest,
    TextPrompt,
    chat_body,
    check_api_key,
    completion_body,
    parse_request,
    read_body,
)
from tasc_ray.serving.streaming import stream_events

logger = logging.getLogger(__name__)

CONFIG_PATH = Path(__file__).resolve().parents[2] / "serve_apps" / "config.yaml"  # in the repository checkout
IMPORT_PATH = "tasc_ray.serving.app:build_app"
# An engine replica that died, is restarting, or cannot take more requests: the client may retry.
UNAVAILABLE = (
    RayActorError,
    ActorUnavailableError,
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
HEALTH_TIMEOUT_S = 5.0
# Retry-After (seconds) of a 503 engine_unavailable: about the time Serve takes to notice a dead replica and route
# to another one (or to start its replacement, which takes longer: a client retries until it succeeds)
RETRY_AFTER_S = 2

api = FastAPI(title="tasc_ray OpenAI-compatible endpoint")


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def engine_error(exc: BaseException) -> APIError:
    """The OpenAI error for a failed engine call: 503 when the engine replica is gone or busy, else 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UNAVAILABLE):
        return APIError(
            503,
            f"the engine replica is unavailable ({type(exc).__name__}); retry the request",
            type="server_error",
            code="engine_unavailable",
            retry_after_s=RETRY_AFTER_S,
        )
    return APIError(500, f"generation failed: {exc}", type="server_error", code="server_error")


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class OpenAIIngress:
    """HTTP in front of the engine: auth, validation, tokenization, metrics and rendering per request."""

    def __init__(self, config: dict, engine: DeploymentHandle) -> None:
        logging.basicConfig(level=logging.INFO)
        self.config = ServeConfig.model_validate(config)
        self.engine = engine
        self.tokenizer = load_tokenizer(self.config.engine.model)
        self.max_context = model_context_length(self.config.engine.model)
        self.model_name = self.config.served_model_name
        self.metrics = ServeMetrics()
        self.api_key = self.config.resolved_api_key()
        self.created = int(time.time())

    # ----- routes -----
    @api.get("/health")
    async def health(self) -> JSONResponse:
        """This ingress is up; the engine's state from one of its replicas, or 503 when none answers in time."""
        try:
            info = await asyncio.wait_for(self.engine.info.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "model": self.model_name, "error": repr(exc)}, 503)
        return JSONResponse({**info, "status": "ok", "model": self.model_name})

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            check_api_key(self.api_key, request.headers.get("authorization"))
        except APIError as exc:
            self.metrics.request("/v1/models", exc.status, time.perf_counter() - start, exc.code)
            raise
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "tasc_ray"}
        self.metrics.request("/v1/models", 200, time.perf_counter() - start)
        return JSONResponse({"object": "list", "data": [card]})

    @api.get(OVERLAY_ROUTE)
    async def overlay(self, request: Request) -> JSONResponse:
        """One engine replica's live overlay: the outputs it learned from, as token ids and texts (`tasc-ray overlay
        export` writes them out as a corpus). Each call reaches one replica, named in the body as `replica`."""
        start = time.perf_counter()
        try:
            check_api_key(self.api_key, request.headers.get("authorization"))
            body = await self.engine.overlay.remote()
        except Exception as exc:
            error = engine_error(exc)
            if error.status >= 500:
                logger.warning("overlay request failed: %r", exc)
            self.metrics.request(OVERLAY_ROUTE, error.status, time.perf_counter() - start, error.code)
            raise error from exc
        self.metrics.request(OVERLAY_ROUTE, 200, time.perf_counter() - start)
        return JSONResponse(body)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, chat=True)

    async def _handle(self, request: Request, chat: bool) -> Response:
        """Answer a completion request, recording its status and latency; an engine failure is a 503 or 500."""
        route = "/v1/chat/completions" if chat else "/v1/completions"
        start = time.perf_counter()
        try:
            response = await self._complete(request, chat)
        except Exception as exc:
            error = engine_error(exc)
            if error.status >= 500:
                logger.warning("request failed: %r", exc)
            self.metrics.request(route, error.status, time.perf_counter() - start, error.code)
            raise error from exc
        self.metrics.request(route, 200, time.perf_counter() - start)
        return response

    async def _complete(self, request: Request, chat: bool) -> Response:
        check_api_key(self.api_key, request.headers.get("authorization"))
        body = await read_body(request.stream(), self.config.max_request_bytes, request.headers.get("content-length"))
        req = parse_request(body, ChatCompletionRequest if chat else CompletionRequest)
        self._check_model(req.model)
        tokenizer = self.tokenizer
        params = req.sampling_params(self.config.default_max_tokens, self.config.max_tokens_limit, len(tokenizer))
        if isinstance(req, ChatCompletionRequest):
            texts: list[TextPrompt] = []
            prompts = [self._encode_chat(req.chat())]
        else:
            texts = req.prompts()
            prompts = [self._encode(p, "prompt") for p in texts]
        prompts = [ids for ids in prompts for _ in range(req.choices)]  # n choices per prompt, one row each
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if req.stream:
            render = ChunkRenderer(request_id, self.model_name, chat)

            async def submit(row: int, ids: list[int], on_tokens: TokenCallback) -> GenerationResult:
                return await self._stream_row(ids, params, row, request_id, on_tokens)

            events = stream_events(render, tokenizer, prompts, params, submit, req.include_usage, engine_error)
            return StreamingResponse(events, media_type="text/event-stream")
        calls = [self.engine.generate.remote(ids, params, row, request_id) for row, ids in enumerate(prompts)]
        try:
            results = list(await asyncio.gather(*calls))
        except BaseException:
            for call in calls:  # one row failed or the client left: the others need not go on
                call.cancel()
            raise
        if chat:
            return JSONResponse(chat_body(request_id, self.model_name, results, tokenizer))
        echoed = None
        if isinstance(req, CompletionRequest) and req.echo:
            echoed = [p if isinstance(p, str) else tokenizer.decode(p) for p in texts for _ in range(req.choices)]
        return JSONResponse(completion_body(request_id, self.model_name, results, tokenizer, echoed))

    async def _stream_row(
        self, ids: list[int], params: SamplingParams, row: int, request_id: str, on_tokens: TokenCallback
    ) -> GenerationResult:
        """One row through the engine's stream: token ids to `on_tokens` as they come; returns the result."""
        async for item in self.engine.options(stream=True).stream.remote(ids, params, row, request_id):
            if isinstance(item, GenerationResult):
                return item
            on_tokens(item)
        raise RuntimeError("the engine's stream ended without a result")

    # ----- prompts -----
    def _encode(self, prompt: TextPrompt | list[dict[str, str]], param: str) -> list[int]:
        """Token ids of a request's prompt; one the engine would refuse is a 400 naming `param`."""
        try:
            return encode_prompt(self.tokenizer, prompt, self.max_context)
        except PromptError as exc:
            raise APIError(400, str(exc), param=param, code=exc.code) from exc

    def _encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of chat messages through the model's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        return self._encode(messages, "messages")

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )


def build_app(args: ServeConfig) -> serve.Application:
    """Application builder: `serve run tasc_ray.serving.app:build_app model=... index=...`."""
    config = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args or {})
    # user_config goes to options only: changing it must reconfigure the replicas, not restart them.
    init_args = config.model_dump(mode="json", exclude={"user_config"})
    engine = TascEngine.options(**config.deployment_options()).bind(init_args)
    return OpenAIIngress.options(**config.ingress_options()).bind(init_args, engine)


# ----- the committed `serve deploy` config -----
def deploy_config(
    config: ServeConfig,
    http_port: int = 8000,
    http_host: str = "0.0.0.0",
    app_name: str = APP_NAME,
    route_prefix: str = "/",
) -> dict[str, Any]:
    """The `serve deploy` config that runs build_app(config): args, plus the deployment options it sets."""
    # user_config lives in the deployment's options only (changing it reconfigures replicas, never restarts them)
    args = config.model_dump(mode="json", exclude_defaults=True, exclude={"user_config"})
    args["engine"] = config.engine.model_dump(mode="json", exclude_defaults=False)
    deployments = [
        {"name": INGRESS_DEPLOYMENT, **config.ingress_options()},
        {"name": ENGINE_DEPLOYMENT, **config.deployment_options()},
    ]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": http_host, "port": http_port},
        "applications": [
            {
                "name": app_name,
                "route_prefix": route_prefix,
                "import_path": IMPORT_PATH,
                "args": args,
                "deployments": deployments,
            }
        ],
    }


def default_config() -> ServeConfig:
    """The configuration committed in serve_apps/config.yaml."""
    return ServeConfig(model_name="smollm2-135m", num_replicas=1, num_cpus=1.0, api_key_env="TASC_API_KEY")


def render_config(config: ServeConfig | None = None) -> str:
    header = (
        "# Generated by `python -m serve_apps.openai_app --write-config`; tests/serving/test_serve_app.py checks it\n"
        "# against build_app. Deploy with: serve deploy serve_apps/config.yaml\n"
    )
    return header + yaml.safe_dump(deploy_config(config or default_config()), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-config", action="store_true", help=f"write {CONFIG_PATH}")
    args = parser.parse_args(argv)
    text = render_config()
    if args.write_config:
        CONFIG_PATH.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
