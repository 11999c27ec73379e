"""The endpoint as the official `openai` client sees it: every parameter it honours, the ones it refuses, limits,
and clients that leave (a live Serve app on the local Ray, the tiny model, real HTTP)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import httpx
import openai
import pytest

from tasc_ray.serving.app import build_app
from tasc_ray.serving.config import ServeConfig

MODEL = "tiny"


@pytest.fixture(scope="module")
def base(ray_cluster, tiny_model_dir):
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig.model_validate(
        {
            "model": str(tiny_model_dir),
            "model_name": MODEL,
            "num_cpus": 0.25,
            "max_tokens_limit": 1000,
            "max_request_bytes": 20_000,
        }
    )
    serve.run(build_app(config), name="conformance", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


CHAT = [{"role": "user", "content": "Name a pub near the river."}]


def test_completions_choices_seeds_and_echo(client):
    out = client.completions.create(model=MODEL, prompt="Blue Spice is", max_tokens=8)
    assert out.choices[0].finish_reason in ("stop", "length") and 0 < out.usage.completion_tokens <= 8
    sampled = dict(model=MODEL, prompt="Blue Spice is", max_tokens=8, n=3, temperature=1.0, seed=5)
    first, again = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded
    assert len({c.text for c in first.choices}) > 1  # each choice has its own seed
    plain = client.completions.create(**sampled, extra_body={"speculative": False})
    assert [c.text for c in plain.choices] == [c.text for c in first.choices]  # lossless for sampled rows too
    echoed = client.completions.create(model=MODEL, prompt="Blue Spice is", max_tokens=8, echo=True)
    assert echoed.choices[0].text == "Blue Spice is" + out.choices[0].text


def test_chat_max_completion_tokens_and_stream(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=7)
    assert out.usage.completion_tokens <= 7 and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=7, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_logprobs(client, tiny_tokenizer):
    out = client.completions.create(model=MODEL, prompt="Blue Spice is", max_tokens=6, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == out.usage.completion_tokens
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(top) <= 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)


def test_logit_bias_and_penalties(client, tiny_tokenizer):
    token = tiny_tokenizer("pub", add_special_tokens=False)["input_ids"][0]
    out = client.completions.create(model=MODEL, prompt="Zizzi", max_tokens=5, logit_bias={str(token): 100})
    assert out.choices[0].text == tiny_tokenizer.decode([token] * 5)
    body = dict(model=MODEL, prompt="The Eagle is a pub. The Eagle is a pub.", max_tokens=24)
    penalised = client.completions.create(**body, frequency_penalty=1.5, presence_penalty=0.5)
    plain = client.completions.create(
        **body, frequency_penalty=1.5, presence_penalty=0.5, extra_body={"speculative": False}
    )
    assert penalised.choices[0].text == plain.choices[0].text
    assert penalised.choices[0].text != client.completions.create(**body).choices[0].text


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True, "stream": True}, "logprobs"),
    ],
)
def test_refused_parameters_name_themselves(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, **extra)
    assert info.value.body["param"] == param


def test_limits(client):
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=MODEL, prompt="x " * 15_000, max_tokens=4)
    assert info.value.status_code == 413 and info.value.body["code"] == "request_too_large"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)


def _engine(base: str) -> dict:
    return httpx.get(base + "/health", timeout=30).json()["engine"]


def _wait(base: str, predicate, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    engine = _engine(base)
    while not predicate(engine) and time.time() < deadline:
        time.sleep(0.05)
        engine = _engine(base)
    return engine


def test_clients_that_leave_free_their_rows(base, client):
    before = _engine(base)
    long = dict(model=MODEL, prompt="Zizzi", max_tokens=1000, extra_body={"ignore_eos": True})
    stream = client.completions.create(**long, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    impatient = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(**long)
    after = _wait(base, lambda e: e["cancelled"] - before["cancelled"] >= 2 and e["running"] == 0)
    assert after["cancelled"] - before["cancelled"] == 2 and after["running"] == 0 and after["waiting"] == 0


def test_an_engine_replica_dying_mid_request_gives_openai_errors(base):
    """kill -9 of the engine replica with requests in flight: each non-streaming client gets a 503 with an OpenAI
    error body, a stream gets an error event and `[DONE]`; the ingress's /health says so; Serve restarts the
    engine and requests succeed again. (Last in this module: it restarts the engine.)"""
    pid = httpx.get(base + "/health", timeout=30).json()["pid"]
    body = {"model": MODEL, "prompt": "Zizzi", "max_tokens": 1000, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:

            async def stream() -> list[str]:
                async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    return [line async for line in r.aiter_lines() if line.startswith("data: ")]

            plain = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(3)]
            streamed = asyncio.ensure_future(stream())
            await asyncio.sleep(1.0)
            os.kill(pid, signal.SIGKILL)
            return await asyncio.gather(*plain), await streamed

    responses, lines = asyncio.run(go())
    for r in responses:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_unavailable" and r.json()["error"]["type"] == "server_error"
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "engine_unavailable"
    deadline = time.time() + 120
    while time.time() < deadline:
        health = httpx.get(base + "/health", timeout=30)
        if health.status_code == 200 and health.json()["pid"] != pid:
            break
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        time.sleep(0.5)
    ok = httpx.post(base + "/v1/completions", json={"prompt": "Zizzi", "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200
