"""The OpenAI-compatible API: `POST /v1/chat/completions`, `GET /v1/models` and `GET /v1/models/{model}`.

Same pipeline, limits and ledger as every other transport; requests and replies in OpenAI's
shapes (errors included, so the official SDK raises its own exception classes) for every
model in the catalog. The messages go upstream as sent; nothing is kept in a conversation.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import orjson
from django.conf import settings
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chat.events import Done, Failed, Started, Token
from chat.http_transport import Exchange, Receive, Scope, Send, disconnect_guard, json_errors, run_to_end
from chat.pipeline import ChatRun, Passthrough, prepare
from chat.schemas import ChatRequest, parse_chat_request, validation_error
from chatservice.errors import ServiceError
from providers.base import ChatMessage
from providers.catalog import CatalogEntry, acatalog_entries, resolve_model
from usage.admission import rate_limit_headers

MAX_STOP_SEQUENCES = 4
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The subset of OpenAI's chat completions request the gateway serves; anything else is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    messages: list[OpenAIMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: Literal[1] | None = None


def openai_error(error: ServiceError) -> dict[str, Any]:
    """OpenAI's error body for a ServiceError."""
    fields = error.details.get("fields") if isinstance(error.details, dict) else None
    param = next(iter(fields)) if isinstance(fields, dict) and fields else None
    kind = _ERROR_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error")
    return {"error": {"message": error.message, "type": kind, "param": param, "code": error.code}}


async def _send_openai_error(exchange: Exchange, error: ServiceError, headers: dict[str, str] | None = None) -> None:
    if error.code == "unknown_model":  # OpenAI answers a model it does not serve with a 404 (NotFoundError)
        error = _model_not_found(str(error.details.get("model", "")))
    await exchange.send_json(error.status, openai_error(error), {**(headers or {}), **error.headers})


# The finish reasons OpenAI's API sends (`function_call` is its deprecated form of tool_calls).
_OPENAI_FINISH_REASONS = frozenset({"stop", "length", "content_filter", "tool_calls", "function_call"})
# Others the providers send, in OpenAI's words: DeepSeek cuts a reply short when it runs out of
# capacity, which reads to a client as a reply that did not end on its own.
_FINISH_REASON_ALIASES = {"insufficient_system_resource": "length"}


def finish_reason(reason: str) -> str:
    """A provider's finish reason as OpenAI names it. Clients parse it into an enum of OpenAI's
    values (the SDKs of typed languages refuse others), so any other reason (Gemini's OTHER,
    LANGUAGE or MALFORMED_FUNCTION_CALL, a reason a provider adds later) ends as "stop"."""
    if reason in _OPENAI_FINISH_REASONS:
        return reason
    return _FINISH_REASON_ALIASES.get(reason, "stop")


def _naming_max_completion_tokens(error: ServiceError) -> ServiceError:
    """The pipeline's refusal of `max_tokens`, for a client that sent `max_completion_tokens`: in its name."""
    fields = error.details.get("fields")
    if not isinstance(fields, dict) or "max_tokens" not in fields:
        return error
    renamed = {"max_completion_tokens" if name == "max_tokens" else name: why for name, why in fields.items()}
    return ServiceError(
        error.code,
        error.message.replace("max_tokens", "max_completion_tokens"),
        status=error.status,
        details={**error.details, "fields": renamed},
        headers=error.headers,
    )


def _model_not_found(requested: str) -> ServiceError:
    return ServiceError(
        "model_not_found",
        f"The model {requested!r} does not exist or you do not have access to it.",
        status=404,
        details={"model": requested},
    )


def _parse(body: bytes) -> tuple[CompletionRequest, ChatRequest, Passthrough]:
    try:
        request = CompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        error = validation_error(exc)
        fields = error.details.get("fields", {})
        unknown = [name for name, why in fields.items() if why == "unknown field"]
        if unknown:
            error.message = f"Unrecognized request argument supplied: {', '.join(unknown)}"
        raise error from None
    messages = tuple(ChatMessage("system" if m.role == "developer" else m.role, m.text()) for m in request.messages)
    if len(messages) > settings.MAX_MESSAGES:
        raise ServiceError(
            "invalid_request",
            f"messages holds at most {settings.MAX_MESSAGES} messages.",
            status=400,
            details={"fields": {"messages": f"at most {settings.MAX_MESSAGES} messages"}},
        )
    users = [m.content for m in messages if m.role == "user"]
    if not users or not any(u.strip() for u in users):
        raise ServiceError(
            "invalid_request",
            "messages must include a non-empty user message.",
            status=400,
            details={"fields": {"messages": "must include a user message"}},
        )
    if request.stream_options is not None and not request.stream:  # OpenAI refuses it too
        raise ServiceError(
            "invalid_request",
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            status=400,
            details={"fields": {"stream_options": "only with stream"}},
        )
    if request.max_tokens is not None and request.max_completion_tokens is not None:  # OpenAI refuses both
        raise ServiceError(
            "invalid_request",
            "Setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported.",
            status=400,
            details={"fields": {"max_tokens": "not with max_completion_tokens"}},
        )
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stop) > MAX_STOP_SEQUENCES:  # OpenAI's limit ("Up to 4 sequences"); Gemini's is 5
        raise ServiceError(
            "invalid_request",
            f"stop holds at most {MAX_STOP_SEQUENCES} sequences.",
            status=400,
            details={"fields": {"stop": f"at most {MAX_STOP_SEQUENCES} sequences"}},
        )
    chat = parse_chat_request(  # refuses (400) a message that sanitizing leaves blank
        {
            "message": users[-1],
            "model": request.model,
            "temperature": request.temperature,
            "max_tokens": request.max_completion_tokens or request.max_tokens,
            "stream": request.stream,
        }
    )
    return request, chat, Passthrough(messages=messages, stop=stop)


def _completion_id(run: ChatRun) -> str:
    return f"chatcmpl-{run.ledger_request_id.hex}"


def _usage(response: dict[str, Any]) -> dict[str, int]:
    return {
        "prompt_tokens": response["input_tokens"],
        "completion_tokens": response["output_tokens"],
        "total_tokens": response["tokens_used"],
    }


class ChatCompletions:
    """ASGI app for `POST /v1/chat/completions` (JSON, or `data:` chunks when `stream` is true)."""

    @json_errors
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(scope, receive, send)
        request: CompletionRequest | None = None
        try:
            principal = await exchange.caller("POST")
            request, chat, passthrough = _parse(await exchange.read_body())
            if request.stream and not settings.ENABLE_STREAMING:
                raise ServiceError(
                    "streaming_disabled",
                    "Streaming is disabled on this service.",
                    status=400,
                    details={"fields": {"stream": "streaming is disabled"}},
                )
            prepared = await prepare(
                principal=principal,
                chat=chat,
                transport="openai",
                request_id=exchange.request_id,
                passthrough=passthrough,
            )
        except ServiceError as error:
            if request is not None and request.max_completion_tokens is not None:
                error = _naming_max_completion_tokens(error)
            await _send_openai_error(exchange, error)
            return
        except asyncio.CancelledError:
            return
        run = ChatRun(prepared)
        headers = rate_limit_headers(prepared.admission.limit)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            await self._stream(exchange, run, headers, request.model, include_usage)
            return
        result = await run_to_end(exchange, run)
        if result is None:
            return
        if isinstance(result, Failed):
            await _send_openai_error(exchange, result.error, headers)
            return
        response = result.response
        body = {
            "id": _completion_id(run),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": response["model_used"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": response["message"]},
                    "finish_reason": finish_reason(run.finish_reason),
                }
            ],
            "usage": _usage(response),
        }
        exchange.request_id = run.ledger_request_id
        await exchange.send_json(200, body, headers)

    async def _stream(
        self, exchange: Exchange, run: ChatRun, headers: dict[str, str], model: str, include_usage: bool
    ) -> None:
        """The run as `data:` chunks. The status waits for the run's first event: a run that fails
        before its first token (every provider refused, a first-token timeout) answers its own
        status with OpenAI's error body, as OpenAI does, so the SDK raises its own class for it
        (RateLimitError, InternalServerError...) and its retries can act; once a token is on its
        way the answer is 200 and a later failure is an error chunk."""
        streaming = refused = False  # the 200 and its chunks went out / the error status did
        created = int(time.time())
        completion_id = _completion_id(run)

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        async with disconnect_guard(exchange, [run]):
            async for event in run.events():
                if exchange.disconnected.is_set():
                    break
                if not streaming:
                    if isinstance(event, Failed):  # before any token: the run's first and last event
                        await _send_openai_error(exchange, event.error, headers)
                        refused = True
                        continue
                    await exchange.start_sse(headers)
                    streaming = True
                if isinstance(event, Started):
                    model = event.model
                    await exchange.send_chunk(chunk({"role": "assistant", "content": ""}))
                elif isinstance(event, Token):
                    await exchange.send_chunk(chunk({"content": event.delta}))
                elif isinstance(event, Done):
                    frames = chunk({}, finish_reason(run.finish_reason))
                    if include_usage:
                        usage_chunk = {
                            "id": completion_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": _usage(event.response),
                        }
                        frames += b"data: " + orjson.dumps(usage_chunk) + b"\n\n"
                    await exchange.send_chunk(frames + b"data: [DONE]\n\n")
                elif isinstance(event, Failed):
                    await exchange.send_chunk(b"data: " + orjson.dumps(openai_error(event.error)) + b"\n\n")
        if not exchange.disconnected.is_set() and not refused:
            if not streaming:  # a run that ended without an event (cancelled): an empty stream
                await exchange.start_sse(headers)
            await exchange.send_chunk(b"", more=False)
        await run.wait_settled()


class ModelList:
    """ASGI app for `GET /v1/models`: the catalog in OpenAI's list shape."""

    @json_errors
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(scope, receive, send)
        try:
            principal = await exchange.caller("GET")
        except ServiceError as error:
            await _send_openai_error(exchange, error)
            return
        entries = await acatalog_entries()
        data = [_model(e) for e in entries if e.enabled and principal.allows_provider(e.provider)]
        await exchange.send_json(200, {"object": "list", "data": data})


class ModelRetrieve:
    """ASGI app for `GET /v1/models/{model}` (the SDK's `models.retrieve`): one model in OpenAI's shape.

    A provider name stands for that provider's default model, as everywhere a model is accepted.
    A model that is not in the catalog, is disabled, or is outside the caller's plan is a 404
    `model_not_found`, as OpenAI answers for a model the key cannot use.
    """

    @json_errors
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(scope, receive, send)
        try:
            principal = await exchange.caller("GET")
            requested = str(scope.get("url_route", {}).get("kwargs", {}).get("model", ""))
            entries = await acatalog_entries()
            try:
                entry = resolve_model(entries, requested)
            except ServiceError:
                entry = None
            if entry is None or not principal.allows_provider(entry.provider):
                raise _model_not_found(requested)
        except ServiceError as error:
            await _send_openai_error(exchange, error)
            return
        await exchange.send_json(200, _model(entry))


def _model(entry: CatalogEntry) -> dict[str, Any]:
    return {"id": entry.name, "object": "model", "created": 0, "owned_by": entry.provider}
