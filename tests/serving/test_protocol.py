"""The OpenAI wire format without Ray: parsing and validation, errors, response and stream bodies, TextStream."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from tasc_ray.engine.generator import GenerationResult, RowStats, SamplingParams
from tasc_ray.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    ChunkRenderer,
    CompletionRequest,
    TextStream,
    chat_body,
    check_api_key,
    check_body_size,
    completion_body,
    parse_request,
    read_body,
    sse,
    usage,
)


def _parse_error(body: bytes | dict, cls=CompletionRequest) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(APIError) as info:
        parse_request(raw, cls)
    assert info.value.status == 400 and info.value.message
    return info.value


# ----- parse_request -----
def test_bad_json_and_non_objects():
    for raw in (b"{not json", b"\xff\xfe", b"[1, 2]", b"12"):
        err = _parse_error(raw)
        assert err.code == "invalid_json" and err.param is None


@pytest.mark.parametrize(
    "body,param,code",
    [
        ({"max_tokens": 4}, "prompt", "missing_required_parameter"),
        ({"prompt": 12}, "prompt", None),
        ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens", "invalid_type"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature", "invalid_type"),
        ({"prompt": "hi", "stream": "yes"}, "stream", "invalid_type"),
        ({"prompt": "hi", "temperature": 3.0}, "temperature", "invalid_value"),
        ({"prompt": "hi", "n": 0}, "n", "invalid_value"),
        ({"prompt": "hi", "max_completion_tokens": "7"}, "max_completion_tokens", "invalid_type"),
        ({"prompt": "hi", "stream_options": {"include_usage": "yes"}}, "stream_options", "invalid_type"),
    ],
)
def test_wrong_fields_name_their_parameter(body, param, code):
    err = _parse_error(body)
    assert err.param == param
    if code is not None:
        assert err.code == code
    assert err.body() == {
        "error": {"message": err.message, "type": "invalid_request_error", "param": param, "code": err.code}
    }


@pytest.mark.parametrize(
    "body", [{"prompt": "hi"}, {"messages": []}, {"messages": [{"role": "user"}]}, {"messages": [{"role": "x"}]}]
)
def test_chat_errors_name_messages(body):
    assert _parse_error(body, ChatCompletionRequest).param == "messages"


def test_missing_nested_field_message():
    err = _parse_error({"messages": [{"role": "user"}]}, ChatCompletionRequest)
    assert err.code == "missing_required_parameter" and "'messages.0.content' is required" == err.message


def test_valid_requests_and_prompts():
    req = parse_request(b'{"prompt": "hi", "unknown": 1, "stream": true}', CompletionRequest)
    assert req.prompts() == ["hi"] and req.stream and not req.include_usage
    assert parse_request(b'{"prompt": [1, 2]}', CompletionRequest).prompts() == [[1, 2]]
    assert parse_request(b'{"prompt": [[1], [2, 3]]}', CompletionRequest).prompts() == [[1], [2, 3]]
    assert parse_request(b'{"prompt": ["a", "b"]}', CompletionRequest).prompts() == ["a", "b"]
    with pytest.raises(APIError) as info:
        parse_request(b'{"prompt": []}', CompletionRequest).prompts()
    assert info.value.param == "prompt" and info.value.code == "invalid_value"
    req = parse_request(b'{"prompt": "x", "stream_options": {"include_usage": true}}', CompletionRequest)
    assert req.include_usage


def test_chat_messages_and_content_parts():
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Blue "}, {"type": "text", "text": "Spice"}]},
        ]
    }
    req = parse_request(json.dumps(body).encode(), ChatCompletionRequest)
    assert req.chat() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Blue Spice"}]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    with pytest.raises(APIError) as info:
        parse_request(json.dumps(image).encode(), ChatCompletionRequest).chat()
    assert info.value.param == "messages"


# ----- unsupported, ignored and unknown parameters -----
@pytest.mark.parametrize(
    "param,value",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("tool_choice", "required"),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("parallel_tool_calls", False),
        ("response_format", {"type": "json_object"}),
        ("best_of", 2),
        ("suffix", "end"),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
    ],
)
@pytest.mark.parametrize("cls,base", [(CompletionRequest, {"prompt": "hi"}), (ChatCompletionRequest, None)])
def test_unsupported_parameters_are_refused(param, value, cls, base):
    body = {**(base or {"messages": [{"role": "user", "content": "hi"}]}), param: value}
    err = _parse_error(body, cls)
    assert err.param == param and err.code == "unsupported_parameter" and err.type == "invalid_request_error"
    assert f"'{param}' is not supported" in err.message
    assert err.body()["error"]["param"] == param


DEFAULTS = {
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "none",
    "parallel_tool_calls": True,
    "response_format": {"type": "text"},
    "n": 1,
    "best_of": 1,
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0.0,
    "echo": False,
    "suffix": "",
    "logprobs": False,
    "top_logprobs": 0,
    "modalities": ["text"],
    "user": "u-1",
    "metadata": {"k": "v"},
    "store": False,
    "service_tier": "auto",
    "seed": 4,
    "stream_options": {"include_usage": True},
}


@pytest.mark.parametrize("cls,base", [(CompletionRequest, {"prompt": "hi"}), (ChatCompletionRequest, None)])
def test_defaults_and_metadata_are_accepted(cls, base):
    base = base or {"messages": [{"role": "user", "content": "hi"}]}
    for params in (DEFAULTS, dict.fromkeys([*DEFAULTS, "audio", "prediction"])):  # the defaults, then all null
        req = parse_request(json.dumps({**base, **params}).encode(), cls)
        assert req.sampling_params(128, 1024).max_new_tokens == 128
    assert parse_request(json.dumps({**base, **DEFAULTS}).encode(), cls).include_usage


def test_unknown_fields_are_ignored_and_logged(caplog):
    with caplog.at_level(logging.DEBUG, logger="tasc_ray.serving.protocol"):
        req = parse_request(b'{"prompt": "hi", "zz_new_field": 1, "user": "u"}', CompletionRequest)
    assert req.prompts() == ["hi"]
    assert "zz_new_field" in caplog.text and "'user'" not in caplog.text  # known metadata is not reported


# ----- n, logit_bias, penalties, logprobs, echo -----
def test_choices_bias_and_penalties_reach_the_sampling_params():
    body = {
        "prompt": "hi",
        "n": 3,
        "logit_bias": {"7": 5, "9": -100},
        "presence_penalty": 0.5,
        "frequency_penalty": -1.0,
    }
    req = parse_request(json.dumps(body).encode(), CompletionRequest)
    params = req.sampling_params(16, 64, vocab_size=100)
    assert req.choices == 3 and params.logit_bias == {7: 5.0, 9: -100.0}
    assert params.presence_penalty == 0.5 and params.frequency_penalty == -1.0 and params.logprobs is None
    for bias in ({"100": 1}, {"x": 1}, {"-1": 1}, {"7": 101}):
        with pytest.raises(APIError) as info:
            parse_request(json.dumps({**body, "logit_bias": bias}).encode(), CompletionRequest).sampling_params(
                16, 64, vocab_size=100
            )
        assert info.value.param == "logit_bias"
    for field, value in (("n", 17), ("presence_penalty", 2.5), ("frequency_penalty", -3)):
        assert _parse_error({**body, field: value}, CompletionRequest).param == field


def test_logprobs_and_echo_options():
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    params = lambda body, cls: parse_request(json.dumps(body).encode(), cls).sampling_params(16, 64)  # noqa: E731
    assert params({"prompt": "hi", "logprobs": 2}, CompletionRequest).logprobs == 2
    assert params({"prompt": "hi", "logprobs": 0}, CompletionRequest).logprobs == 0
    assert params({"prompt": "hi", "logprobs": False}, CompletionRequest).logprobs is None
    assert params({**chat, "logprobs": True, "top_logprobs": 3}, ChatCompletionRequest).logprobs == 3
    assert params({**chat, "logprobs": True}, ChatCompletionRequest).logprobs == 0
    assert params(chat, ChatCompletionRequest).logprobs is None
    refused = [
        ({"prompt": "hi", "logprobs": 6}, CompletionRequest, "logprobs"),
        ({"prompt": "hi", "logprobs": 1, "stream": True}, CompletionRequest, "logprobs"),
        ({"prompt": "hi", "echo": True, "stream": True}, CompletionRequest, "echo"),
        ({"prompt": "hi", "echo": True, "logprobs": 1}, CompletionRequest, "echo"),
        ({**chat, "top_logprobs": 2}, ChatCompletionRequest, "top_logprobs"),
        ({**chat, "logprobs": True, "top_logprobs": 21}, ChatCompletionRequest, "top_logprobs"),
        ({**chat, "logprobs": True, "stream": True}, ChatCompletionRequest, "logprobs"),
    ]
    for body, cls, param in refused:
        with pytest.raises(APIError) as info:
            params(body, cls)
        assert info.value.param == param and info.value.status == 400, body


def test_logprobs_and_echo_in_bodies(tiny_tokenizer):
    ids = tiny_tokenizer("Blue Spice", add_special_tokens=False)["input_ids"][:2]
    result = _result("".join(tiny_tokenizer.decode([t]) for t in ids), ids, 3, 0, 0)
    result.logprobs = [(ids[0], -0.5, [(ids[0], -0.5), (ids[1], -2.0)]), (ids[1], -0.25, [(ids[1], -0.25), (5, -3.0)])]
    pieces = [tiny_tokenizer.decode([t]) for t in ids]
    body = completion_body("cmpl-1", "tiny", [result], tiny_tokenizer, echoed=["Say: "])
    choice = body["choices"][0]
    assert choice["text"] == "Say: " + result.text
    assert choice["logprobs"] == {
        "tokens": pieces,
        "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{pieces[0]: -0.5, pieces[1]: -2.0}, {pieces[1]: -0.25, tiny_tokenizer.decode([5]): -3.0}],
        "text_offset": [5, 5 + len(pieces[0])],
    }
    content = chat_body("chatcmpl-1", "tiny", [result], tiny_tokenizer)["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == pieces and content[1]["logprob"] == -0.25
    assert content[0]["bytes"] == list(pieces[0].encode()) and len(content[0]["top_logprobs"]) == 2


# ----- request size -----
def test_check_body_size():
    check_body_size(None, 10)  # no Content-Length header
    for size in (10, "10", b"x" * 10, " 3 "):
        check_body_size(size, 10)
    for size in (11, "11", b"x" * 11):
        with pytest.raises(APIError) as info:
            check_body_size(size, 10)
        assert info.value.status == 413 and info.value.code == "request_too_large"
        assert info.value.type == "invalid_request_error" and "limit of 10 bytes" in info.value.message
    for header in ("ten", "-1", ""):
        with pytest.raises(APIError) as info:
            check_body_size(header, 10)
        assert info.value.status == 400


def test_read_body_stops_at_the_limit():
    read: list[bytes] = []

    async def chunks(*parts: bytes):
        for part in parts:
            read.append(part)
            yield part

    assert asyncio.run(read_body(chunks(b"ab", b"cd", b""), 4)) == b"abcd"
    read.clear()
    with pytest.raises(APIError) as info:  # chunked: no Content-Length, refused once the count passes the limit
        asyncio.run(read_body(chunks(b"ab", b"cde", b"never read"), 4))
    assert info.value.status == 413 and read == [b"ab", b"cde"]
    read.clear()
    with pytest.raises(APIError) as info:  # a Content-Length over the limit: refused before reading anything
        asyncio.run(read_body(chunks(b"ab"), 4, content_length="5"))
    assert info.value.status == 413 and read == []


# ----- sampling parameters -----
def test_sampling_params_from_request():
    body = {"prompt": "x", "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 3, "stop": "\n", "speculative": False}
    params = parse_request(json.dumps(body).encode(), CompletionRequest).sampling_params(128, 1024)
    assert params == SamplingParams(
        max_new_tokens=128, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=["\n"], speculative=False
    )
    req = parse_request(b'{"prompt": "x", "max_tokens": 7, "stop": ["a", ""]}', CompletionRequest)
    assert req.sampling_params(128, 1024).max_new_tokens == 7 and req.sampling_params(128, 1024).stop == ["a"]


@pytest.mark.parametrize("cls,base", [(CompletionRequest, {"prompt": "x"}), (ChatCompletionRequest, None)])
def test_max_completion_tokens(cls, base):
    base = base or {"messages": [{"role": "user", "content": "x"}]}

    def budget(**fields) -> int:
        return parse_request(json.dumps({**base, **fields}).encode(), cls).sampling_params(128, 1024).max_new_tokens

    assert budget(max_completion_tokens=7) == 7
    assert budget(max_completion_tokens=7, max_tokens=50) == 7  # max_completion_tokens takes precedence
    assert budget(max_completion_tokens=50, max_tokens=7) == 50
    assert budget(max_completion_tokens=None, max_tokens=9) == 9
    assert budget() == 128
    for value in (0, 1025):
        req = parse_request(json.dumps({**base, "max_completion_tokens": value, "max_tokens": 5}).encode(), cls)
        with pytest.raises(APIError) as info:
            req.sampling_params(128, 1024)
        assert info.value.param == "max_completion_tokens" and info.value.code == "invalid_value"
        assert info.value.message.startswith("max_completion_tokens ")


@pytest.mark.parametrize("max_tokens", [0, -3, 1025])
def test_max_tokens_out_of_range(max_tokens):
    req = parse_request(json.dumps({"prompt": "x", "max_tokens": max_tokens}).encode(), CompletionRequest)
    with pytest.raises(APIError) as info:
        req.sampling_params(128, 1024)
    assert info.value.status == 400 and info.value.param == "max_tokens" and info.value.code == "invalid_value"


def test_too_many_stop_sequences():
    req = parse_request(json.dumps({"prompt": "x", "stop": list("abcde")}).encode(), CompletionRequest)
    with pytest.raises(APIError) as info:
        req.sampling_params(128, 1024)
    assert info.value.param == "stop"


# ----- auth -----
def test_check_api_key():
    check_api_key(None, None)  # no key configured: anything passes
    check_api_key("sk-1", "Bearer sk-1")
    check_api_key("sk-1", "bearer  sk-1 ")
    for header in (None, "", "Bearer nope", "Basic sk-1", "sk-1"):
        with pytest.raises(APIError) as info:
            check_api_key("sk-1", header)
        assert info.value.status == 401 and info.value.code == "invalid_api_key"
        assert info.value.type == "authentication_error"


# ----- responses -----
def _result(text: str, ids: list[int], prompt_tokens: int, drafted: int, accepted: int, finish: str = "stop"):
    stats = RowStats()
    stats.record(drafted, accepted)
    return GenerationResult(text, ids, prompt_tokens, finish, stats)


def test_bodies_and_usage():
    results = [_result("a b", [5, 6], 3, 4, 1), _result("c", [7], 2, 2, 2, "length")]
    totals = usage(results)
    assert totals == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
        "drafted_tokens": 6,
        "accepted_tokens": 3,
        "forward_passes": 2,
    }
    body = completion_body("cmpl-1", "tiny", results)
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["usage"] == totals
    assert body["choices"][1] == {"index": 1, "text": "c", "logprobs": None, "finish_reason": "length"}
    body = chat_body("chatcmpl-1", "tiny", results[:1])
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-1"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "a b"}


def test_stream_chunks():
    chat = ChunkRenderer("chatcmpl-1", "tiny", chat=True, created=5)
    assert chat.role(0)["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert chat.text(1, "hi")["choices"][0]["delta"] == {"content": "hi"}
    last = chat.final(0, "", "stop")
    assert last["object"] == "chat.completion.chunk" and last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "stop"
    text = ChunkRenderer("cmpl-1", "tiny", chat=False, created=5)
    assert text.final(0, "", "length")["choices"] == [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    ]
    tail = text.usage([_result("a", [5], 1, 0, 0)])
    assert tail == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 5,
        "model": "tiny",
        "choices": [],
        "usage": usage([_result("a", [5], 1, 0, 0)]),
    }
    assert sse("[DONE]") == "data: [DONE]\n\n"
    assert json.loads(sse({"a": 1})[len("data: ") :]) == {"a": 1}


# ----- TextStream -----
def _stream_pieces(tokenizer, text: str, stops: list[str]) -> list[str]:
    stream = TextStream(tokenizer, stops)
    return [stream.push([t]) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def test_text_stream_without_stops_is_the_text(tiny_tokenizer, task_rows):
    text = task_rows[0]["output"]
    assert "".join(_stream_pieces(tiny_tokenizer, text, [])) == text


def test_text_stream_holds_back_a_stop_split_across_tokens(tiny_tokenizer, task_rows):
    text = task_rows[0]["output"]
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    ends = [len(tiny_tokenizer.decode(ids[: j + 1])) for j in range(len(ids))]  # where each token's text ends
    # a two-character stop string made of one token's last character and the next token's first, first seen there
    start = next(e - 1 for e in ends[:-1] if text.find(text[e - 1 : e + 1]) == e - 1 and len(text[e - 1 : e + 1]) == 2)
    stop = text[start : start + 2]
    stream = TextStream(tiny_tokenizer, [stop])
    sent = ""
    for t in ids:
        sent += stream.push([t])
        assert len(sent) <= text.find(stop)  # never a character of the stop string, nor anything after it
    assert sent == text[: text.find(stop)]
    assert stream.finish(text[: text.find(stop)]) == ""  # the engine's final text adds nothing more


def test_text_stream_holds_back_incomplete_utf8(tiny_tokenizer):
    text = "pub 🍺 ok"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tiny_tokenizer, [])
    sent = [stream.push([t]) for t in ids]
    assert "".join(sent) == text
    assert all("\ufffd" not in piece for piece in sent)
    beer = next(i for i, piece in enumerate(sent) if "🍺" in piece)
    assert beer >= 1 and sent[beer - 1] == ""  # the emoji's first bytes were held back until it was complete


def test_text_stream_finish_sends_the_rest(tiny_tokenizer):
    stream = TextStream(tiny_tokenizer, ["zz"])
    ids = tiny_tokenizer("near the z", add_special_tokens=False)["input_ids"]
    sent = stream.push(ids)
    assert sent == "near the "  # a trailing 'z' may begin the stop string
    assert stream.finish("near the z") == "z"
    assert stream.finish("near the z") == ""
