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


def _replica_infos(app: str, n: int, timeout: float = 60.0) -> dict[str, dict]:
    """Each engine replica's info (its id, counters, prefix cache), asked through the deployment's handle until
    `n` distinct replicas answered."""
    from ray import serve

    from tasc_ray.serving.config import ENGINE_DEPLOYMENT

    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app)
    seen: dict[str, dict] = {}
    deadline = time.time() + timeout
    while len(seen) < n:
        info = handle.info.remote().result()
        seen[info["replica"]] = info
        assert time.time() < deadline, list(seen)
    return seen


def test_prefix_affinity_sends_each_template_to_one_replica(serve_port, tiny_model_dir, task_rows):
    """Two engine replicas, requests of two few-shot templates interleaved: each template's requests all finish
    on one replica (a different one each), whose prefix cache serves the template."""
    from ray import serve

    app = "affinity"
    cfg = _config(tiny_model_dir, num_replicas=2, request_router="prefix_affinity", prefix_imbalance_threshold=32)
    serve.run(build_app(cfg), name=app, route_prefix="/affinity")
    base = f"http://127.0.0.1:{serve_port}/affinity"
    shots = {
        t: "".join(f"Sentence: {r['text']}\nMR: {r['output']}\n\n" for r in task_rows[10 * t : 10 * t + 3])
        for t in (1, 2)
    }
    try:
        before = _replica_infos(app, 2)

        async def go():
            async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                calls = [
                    client.post(
                        "/v1/completions",
                        json={"prompt": shots[t] + f"Sentence: {task_rows[100 + i]['text']}\nMR:", "max_tokens": 4},
                    )
                    for i in range(6)
                    for t in (1, 2)
                ]
                return await asyncio.gather(*calls)

        # one template at a time: which replica's finished count rises
        landed = {}
        for t in (1, 2):
            responses = asyncio.run(_one_template(base, shots[t], task_rows))
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            after = _replica_infos(app, 2)
            rose = {rid: after[rid]["engine"]["finished"] - before[rid]["engine"]["finished"] for rid in after}
            assert sorted(rose.values()) == [0, 6], rose
            landed[t] = max(rose, key=rose.__getitem__)
            cached = after[landed[t]]["prefix_cache"]["cached_prompt_tokens"]
            assert cached > before[landed[t]]["prefix_cache"]["cached_prompt_tokens"], after[landed[t]]
            before = after
        assert landed[1] != landed[2]
        # interleaved: the templates keep their replicas
        responses = asyncio.run(go())
        assert all(r.status_code == 200 for r in responses)
        after = _replica_infos(app, 2)
        rose = {rid: after[rid]["engine"]["finished"] - before[rid]["engine"]["finished"] for rid in after}
        assert rose == {landed[1]: 6, landed[2]: 6}, rose
    finally:
        serve.delete(app)


async def _one_template(base: str, shots: str, task_rows) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        calls = [
            client.post(
                "/v1/completions",
                json={"prompt": shots + f"Sentence: {task_rows[200 + i]['text']}\nMR:", "max_tokens": 4},
            )
            for i in range(6)
        ]
        return await asyncio.gather(*calls)
