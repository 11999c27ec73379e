"""OpenAI-compatible TASC endpoint on Ray Serve.

    serve run serve_apps.openai_app:build_app model=smollm2-135m index=/path/to/index
    serve deploy serve_apps/config.yaml          # the same application, from its YAML config

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health. The arguments are parsed
into `tasc_ray.serving.server.ServeConfig` (which embeds the engine's `EngineConfig`); `python -m serve_apps.openai_app
--write-config` regenerates serve_apps/config.yaml from the builder's defaults (a test keeps them in sync).
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
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from tasc_ray.serving.server import (
    APP_NAME,
    DEPLOYMENT_NAME,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EngineServer,
    ServeConfig,
    Work,
    chat_body,
    completion_body,
    parse_request,
    stream_events,
)

logger = logging.getLogger(__name__)

CONFIG_PATH = Path(__file__).with_name("config.yaml")
IMPORT_PATH = "serve_apps.openai_app:build_app"

api = FastAPI(title="tasc_ray OpenAI-compatible endpoint")


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class TascOpenAI:
    """One replica: the shared engine (model + index loaded once), batched decoding, OpenAI routes."""

    def __init__(self, config: dict) -> None:
        logging.basicConfig(level=logging.INFO)
        self.config = ServeConfig.model_validate(config)
        self.server = EngineServer(self.config)
        self._batched.set_max_batch_size(self.config.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this with the deployment's user_config: reload the index or change drafter knobs."""
        user_config = user_config or {}
        if user_config.get("max_batch_size"):
            self._batched.set_max_batch_size(int(user_config["max_batch_size"]))
        if user_config.get("batch_wait_timeout_s") is not None:
            self._batched.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        logger.info("reconfigure: %s", self.server.apply_user_config(user_config))

    def check_health(self) -> None:
        if self.server.executor._shutdown or self.server.generator is None:
            raise RuntimeError("the decode thread is not running")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _batched(self, works: list[Work]) -> list[Any]:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self.server.executor, self.server.run_batch, works)
        return results  # exceptions are values here, raised by _submit for their own request only

    async def _submit(self, work: Work) -> Any:
        result = await self._batched(work)
        if isinstance(result, Exception):
            raise result
        return result

    # ----- routes -----
    @api.get("/health")
    async def health(self) -> dict:
        return self.server.info()

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        self._auth(request, "/v1/models", start)
        card = {"id": self.server.model_name, "object": "model", "created": self.server.created, "owned_by": "tasc_ray"}
        self.server.record_request("/v1/models", 200, time.perf_counter() - start)
        return JSONResponse({"object": "list", "data": [card]})

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    def _auth(self, request: Request, route: str, start: float) -> None:
        try:
            self.server.check_auth(request.headers.get("authorization"))
        except APIError as exc:
            self.server.record_request(route, exc.status, time.perf_counter() - start, exc.code)
            raise

    async def _handle(self, request: Request, chat: bool):
        route = "/v1/chat/completions" if chat else "/v1/completions"
        start = time.perf_counter()
        server = self.server
        try:
            server.check_auth(request.headers.get("authorization"))
            req = parse_request(await request.body(), ChatCompletionRequest if chat else CompletionRequest)
            server.check_model(req.model)
            params = server.sampling_params(req)
            if chat:
                prompts = [server.encode([{"role": m.role, "content": m.text()} for m in req.messages], "messages")]
            else:
                raw = req.prompt
                items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
                if not items:
                    raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
                prompts = [server.encode(p, "prompt") for p in items]
            request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                events = stream_events(server, request_id, chat, prompts, params, self._submit, include_usage)
                server.record_request(route, 200, time.perf_counter() - start)
                return StreamingResponse(events, media_type="text/event-stream")
            results = await asyncio.gather(*(self._submit(Work(ids, params)) for ids in prompts))
            body = (chat_body if chat else completion_body)(request_id, server.model_name, list(results))
        except APIError as exc:
            server.record_request(route, exc.status, time.perf_counter() - start, exc.code)
            raise
        except Exception as exc:  # an engine failure: a 500 for this request only
            logger.exception("request failed")
            server.record_request(route, 500, time.perf_counter() - start, "server_error")
            raise APIError(500, f"generation failed: {exc}", type="server_error") from exc
        server.record_request(route, 200, time.perf_counter() - start)
        return JSONResponse(body)


def build_app(args: ServeConfig) -> serve.Application:
    """Application builder: `serve run serve_apps.openai_app:build_app model=... index=...`."""
    config = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args or {})
    # user_config goes to options only: changing it must reconfigure the replicas, not restart them.
    init_args = config.model_dump(mode="json", exclude={"user_config"})
    return TascOpenAI.options(**config.deployment_options()).bind(init_args)


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
    return ServeConfig(
        model_name="smollm2-135m", max_batch_size=16, num_replicas=1, num_cpus=1.0, api_key_env="TASC_API_KEY"
    )


def render_config(config: ServeConfig | None = None) -> str:
    header = (
        "# Generated by `python -m serve_apps.openai_app --write-config`; tests/test_serve.py checks it\n"
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
