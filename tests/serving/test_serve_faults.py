"""The Serve app under faults and load: a SIGKILLed engine replica, clients leaving mid-stream.

serve.run on the local Ray, the tiny model, real HTTP (httpx). The replica reports its pid and its engine loop's
counters on /health; the kill is a real `kill -9` of that process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import httpx
import pytest

from tasc_ray.serving.app import build_app
from tasc_ray.serving.config import ServeConfig

MODEL = "tiny"
LONG = {"model": MODEL, "prompt": "Zizzi is a", "max_tokens": 400, "ignore_eos": True, "temperature": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tiny_model_dir, **extra) -> ServeConfig:
    return ServeConfig.model_validate(
        {
            "model": str(tiny_model_dir),
            "index": None,
            "model_name": MODEL,
            "max_batch_size": 16,
            "num_cpus": 0.25,
            "ingress_num_cpus": 0.05,
            "max_tokens_limit": 512,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def serve_port(ray_cluster):
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="module")
def server(serve_port, tiny_model_dir):
    from ray import serve

    serve.run(build_app(_config(tiny_model_dir)), name="faults", route_prefix="/")
    yield f"http://127.0.0.1:{serve_port}"
    serve.delete("faults")


def _health(base: str, timeout: float = 30) -> dict:
    return httpx.get(base + "/health", timeout=timeout).json()


def _wait_engine(base: str, pred, timeout: float = 60.0) -> dict:
    deadline = time.time() + timeout
    while True:
        engine = _health(base)["engine"]
        if pred(engine):
            return engine
        assert time.time() < deadline, engine
        time.sleep(0.05)


def _events(text: str) -> list[str]:
    return [ln[6:] for ln in text.split("\n") if ln.startswith("data: ")]


@pytest.mark.slow
def test_a_killed_replica_gives_each_client_a_retryable_error_then_serves_again(server):
    """kill -9 of the engine replica with non-streaming and streaming requests in flight: each non-streaming
    client gets a 503 with an OpenAI error body and Retry-After; each stream gets an error event, then its end;
    once Serve has replaced the replica, the next request succeeds (from a new process)."""
    before = _health(server)
    pid = before["pid"]

    async def go():
        async with httpx.AsyncClient(base_url=server, timeout=180) as client:
            plain = [asyncio.ensure_future(client.post("/v1/completions", json=LONG)) for _ in range(3)]
            streams: list[tuple[int, str]] = []

            async def stream() -> None:
                async with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
                    body = ""
                    async for chunk in r.aiter_text():
                        body += chunk
                    streams.append((r.status_code, body))

            streamed = [asyncio.ensure_future(stream()) for _ in range(2)]
            # kill once every row is decoding (the counters come from the replica itself)
            deadline = time.time() + 60
            while True:
                engine = (await client.get("/health")).json()["engine"]
                if engine["running"] >= 5:
                    break
                assert time.time() < deadline, engine
                await asyncio.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            responses = await asyncio.gather(*plain)
            await asyncio.gather(*streamed)
            return responses, streams

    responses, streams = asyncio.run(go())
    for r in responses:
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert set(error) >= {"message", "type", "code"} and error["code"] == "engine_unavailable", error
        assert error["type"] == "server_error" and error["message"]
        assert int(r.headers["retry-after"]) >= 1
    for status, body in streams:
        assert status == 200
        events = _events(body)
        errors = [i for i, e in enumerate(events) if e != "[DONE]" and "error" in json.loads(e)]
        assert len(errors) == 1, events[-3:]
        error = json.loads(events[errors[0]])["error"]
        assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
        assert events[errors[0] + 1 :] in ([], ["[DONE]"]), events[errors[0] :]  # the stream ends after it
        assert len(events) > 2  # tokens came before the kill

    # the next request succeeds once Serve has replaced the replica
    deadline = time.time() + 180
    while True:
        r = httpx.post(server + "/v1/completions", json={"prompt": "Zizzi is", "max_tokens": 4}, timeout=60)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
        assert "retry-after" in r.headers
        assert time.time() < deadline, r.text
        time.sleep(int(r.headers["retry-after"]))
    assert r.json()["usage"]["completion_tokens"] > 0
    assert _health(server)["pid"] != pid
