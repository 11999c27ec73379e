"""The OpenAI wire format, without Ray: request models and their validation, errors, response and stream bodies.

`parse_request` turns a JSON body into a `CompletionRequest` or `ChatCompletionRequest`, and every failure into
an `APIError` (a 4xx with OpenAI's `{"error": {message, type, param, code}}` body) naming the parameter.
`completion_body`/`chat_body` render results; `ChunkRenderer`, `TextStream` and `sse` render a stream.
`read_body` (or `check_body_size`) refuses a body over the server's size limit with a 413 before it is parsed.

What a request may carry:

- Honoured: `model`, `prompt`/`messages`, `max_tokens`, `max_completion_tokens`, `temperature`, `top_p`,
  `top_k`, `stop`, `seed`, `stream`, `stream_options`, `n` (up to MAX_CHOICES choices per prompt, each its own
  sampling seed), `logit_bias`, `presence_penalty`, `frequency_penalty` (applied in verification too, so
  speculation stays lossless), `logprobs` (completions: the top-N alternatives; chat: `logprobs` +
  `top_logprobs`; the model's own log-probabilities; not with `stream`), `echo` (completions, without `stream`
  or `logprobs`), TASC's own `speculative`, and `ignore_eos` (as vLLM's: decode to the token budget through
  end-of-sequence tokens).
  `max_completion_tokens` (what current OpenAI clients send for chat) is accepted by both routes and, when both
  are given, takes precedence over `max_tokens` (the older name OpenAI deprecated in its favour).
- Refused with a 400 (`code: "unsupported_parameter"`, `param` naming it) unless the value asks for nothing,
  i.e. is null or the default (empty `tools`/`functions`/`suffix`, `response_format: {"type": "text"}`,
  `modalities: ["text"]`, `tool_choice`/`function_call` "none", `parallel_tool_calls: true`, `best_of` 1):
  every parameter in `UNSUPPORTED` (tools and function calling, structured output, `best_of`, `suffix`, audio,
  `prediction`). The engine cannot honour them, and answering as if it had would change the request's meaning.
- Accepted without effect: metadata that changes nothing in the reply (`IGNORED`: `user`, `metadata`, `store`,
  `service_tier`).
- Anything else is an unknown field: ignored (logged at debug level), never refused, so that a client sending a
  newer harmless field keeps working. A parameter found to change the reply belongs in `UNSUPPORTED`.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from transformers import PreTrainedTokenizerBase

from tasc_ray.engine.generator import GenerationResult, SamplingParams

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 16  # n
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions logprobs
MAX_CHAT_TOP_LOGPROBS = 20  # /v1/chat/completions top_logprobs

Request = TypeVar("Request", bound=BaseModel)
TextPrompt = str | list[int]  # one prompt of /v1/completions: text or token ids


class APIError(Exception):
    """An error reported to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after_s = retry_after_s  # a retryable error: sent as the Retry-After header

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def check_api_key(expected: str | None, authorization: str | None) -> None:
    """Refuse a request whose `Authorization` header lacks `Bearer <expected>` (nothing is expected: any passes)."""
    if expected is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(
            401,
            "missing or invalid API key (send 'Authorization: Bearer <key>')",
            type="authentication_error",
            code="invalid_api_key",
        )


def check_body_size(size: int | str | bytes | None, limit: int) -> None:
    """Refuse a body over `limit` bytes with a 413; `size` is a Content-Length header, the body, or a byte count.

    None (no Content-Length header) passes; a Content-Length that is not a non-negative integer is a 400.
    """
    if size is None:
        return
    if isinstance(size, bytes):
        length = len(size)
    elif isinstance(size, str):
        if not size.strip().isdigit():
            raise APIError(400, f"invalid Content-Length header {size!r}", code="invalid_request")
        length = int(size)
    else:
        length = size
    if length > limit:
        raise APIError(
            413,
            f"request body of {length} bytes exceeds this server's limit of {limit} bytes",
            code="request_too_large",
        )


async def read_body(chunks: AsyncIterable[bytes], limit: int, content_length: str | None = None) -> bytes:
    """Read a request body of at most `limit` bytes, refusing a larger one with a 413 before it is all read.

    `content_length` (the header, if any) is checked first; the bytes are counted as they arrive too, since a
    chunked body has no Content-Length. In the app: `read_body(request.stream(), limit, headers.get(...))`.
    """
    check_body_size(content_length, limit)
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        check_body_size(total, limit)
        parts.append(chunk)
    return b"".join(parts)


# ----- requests -----
def _defaults(*values: Any) -> Callable[[Any], bool]:
    """A check accepting null and exactly `values`, type included (false is not 0, 0 is not false)."""
    return lambda value: value is None or any(type(value) is type(d) and value == d for d in values)


_NO_TOOLS = "tool and function calling are not supported"
# name -> (accepts the value: it asks for nothing, or is left to validation; why another value is refused)
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_defaults([]), _NO_TOOLS),
    "tool_choice": (_defaults("none"), _NO_TOOLS),
    "functions": (_defaults([]), _NO_TOOLS),
    "function_call": (_defaults("none"), _NO_TOOLS),
    "parallel_tool_calls": (_defaults(True), _NO_TOOLS),
    "response_format": (_defaults({"type": "text"}), "only text output is supported (response_format type 'text')"),
    "best_of": (_defaults(1), "only best_of 1 is supported (n choices are returned as sampled)"),
    "suffix": (_defaults(""), "a suffix (insertion) is not supported"),
    "audio": (_defaults(), "audio output is not supported"),
    "modalities": (_defaults(["text"]), "only text output is supported (modalities ['text'])"),
    "prediction": (_defaults(), "predicted outputs are not supported"),
}
# Accepted and without effect on the reply.
IGNORED = frozenset({"user", "metadata", "store", "service_tier"})


def refuse_unsupported(data: dict[str, Any]) -> None:
    """Refuse the first parameter of `UNSUPPORTED` whose value asks for something the engine cannot do."""
    for name, (accepts, reason) in UNSUPPORTED.items():
        if name in data and not accepts(data[name]):
            raise APIError(
                400, f"'{name}' is not supported by this server: {reason}", param=name, code="unsupported_parameter"
            )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: StrictBool = False


class RequestBase(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share (plus `speculative`, TASC's own)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = Field(None, description="takes precedence over max_tokens")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt")
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0, strict=False)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0, strict=False)
    speculative: StrictBool = True
    ignore_eos: StrictBool = False

    @property
    def choices(self) -> int:
        return self.n or 1

    def logprobs_count(self) -> int | None:
        """How many top alternatives to report with each token's log-probability (None: no log-probabilities)."""
        return None

    def token_bias(self, vocab_size: int) -> dict[int, float]:
        """logit_bias with its keys as token ids, each checked against the vocabulary, values in [-100, 100]."""
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
                raise APIError(
                    400, f"logit_bias key {key!r} is not a token id in [0, {vocab_size})", param="logit_bias"
                )
            if not -100.0 <= value <= 100.0:
                raise APIError(400, f"logit_bias value {value} for {key} is outside [-100, 100]", param="logit_bias")
            bias[int(key)] = float(value)
        return bias

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop")
        return [s for s in stops if s]

    def sampling_params(
        self, default_max_tokens: int, max_tokens_limit: int, vocab_size: int = 1 << 30
    ) -> SamplingParams:
        """The engine's SamplingParams; the token budget must lie in [1, max_tokens_limit], logit_bias keys in
        [0, vocab_size).

        The budget is `max_completion_tokens` if given, else `max_tokens`, else `default_max_tokens`.
        """
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        requested = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        max_tokens = default_max_tokens if requested is None else requested
        if max_tokens <= 0:
            raise APIError(400, f"{param} must be positive, got {max_tokens}", param=param, code="invalid_value")
        if max_tokens > max_tokens_limit:
            raise APIError(
                400,
                f"{param} {max_tokens} exceeds this server's limit {max_tokens_limit}",
                param=param,
                code="invalid_value",
            )
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop_list(),
            speculative=self.speculative,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs_count(),
            logit_bias=self.token_bias(vocab_size),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
        )


class CompletionRequest(RequestBase):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: StrictBool | None = False

    @field_validator("logprobs", mode="before")
    @classmethod
    def _false_is_none(cls, value: Any) -> Any:
        return None if value is False else value  # some clients send false for "no log-probabilities"

    def logprobs_count(self) -> int | None:
        if self.logprobs is not None and self.stream:
            raise APIError(
                400, "logprobs are not supported with stream", param="logprobs", code="unsupported_parameter"
            )
        if self.echo and (self.stream or self.logprobs is not None):
            raise APIError(
                400, "echo is supported without stream and logprobs only", param="echo", code="unsupported_parameter"
            )
        return self.logprobs

    def prompts(self) -> list[TextPrompt]:
        """The request's prompts: one text, one token list, or a list of either; refuses an empty list."""
        raw = self.prompt
        items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if not items:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        return items


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


class ChatCompletionRequest(RequestBase):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)

    def logprobs_count(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.logprobs and self.stream:
            raise APIError(
                400, "logprobs are not supported with stream", param="logprobs", code="unsupported_parameter"
            )
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: [{"role", "content"}] with text content."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def parse_request(raw: bytes, model_cls: type[Request]) -> Request:
    """Parse and validate a JSON body, turning every failure into a 400 APIError naming the parameter.

    For the completion requests, `UNSUPPORTED` parameters asking for something are refused and unknown fields
    are logged at debug level and ignored (see the module docstring).
    """
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    if issubclass(model_cls, RequestBase):
        refuse_unsupported(data)
        unknown = sorted(set(data) - set(model_cls.model_fields) - set(UNSUPPORTED) - IGNORED)
        if unknown:
            logger.debug("ignoring unknown request fields: %s", unknown)
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


# ----- responses -----
def usage(results: Sequence[GenerationResult]) -> dict[str, int]:
    """OpenAI's usage totals, plus TASC's drafted/accepted tokens and forward passes."""
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


def completion_body(
    request_id: str,
    model: str,
    results: Sequence[GenerationResult],
    tokenizer: PreTrainedTokenizerBase | None = None,
    echoed: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A /v1/completions reply; `echoed[i]` is prepended to choice i's text (echo). Results with logprobs need
    the tokenizer to render their tokens."""
    choices = []
    for i, r in enumerate(results):
        prefix = echoed[i] if echoed is not None else ""
        logprobs = completion_logprobs(r, tokenizer, len(prefix)) if r.logprobs is not None and tokenizer else None
        choices.append({"index": i, "text": prefix + r.text, "logprobs": logprobs, "finish_reason": r.finish_reason})
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(results),
    }


def chat_body(
    request_id: str, model: str, results: Sequence[GenerationResult], tokenizer: PreTrainedTokenizerBase | None = None
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(r, tokenizer) if r.logprobs is not None and tokenizer else None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ],
        "usage": usage(results),
    }


def completion_logprobs(result: GenerationResult, tokenizer: PreTrainedTokenizerBase, offset: int = 0) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs (token text -> log-probability), and
    each token's text_offset in the choice's text."""
    assert result.logprobs is not None
    tokens, offsets = [], []
    for token, _, _ in result.logprobs:
        offsets.append(offset)
        tokens.append(tokenizer.decode([token]))
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in result.logprobs],
        "top_logprobs": [{tokenizer.decode([t]): lp for t, lp in top} for _, _, top in result.logprobs],
        "text_offset": offsets,
    }


def chat_logprobs(result: GenerationResult, tokenizer: PreTrainedTokenizerBase) -> dict:
    """The chat shape: content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    assert result.logprobs is not None

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]} for t, lp, top in result.logprobs]
    return {"content": content, "refusal": None}


# ----- streams -----
def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` (or a literal string such as `[DONE]`)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@dataclass
class ChunkRenderer:
    """The chunks of one streamed request (`text_completion` or `chat.completion.chunk` objects)."""

    request_id: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def role(self, index: int) -> dict[str, Any]:
        """A chat stream's first chunk for a choice: the assistant role, empty content."""
        return self.text(index, "", role=True)

    def text(
        self, index: int, text: str | None, finish_reason: str | None = None, role: bool = False
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._chunk([choice])

    def final(self, index: int, text: str, finish_reason: str) -> dict[str, Any]:
        """A choice's last chunk: the text not sent yet (a chat chunk without any has no content) and why it ended."""
        return self.text(index, text or ("" if not self.chat else None), finish_reason)

    def usage(self, results: Sequence[GenerationResult]) -> dict[str, Any]:
        return {**self._chunk([]), "usage": usage(results)}


class TextStream:
    """Incremental detokenization for one choice: emits only text that no later token or stop string can change."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]) -> None:
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.ids: list[int] = []
        self.sent = 0

    def push(self, ids: Sequence[int]) -> str:
        """Add newly generated ids; return the text that became final."""
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
        """The rest of the engine's final text (already cut at a stop string)."""
        return self._take(final_text, len(final_text))

    def _take(self, text: str, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = text[self.sent : upto]
        self.sent = upto
        return piece
