"""The OpenAI wire format, without Ray: request models and their validation, errors, response and stream bodies.

`parse_request` turns a JSON body into a `CompletionRequest` or `ChatCompletionRequest`, and every failure into
an `APIError` (a 4xx with OpenAI's `{"error": {message, type, param, code}}` body) naming the parameter.
`completion_body`/`chat_body` render results; `ChunkRenderer`, `TextStream` and `sse` render a stream.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from transformers import PreTrainedTokenizerBase

from tasc_ray.spec.generator import GenerationResult, SamplingParams

MAX_STOP_SEQUENCES = 4

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
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

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


# ----- requests -----
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: StrictBool = False


class RequestBase(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share (plus `speculative`, TASC's own)."""

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

    def sampling_params(self, default_max_tokens: int, max_tokens_limit: int) -> SamplingParams:
        """The engine's SamplingParams; `max_tokens` must lie in [1, max_tokens_limit]."""
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        if max_tokens <= 0:
            raise APIError(
                400, f"max_tokens must be positive, got {max_tokens}", param="max_tokens", code="invalid_value"
            )
        if max_tokens > max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens {max_tokens} exceeds this server's limit {max_tokens_limit}",
                param="max_tokens",
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
        )


class CompletionRequest(RequestBase):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]

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

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: [{"role", "content"}] with text content."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def parse_request(raw: bytes, model_cls: type[Request]) -> Request:
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


def completion_body(request_id: str, model: str, results: Sequence[GenerationResult]) -> dict[str, Any]:
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


def chat_body(request_id: str, model: str, results: Sequence[GenerationResult]) -> dict[str, Any]:
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
