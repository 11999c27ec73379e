"""The OpenAI-compatible Serve app end to end: serve.run on the local Ray, the tiny model, real HTTP (httpx)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from serve_apps.openai_app import build_app as shell_build_app
from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.serving.app import CONFIG_PATH, build_app, default_config, deploy_config
from tasc_ray.serving.config import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, OVERLAY_ROUTE, ServeConfig

MODEL = "tiny"
KEY = "sk-test-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, task_rows, tiny_tokenizer):
    root = tmp_path_factory.mktemp("serve-index")
    full = NgramIndex.from_texts([r["output"] for r in task_rows], tiny_tokenizer)
    half = NgramIndex.from_texts([r["output"] for r in task_rows[:100]], tiny_tokenizer)
    return {"full": full.save(str(root / "full")), "half": half.save(str(root / "half"))}


def _config(tiny_model_dir, index, **extra) -> ServeConfig:
    return ServeConfig.model_validate(
        {
            "model": str(tiny_model_dir),
            "index": index,
            "model_name": MODEL,
            "max_batch_size": 16,
            "num_cpus": 0.25,
            "ingress_num_cpus": 0.05,
            "max_tokens_limit": 256,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model_dir, indexes):
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(_config(tiny_model_dir, indexes["full"])), name="tasc", route_prefix="/")
    serve.run(build_app(_config(tiny_model_dir, None, api_key=KEY)), name="tasc-auth", route_prefix="/auth")
    base = f"http://127.0.0.1:{port}"
    yield {"base": base, "port": port, "model_dir": tiny_model_dir}
    serve.shutdown()


def _post(server, path, body, **kw):
    return httpx.post(server["base"] + path, json=body, timeout=60, **kw)


def _texts(prompts, speculative, server, max_tokens=24):
    async def go():
        async with httpx.AsyncClient(base_url=server["base"], timeout=120) as client:
            reqs = [
                client.post(
                    "/v1/completions",
                    json={
                        "model": MODEL,
                        "prompt": p,
                        "max_tokens": max_tokens,
                        "temperature": 0,
                        "speculative": speculative,
                    },
                )
                for p in prompts
            ]
            return await asyncio.gather(*reqs)

    return asyncio.run(go())


def test_config_yaml_in_sync_with_builder():
    committed = yaml.safe_load(CONFIG_PATH.read_text())
    assert committed == deploy_config(default_config())
    app = committed["applications"][0]
    parsed = ServeConfig.model_validate(app["args"])  # the YAML args validate into the builder's config
    assert deploy_config(parsed) == committed
    assert [d["name"] for d in app["deployments"]] == [INGRESS_DEPLOYMENT, ENGINE_DEPLOYMENT]
    built = build_app(parsed)  # the builder accepts them and binds the deployment the YAML names
    assert built._bound_deployment.name == INGRESS_DEPLOYMENT
    assert shell_build_app is build_app  # `serve run serve_apps.openai_app:build_app` from the checkout


def test_flat_args_and_resources():
    cfg = ServeConfig.model_validate(
        {
            "model": "m",
            "index": "None",
            "device": "cuda",
            "max_batch_size": "8",
            "autoscaling": {"min_replicas": 1, "max_replicas": 3},
        }
    )
    assert cfg.engine.model == "m" and cfg.engine.index is None and cfg.engine.max_batch_size == 8
    opts = cfg.deployment_options()
    assert opts["ray_actor_options"]["num_gpus"] == 1.0
    assert opts["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in opts
    assert "num_gpus" not in ServeConfig(num_cpus=0.5).deployment_options()["ray_actor_options"]
    with pytest.raises(ValueError):
        ServeConfig.model_validate({"bogus": 1})


def test_models_and_health(server):
    r = httpx.get(server["base"] + "/v1/models", timeout=30)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
    health = httpx.get(server["base"] + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["index"] and health["index_sequences"] == 400


def test_concurrent_requests_batched_and_lossless(server, task_rows):
    prompts = [r["prompt"] for r in task_rows[:32]]
    before = httpx.get(server["base"] + "/health").json()
    t0 = time.perf_counter()
    spec = _texts(prompts, True, server)
    elapsed = time.perf_counter() - t0
    after = httpx.get(server["base"] + "/health").json()
    plain = _texts(prompts, False, server)
    assert all(r.status_code == 200 for r in spec + plain), [r.text for r in spec + plain if r.status_code != 200]
    spec_texts = [r.json()["choices"][0]["text"] for r in spec]
    assert spec_texts == [r.json()["choices"][0]["text"] for r in plain]
    usage = [r.json()["usage"] for r in spec]
    assert all(u["completion_tokens"] > 0 and u["prompt_tokens"] > 0 for u in usage)
    assert sum(u["drafted_tokens"] for u in usage) > 0
    assert all(0 <= u["accepted_tokens"] <= u["drafted_tokens"] for u in usage)
    assert all(r.json()["usage"]["drafted_tokens"] == 0 for r in plain)
    steps = after["engine"]["steps"] - before["engine"]["steps"]
    passes = sum(u["forward_passes"] for u in usage)
    assert after["engine"]["finished"] - before["engine"]["finished"] == 32
    assert steps < passes, (steps, passes, elapsed)  # concurrent requests shared decoding steps


def _wait_idle(server, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    while True:
        engine = httpx.get(server["base"] + "/health", timeout=30).json()["engine"]
        if (engine["running"] == 0 and engine["waiting"] == 0) or time.time() > deadline:
            return engine
        time.sleep(0.05)


def test_a_closed_stream_frees_its_row_and_a_short_request_does_not_wait(server):
    """A client that reads a few chunks of a long stream and leaves: its row is cancelled at the next step. A
    short request sent while long ones decode finishes long before them (continuous batching)."""
    long_body = {"prompt": "Zizzi is a", "max_tokens": 240, "stream": True, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient(base_url=server["base"], timeout=120) as client:
            before = (await client.get("/health")).json()["engine"]
            async with client.stream("POST", "/v1/completions", json=long_body) as r:
                assert r.status_code == 200
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 3:
                        break  # the client leaves mid-stream
            longs = [
                asyncio.ensure_future(client.post("/v1/completions", json={**long_body, "stream": False}))
                for _ in range(3)
            ]
            await asyncio.sleep(0.3)
            t0 = time.perf_counter()
            short = await client.post("/v1/completions", json={"prompt": "Blue Spice", "max_tokens": 2})
            short_s = time.perf_counter() - t0
            long_done = await asyncio.gather(*longs)
            long_s = time.perf_counter() - t0
            return before, short, short_s, long_done, long_s

    before, short, short_s, longs, long_s = asyncio.run(go())
    assert short.status_code == 200 and all(r.status_code == 200 for r in longs)
    assert all(r.json()["usage"]["completion_tokens"] == 240 for r in longs)
    assert short_s < long_s, (short_s, long_s)
    after = _wait_idle(server)
    assert after["cancelled"] - before["cancelled"] == 1, after
    assert after["running"] == 0 and after["waiting"] == 0


def test_multiple_prompts_and_token_prompt(server, task_rows):
    tok_ids = [5, 17, 42, 99, 7]
    r = _post(
        server,
        "/v1/completions",
        {"model": MODEL, "prompt": [task_rows[0]["prompt"], task_rows[1]["prompt"]], "max_tokens": 8},
    )
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    r = _post(server, "/v1/completions", {"prompt": tok_ids, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(tok_ids)


def test_chat_completion(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Blue Spice is a pub."}], "max_tokens": 12}
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["role"] == "assistant"
    assert data["choices"][0]["finish_reason"] in ("stop", "length")
    plain = _post(server, "/v1/chat/completions", {**body, "speculative": False}).json()
    assert plain["choices"][0]["message"]["content"] == data["choices"][0]["message"]["content"]


def _sse(response: httpx.Response) -> tuple[list[dict], str]:
    lines = [ln for ln in response.text.split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]], lines[-1]


def test_streaming_matches_non_streaming(server, task_rows):
    prompt = task_rows[3]["prompt"]
    full = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 32}).json()["choices"][0]["text"]
    r = _post(
        server,
        "/v1/completions",
        {"prompt": prompt, "max_tokens": 32, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks, _ = _sse(r)
    pieces = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(pieces) == full and len(pieces) > 1
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    # a stop string: the streamed text ends before it, exactly as the non-streamed text does
    stop = full[6:8] if len(full) >= 8 else full[-2:]
    ref = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 32, "stop": [stop]}).json()
    r = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 32, "stop": [stop], "stream": True})
    chunks, _ = _sse(r)
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == ref["choices"][0]["text"] and stop not in streamed
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # chat streaming
    r = _post(
        server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True},
    )
    chunks, _ = _sse(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": MODEL, "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": 12}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [7] * 1100}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Blue Spice " * 900}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [100000]}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"prompt": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(server["base"] + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = _post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    ok = _post(server, "/v1/completions", {"prompt": "Zizzi is", "max_tokens": 3})  # still serving
    assert ok.status_code == 200


def test_bad_request_does_not_fail_its_batch(server, task_rows):
    async def go():
        async with httpx.AsyncClient(base_url=server["base"], timeout=60) as client:
            good = [
                client.post("/v1/completions", json={"prompt": r["prompt"], "max_tokens": 6}) for r in task_rows[40:48]
            ]
            bad = [client.post("/v1/completions", json={"prompt": [7] * 1100}) for _ in range(4)]
            return await asyncio.gather(*good, *bad)

    out = asyncio.run(go())
    assert [r.status_code for r in out] == [200] * 8 + [400] * 4


def test_api_key(server):
    base = server["base"] + "/auth"
    body = {"prompt": "Zizzi is", "max_tokens": 3}
    assert httpx.post(base + "/v1/completions", json=body, timeout=30).status_code == 401
    wrong = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(base + "/v1/models", timeout=30).status_code == 401
    ok = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None
    assert httpx.get(base + "/health", timeout=30).status_code == 200  # probes need no key
    # the server without a key configured accepts requests without one
    assert httpx.get(server["base"] + "/v1/models", timeout=30).status_code == 200


def test_overlay_route_and_export(server, indexes, task_rows, tmp_path, capsys):
    """GET /v1/tasc/overlay answers with the replica's live overlay (API key as for /v1/models), and `tasc-ray
    overlay export` writes it as a corpus that `overlay merge` counts into an index."""
    from tasc_ray.cli.main import main

    done = [
        _post(server, "/v1/completions", {"prompt": r["prompt"], "max_tokens": 12}).json() for r in task_rows[70:74]
    ]
    served = [d["choices"][0]["text"] for d in done if d["usage"]["completion_tokens"] >= 2]
    r = httpx.get(server["base"] + OVERLAY_ROUTE, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["live"] and body["replica"] == httpx.get(server["base"] + "/health", timeout=30).json()["replica"]
    assert len(body["outputs"]) == len(body["texts"]) and body["texts"][-len(served) :] == served  # newest last
    assert body["tokenizer"]["vocab_size"] > 0 and body["tokenizer"]["fingerprint"]
    auth = server["base"] + "/auth"
    assert httpx.get(auth + OVERLAY_ROUTE, timeout=30).status_code == 401
    ok = httpx.get(auth + OVERLAY_ROUTE, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["replica"] != body["replica"]

    out = tmp_path / "overlay.parquet"
    export = ["overlay", "export", "--url", server["base"], "--out", str(out), "--json"]
    assert main(export) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["replicas"] == 1 and summary["outputs"] == len(body["outputs"])  # nothing finished meanwhile
    table = pq.read_table(out)
    assert (
        table.column("token_ids").to_pylist() == body["outputs"] and table.column("output").to_pylist() == body["texts"]
    )
    assert set(table.column("replica").to_pylist()) == {body["replica"]}
    assert main([*export[:-1], "--overwrite", "--replicas", "2", "--json"]) == 2  # one replica behind this app
    assert "heard from 1 of 2 replicas in 8 requests" in capsys.readouterr().err
    assert main(["overlay", "export", "--url", auth, "--out", str(tmp_path / "a.parquet")]) == 2
    assert "--api-key" in capsys.readouterr().err and not (tmp_path / "a.parquet").exists()

    # the exported overlay, merged into the half index (built by a tokenizer object without a name: --model)
    merged = tmp_path / "idx-v2"
    merge = ["overlay", "merge", "--corpus", str(out), "--index", indexes["half"], "--out", str(merged)]
    assert main([*merge, "--model", str(server["model_dir"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["corpus_sequences"] == 100 + len(body["outputs"]) == NgramIndex.load(str(merged)).n_sequences


def _deploy(server, cfg: ServeConfig, name: str, prefix: str) -> None:
    """`serve deploy` of the app's generated config (the declarative path, where user_config updates in place)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = deploy_config(cfg, http_port=server["port"], http_host="127.0.0.1", app_name=name, route_prefix=prefix)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.time() + 240  # generous: the CPU here is shared
    time.sleep(1)
    while time.time() < deadline:
        app = serve.status().applications.get(name)
        if app is not None and app.status == "RUNNING":
            return
        assert app is None or app.status not in ("DEPLOY_FAILED", "UNHEALTHY"), app
        time.sleep(0.5)
    raise AssertionError(f"{name} did not reach RUNNING")


def test_deploy_config_and_reconfigure_without_restart(server, tiny_model_dir, indexes, task_rows):
    from ray import serve

    base = server["base"] + "/live"
    _deploy(server, _config(tiny_model_dir, indexes["full"]), "tasc-live", "/live")
    before = httpx.get(base + "/health").json()
    assert before["index"] == indexes["full"] and before["index_sequences"] == 400
    prompt = task_rows[5]["prompt"]
    body = {"prompt": prompt, "max_tokens": 16}
    text_before = httpx.post(base + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    _deploy(
        server,
        _config(tiny_model_dir, indexes["full"], user_config={"index": indexes["half"], "index_version": 2}),
        "tasc-live",
        "/live",
    )
    after = httpx.get(base + "/health").json()
    assert after["replica"] == before["replica"]  # the same replica, reconfigured in place
    assert after["index"] == indexes["half"] and after["index_sequences"] == 100 and after["index_version"] == 2
    text_after = httpx.post(base + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert text_after == text_before  # a different draft never changes greedy output
    # dropping the index: prompt lookup only
    _deploy(server, _config(tiny_model_dir, indexes["full"], user_config={"index": None}), "tasc-live", "/live")
    after = httpx.get(base + "/health").json()
    assert (
        after["replica"] == before["replica"] and after["index"] is None and after["draft_mode"] == "mixed"
    )  # the live overlay is the corpus
    serve.delete("tasc-live")  # its CPUs go back to the cluster (2 CPUs here, shared with later Ray Data jobs)


def test_metrics_exported(server):
    """The replica's Prometheus metrics reach the node's metrics endpoint."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.time() + 40
    text = ""
    while time.time() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        except httpx.HTTPError:
            text = ""
        if "tasc_requests" in text and "tasc_accepted_tokens" in text:
            break
        time.sleep(2)
    assert "tasc_requests" in text and "tasc_generated_tokens" in text and "tasc_request_latency_s" in text


def _logged_rows(directory, expected: int, timeout: float = 60.0) -> list[dict]:
    from tasc_ray.io import read_columns

    deadline = time.time() + timeout
    rows: list[dict] = []
    while time.time() < deadline:
        if any(directory.glob("*.parquet")):
            columns = ["request_id", "prompt", "output", "params", "finish_reason"]
            rows = read_columns(str(directory), columns).to_pylist()
            if len(rows) >= expected:
                break
        time.sleep(0.2)
    return rows


def test_logged_outputs_become_the_next_index(server, tiny_model_dir, indexes, task_rows, tmp_path):
    """serve -> log -> index (appended to the current one) -> reload through user_config, without a restart; the
    last buffered rows are written when the replica shuts down."""
    from ray import serve

    from tasc_ray.io import read_texts
    from tasc_ray.models import load_tokenizer

    logs = tmp_path / "logs"
    logged = {"log_dir": str(logs), "log_max_rows": 4, "log_max_seconds": 0.5}
    _deploy(server, _config(tiny_model_dir, indexes["half"], **logged), "tasc-logged", "/logged")
    base = server["base"] + "/logged"
    before = httpx.get(base + "/health").json()
    texts = []
    for row in task_rows[60:65]:
        r = httpx.post(base + "/v1/completions", json={"prompt": row["prompt"], "max_tokens": 12}, timeout=60)
        texts.append(r.json()["choices"][0]["text"])
    stream = {"prompt": task_rows[65]["prompt"], "max_tokens": 12, "stream": True}
    chunks, _ = _sse(httpx.post(base + "/v1/completions", json=stream, timeout=60))
    texts.append("".join(c["choices"][0]["text"] for c in chunks))
    rows = _logged_rows(logs, 6)
    assert sorted(r["output"] for r in rows) == sorted(texts)
    assert all(json.loads(r["params"])["max_new_tokens"] == 12 and r["request_id"].startswith("cmpl-") for r in rows)
    assert {r["prompt"] for r in rows} >= {task_rows[60]["prompt"]}

    # `tasc-ray index --input logs --column output --append-to half`, built in process: the Ray Data job (equal to
    # it, tests/stages) needs more free CPUs than this 2-CPU cluster has left beside three Serve apps
    out = tmp_path / "index-v2"
    logged_outputs = read_texts(str(logs), "output").texts
    assert len(logged_outputs) == 6
    new = NgramIndex.from_texts(logged_outputs, load_tokenizer(str(tiny_model_dir)))
    NgramIndex.load(indexes["half"]).merge(new).save(str(out))
    reload = {**logged, "user_config": {"index": str(out)}}
    _deploy(server, _config(tiny_model_dir, indexes["half"], **reload), "tasc-logged", "/logged")
    after = httpx.get(base + "/health").json()
    assert after["replica"] == before["replica"] and after["index"] == str(out)
    assert after["index_sequences"] == 100 + 6

    # a row still buffered when the replica stops is written on shutdown
    quiet = tmp_path / "quiet-logs"
    _deploy(
        server,
        _config(tiny_model_dir, None, log_dir=str(quiet), log_max_rows=1000, log_max_seconds=3600),
        "tasc-logged",
        "/logged",
    )
    assert httpx.post(base + "/v1/completions", json={"prompt": "Zizzi is", "max_tokens": 4}, timeout=60).is_success
    serve.delete("tasc-logged")
    assert len(_logged_rows(quiet, 1, timeout=30)) == 1
