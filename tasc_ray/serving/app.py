"""The Serve application: the FastAPI ingress, the `@serve.deployment` class, `build_app` and its YAML config.

    serve run tasc_ray.serving.app:build_app model=smollm2-135m index=/path/to/index
    serve deploy serve_apps/config.yaml          # the same application, from its YAML config

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health. A request is checked here
(API key, body size, JSON and types, model name, limits, prompt length) before its rows join the replica's
engine loop, so a bad request gets an OpenAI-style 4xx body and never touches the rows of other requests. A
request whose client goes away (a closed stream, a timed-out call) has its rows cancelled.
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
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from tasc_ray.serving.config import APP_NAME, DEPLOYMENT_NAME, IndexUpdate, ServeConfig
from tasc_ray.serving.metrics import ServeMetrics
from tasc_ray.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    ChunkRenderer,
    CompletionRequest,
    chat_body,
    check_api_key,
    completion_body,
    parse_request,
    read_body,
)
from tasc_ray.serving.replica import Replica
from tasc_ray.serving.streaming import stream_events
from tasc_ray.spec.generator import GenerationResult
from tasc_ray.spec.request import TokenCallback

logger = logging.getLogger(__name__)

CONFIG_PATH = Path(__file__).resolve().parents[2] / "serve_apps" / "config.yaml"  # in the repository checkout
IMPORT_PATH = "tasc_ray.serving.app:build_app"

api = FastAPI(title="tasc_ray OpenAI-compatible endpoint")


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class TascOpenAI:
    """One replica behind HTTP: auth, validation and metrics per request; decoding in the `Replica`."""

    def __init__(self, config: dict) -> None:
        logging.basicConfig(level=logging.INFO)
        self.config = ServeConfig.model_validate(config)
        self.metrics = ServeMetrics()
        self.replica = Replica(self.config, self.metrics)
        self.api_key = self.config.resolved_api_key()
        self.created = int(time.time())

    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this with the deployment's user_config: reload the index, change drafter settings or the
        rows decoding at once."""
        update = IndexUpdate.model_validate(user_config or {})
        if update.max_batch_size:
            self.replica.set_max_rows(update.max_batch_size)
        logger.info("reconfigure: %s", self.replica.apply(update))

    def check_health(self) -> None:
        self.replica.check_health()

    def __del__(self) -> None:
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.loop.stop(timeout=1.0)

    # ----- routes -----
    @api.get("/health")
    async def health(self) -> dict:
        return self.replica.info()

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            check_api_key(self.api_key, request.headers.get("authorization"))
        except APIError as exc:
            self.metrics.request("/v1/models", exc.status, time.perf_counter() - start, exc.code)
            raise
        card = {"id": self.replica.model_name, "object": "model", "created": self.created, "owned_by": "tasc_ray"}
        self.metrics.request("/v1/models", 200, time.perf_counter() - start)
        return JSONResponse({"object": "list", "data": [card]})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, chat=True)

    async def _handle(self, request: Request, chat: bool) -> Response:
        """Answer a completion request, recording its status and latency; an engine failure is a 500."""
        route = "/v1/chat/completions" if chat else "/v1/completions"
        start = time.perf_counter()
        try:
            response = await self._complete(request, chat)
        except APIError as exc:
            self.metrics.request(route, exc.status, time.perf_counter() - start, exc.code)
            raise
        except Exception as exc:  # an engine failure: a 500 for this request only
            logger.exception("request failed")
            self.metrics.request(route, 500, time.perf_counter() - start, "server_error")
            raise APIError(500, f"generation failed: {exc}", type="server_error") from exc
        self.metrics.request(route, 200, time.perf_counter() - start)
        return response

    async def _complete(self, request: Request, chat: bool) -> Response:
        check_api_key(self.api_key, request.headers.get("authorization"))
        body = await read_body(request.stream(), self.config.max_request_bytes, request.headers.get("content-length"))
        req = parse_request(body, ChatCompletionRequest if chat else CompletionRequest)
        self._check_model(req.model)
        params = req.sampling_params(self.config.default_max_tokens, self.config.max_tokens_limit)
        if chat:
            prompts = [self.replica.encode_chat(req.chat())]
        else:
            prompts = [self.replica.encode(p, "prompt") for p in req.prompts()]
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        model = self.replica.model_name
        if req.stream:
            render = ChunkRenderer(request_id, model, chat)

            def submit(row: int, ids: list[int], on_tokens: TokenCallback) -> Awaitable[GenerationResult]:
                return self.replica.generate(ids, params, row, on_tokens)

            events = stream_events(render, self.replica.tokenizer, prompts, params, submit, req.include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        results = await asyncio.gather(*(self.replica.generate(ids, params, row) for row, ids in enumerate(prompts)))
        return JSONResponse((chat_body if chat else completion_body)(request_id, model, list(results)))

    def _check_model(self, model: str | None) -> None:
        served = self.replica.model_name
        if model is not None and model != served:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{served}'",
                param="model",
                code="model_not_found",
            )


def build_app(args: ServeConfig) -> serve.Application:
    """Application builder: `serve run tasc_ray.serving.app:build_app model=... index=...`."""
    config = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args or {})
    # user_config goes to options only: changing it must reconfigure the replicas, not restart them.
    init_args = config.model_dump(mode="json", exclude={"user_config"})
    return TascOpenAI.options(**config.deployment_options()).bind(init_args)


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
    deployment = {"name": DEPLOYMENT_NAME, **config.deployment_options()}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": http_host, "port": http_port},
        "applications": [
            {
                "name": app_name,
                "route_prefix": route_prefix,
                "import_path": IMPORT_PATH,
                "args": args,
                "deployments": [deployment],
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
