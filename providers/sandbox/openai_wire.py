"""The sandbox's OpenAI / DeepSeek wire protocol: chat completions (JSON and SSE), models, errors."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from providers.sandbox.faults import (
    DEFAULT_REPLY_TOKENS,
    Faults,
    RequestLog,
    SandboxState,
    count_prompt_tokens,
    parse_faults,
    reply_tokens,
)
from providers.sandbox.streaming import (
    cut_response,
    hang_until_disconnect,
    retry_after_headers,
    stream_response,
)

REASONING_TOKENS = 6  # chain-of-thought tokens a deepseek-reasoner reply carries before its answer ([[thoughts:N]]: N)
REASONING_MODEL = "deepseek-reasoner"
CLIENT_CLOSED = 499  # logged when the client went away during [[hang]]
DEFAULT_CONTEXT_WINDOW = 128_000
_CONTEXT_WINDOWS = {"gpt-4": 8_192, "gpt-3.5-turbo": 16_385, "gpt-4.1": 1_047_576, "gpt-4.1-mini": 1_047_576}
_MODELS = {
    "openai": ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-4-turbo", "gpt-4", "gpt-3.5-turbo"),
    "deepseek": ("deepseek-chat", "deepseek-reasoner"),
}
_OWNERS = {"openai": "system", "deepseek": "deepseek"}
_MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# status, message, type, code, param; for the `[[fail:CODE]]` markers and their statuses
_FAILURES: dict[str, tuple[int, str, str, str | None, str | None]] = {
    "400": (400, "Invalid value for 'messages' (sandbox [[fail:400]]).", "invalid_request_error", None, "messages"),
    "403": (
        403,
        "Country, region, or territory not supported.",
        "request_forbidden",
        "unsupported_country_region_territory",
        None,
    ),
    "500": (
        500,
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
        None,
    ),
    "502": (502, "Bad gateway.", "server_error", None, None),
    "503": (503, "The engine is currently overloaded, please try again later.", "server_error", None, None),
    "529": (529, "The server is overloaded, please try again later.", "server_error", None, None),
    "policy": (
        400,
        "Your request was rejected as a result of our safety system. "
        "Your prompt may contain text that is not allowed by our safety system.",
        "invalid_request_error",
        "content_policy_violation",
        None,
    ),
}
# DeepSeek's own answer where it differs from OpenAI's: content it refuses is a bare "Content Exists Risk".
_DEEPSEEK_FAILURES: dict[str, tuple[int, str, str, str | None, str | None]] = {
    "policy": (400, "Content Exists Risk", "invalid_request_error", "invalid_request_error", None),
}


def routes(state: SandboxState, provider: str = "openai") -> list[BaseRoute]:
    """Chat completions and models at both `/v1/...` (OpenAI's base URL) and `/...` (DeepSeek's)."""
    wire = _Wire(state, provider)
    return [
        Route("/v1/chat/completions", wire.chat_completions, methods=["POST"]),
        Route("/chat/completions", wire.chat_completions, methods=["POST"]),
        Route("/v1/models", wire.models, methods=["GET"]),
        Route("/models", wire.models, methods=["GET"]),
    ]


def error_response(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An error answer with OpenAI's body: `{"error": {"message", "type", "param", "code"}}`."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _text(content: object) -> str:
    """A message's text: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


class _Wire:
    def __init__(self, state: SandboxState, provider: str) -> None:
        self.state = state
        self.provider = provider

    def _log(self, request: Request, *, model: str, stream: bool, status: int, api_key: str) -> None:
        self.state.log(
            RequestLog(
                provider=self.provider,
                path=request.url.path,
                model=model,
                stream=stream,
                status=status,
                api_key=api_key,
                headers=tuple(request.headers.keys()),
            )
        )

    async def models(self, request: Request) -> Response:
        api_key = _bearer(request)
        if (refused := _auth_error(api_key)) is not None:
            self._log(request, model="", stream=False, status=refused.status_code, api_key=api_key or "")
            return refused
        self._log(request, model="", stream=False, status=200, api_key=api_key or "")
        data = [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": _OWNERS[self.provider]}
            for m in _MODELS.get(self.provider, ())
        ]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def chat_completions(self, request: Request) -> Response:
        api_key = _bearer(request)
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            body = None
        model = str(body.get("model") or "") if isinstance(body, dict) else ""
        stream = bool(body.get("stream")) if isinstance(body, dict) else False
        response = await self._answer(request, body, api_key)
        response.headers.setdefault("x-request-id", f"req_{secrets.token_hex(16)}")
        self._log(request, model=model, stream=stream, status=response.status_code, api_key=api_key or "")
        return response

    async def _answer(self, request: Request, body: Any, api_key: str | None) -> Response:
        if (refused := _auth_error(api_key)) is not None:
            return refused
        if not isinstance(body, dict):
            return error_response(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
                "HTTP library correctly. The OpenAI API expects a JSON payload.)",
                type_="invalid_request_error",
            )
        if (invalid := _validate(body)) is not None:
            return invalid
        messages: list[dict[str, Any]] = body["messages"]
        texts = [_text(m.get("content")) for m in messages]
        users = [t for m, t in zip(messages, texts, strict=True) if m["role"] == "user"]
        last_user = users[-1] if users else ""
        faults = parse_faults(last_user, self.provider)
        model = str(body["model"])
        prompt_tokens = count_prompt_tokens(texts)

        if faults.hang:
            await hang_until_disconnect(request)
            if await request.is_disconnected():
                return Response(status_code=CLIENT_CLOSED)
            return error_response(504, "Gateway timeout.", type_="server_error")
        if self.state.should_fail(faults, self.provider, last_user):
            return self._failure(faults, model, prompt_tokens, api_key or "", stream=bool(body.get("stream")))

        reply = _Reply.build(self.provider, body, last_user, faults, prompt_tokens)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return reply.streaming(self.state, faults, include_usage=include_usage)
        if faults.drop_after is not None:
            return cut_response()
        if faults.error_after is not None:
            return error_response(500, _FAILURES["500"][1], type_="server_error")
        if faults.slow_ms:
            await asyncio.sleep(faults.slow_ms * max(1, len(reply.tokens)) / 1000)
        return reply.json()

    def _failure(self, faults: Faults, model: str, prompt_tokens: int, api_key: str, *, stream: bool) -> Response:
        code = faults.fail or "500"
        if code == "conn":
            return cut_response(media_type="text/event-stream" if stream else "application/json")
        if code == "401":
            return _invalid_key(api_key)
        if code == "404":
            return error_response(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                type_="invalid_request_error",
                code="model_not_found",
            )
        if code == "429":
            headers = retry_after_headers(faults, 429)
            wait = headers.get("retry-after", "1")
            return error_response(
                429,
                f"Rate limit reached for {model} in organization org-sandbox on requests per min (RPM): "
                f"Limit 3, Used 3, Requested 1. Please try again in {wait}s. "
                "Visit https://platform.openai.com/account/rate-limits to learn more.",
                type_="requests",
                code="rate_limit_exceeded",
                headers=headers,
            )
        if code == "context":
            window = _CONTEXT_WINDOWS.get(model, DEFAULT_CONTEXT_WINDOW)
            return error_response(
                400,
                f"This model's maximum context length is {window} tokens. However, your messages resulted in "
                f"{window + prompt_tokens} tokens. Please reduce the length of the messages.",
                type_="invalid_request_error",
                code="context_length_exceeded",
                param="messages",
            )
        if self.provider == "deepseek" and code in _DEEPSEEK_FAILURES:
            status, message, type_, err_code, param = _DEEPSEEK_FAILURES[code]
        elif code in _FAILURES:
            status, message, type_, err_code, param = _FAILURES[code]
        elif code.isdigit():
            status, message, type_, err_code, param = int(code), f"Sandbox error {code}.", "server_error", None, None
            if status < 500:
                type_ = "invalid_request_error"
        else:
            status, message, type_, err_code, param = _FAILURES["400"]
        retry = retry_after_headers(faults, status) if status >= 500 else None
        return error_response(status, message, type_=type_, code=err_code, param=param, headers=retry)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


def _invalid_key(api_key: str) -> Response:
    masked = f"{api_key[:3]}*****{api_key[-4:]}" if len(api_key) > 8 else "*****"
    return error_response(
        401,
        f"Incorrect API key provided: {masked}. You can find your API key at https://platform.openai.com/account/api-keys.",
        type_="invalid_request_error",
        code="invalid_api_key",
    )


def _auth_error(api_key: str | None) -> Response | None:
    if api_key is None:
        return error_response(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using "
            "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) "
            "if you're accessing the API from your browser and are prompted for a username and password. "
            "You can obtain an API key from https://platform.openai.com/account/api-keys.",
            type_="invalid_request_error",
            code="invalid_api_key",
        )
    if api_key.startswith("invalid"):
        return _invalid_key(api_key)
    return None


_MAX_STOP = 4  # OpenAI's documented limit ("Up to 4 sequences")


def _bad_request(message: str, param: str | None = None, code: str | None = None) -> Response:
    return error_response(400, message, type_="invalid_request_error", code=code, param=param)


def _validate(body: dict[str, Any]) -> Response | None:
    """OpenAI's 400 for the request fields the sandbox reads, or None when they are fine."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        return _bad_request("you must provide a model parameter")
    messages = body.get("messages")
    if not isinstance(messages, list):
        return _bad_request("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not messages:
        return _bad_request("Invalid 'messages': empty array. Expected an array with minimum length 1.", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _MESSAGE_ROLES:
            return _bad_request(f"Invalid value for 'messages[{index}].role'.", f"messages[{index}].role")
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return _bad_request(
                f"Invalid '{field}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
                field,
                "integer_below_min_value",
            )
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > _MAX_STOP:
        return _bad_request(
            f"Invalid 'stop': array too long. Expected an array with maximum length {_MAX_STOP}, "
            f"but got an array with length {len(stop)} instead.",
            "stop",
            "array_above_max_length",
        )
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, int | float) or not 0 <= temperature <= 2):
        return _bad_request(
            f"Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got {temperature} "
            "instead.",
            "temperature",
            "decimal_above_max_value",
        )
    return None


class _Reply:
    """One deterministic completion, rendered as a JSON body or as SSE chunks."""

    def __init__(
        self,
        *,
        provider: str,
        model: str,
        tokens: list[str],
        reasoning: list[str],
        finish_reason: str,
        prompt_tokens: int,
    ) -> None:
        self.provider = provider
        self.model = model
        self.tokens = tokens
        self.reasoning = reasoning
        self.finish_reason = finish_reason
        self.prompt_tokens = prompt_tokens
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())

    @classmethod
    def build(cls, provider: str, body: dict[str, Any], prompt: str, faults: Faults, prompt_tokens: int) -> _Reply:
        wanted = faults.tokens if faults.tokens is not None else DEFAULT_REPLY_TOKENS
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        count = min(wanted, limit) if limit else wanted
        tokens = reply_tokens(prompt, count)
        finish_reason = "length" if count < wanted else "stop"
        stops = body.get("stop")
        stops = [stops] if isinstance(stops, str) else [s for s in stops or () if isinstance(s, str) and s]
        for index, token in enumerate(tokens):
            if any(s in token for s in stops):
                tokens, finish_reason = tokens[:index], "stop"
                break
        model = str(body["model"])
        reasoning: list[str] = []
        if model == REASONING_MODEL:
            reasoning = reply_tokens(f"reasoning: {prompt}", faults.thoughts or REASONING_TOKENS)
        return cls(
            provider=provider,
            model=model,
            tokens=tokens,
            reasoning=reasoning,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
        )

    def usage(self) -> dict[str, Any]:
        completion = len(self.tokens) + len(self.reasoning)
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": len(self.reasoning)},
        }
        if self.provider == "deepseek":
            usage["prompt_cache_hit_tokens"] = 0
            usage["prompt_cache_miss_tokens"] = self.prompt_tokens
        else:
            usage["prompt_tokens_details"]["audio_tokens"] = 0
            usage["completion_tokens_details"].update(
                audio_tokens=0, accepted_prediction_tokens=0, rejected_prediction_tokens=0
            )
        return usage

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_sandbox",
        }

    def json(self) -> Response:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.tokens)}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        else:
            message.update(refusal=None, annotations=[])
        body = self._envelope("chat.completion") | {
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}],
            "usage": self.usage(),
        }
        return Response(orjson.dumps(body), media_type="application/json")

    def streaming(self, state: SandboxState, faults: Faults, *, include_usage: bool) -> Response:
        envelope = self._envelope("chat.completion.chunk")
        if include_usage:
            envelope["usage"] = None

        def frame(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return b"data: " + orjson.dumps(envelope | {"choices": [choice]}) + b"\n\n"

        if self.reasoning:
            head = [frame({"role": "assistant", "content": None, "reasoning_content": ""})]
            content = [frame({"content": None, "reasoning_content": t}) for t in self.reasoning]
            content += [frame({"content": t, "reasoning_content": None}) for t in self.tokens]
        else:
            head = [frame({"role": "assistant", "content": "", "refusal": None})]
            content = [frame({"content": t}) for t in self.tokens]
        tail = [frame({}, self.finish_reason)]
        if include_usage:
            tail.append(b"data: " + orjson.dumps(envelope | {"choices": [], "usage": self.usage()}) + b"\n\n")
        tail.append(b"data: [DONE]\n\n")
        error = {
            "error": {
                "message": "The server had an error while processing your request. Sorry about that!",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
        return stream_response(
            state=state,
            faults=faults,
            head=head,
            content=content,
            tail=tail,
            error_frame=lambda: b"data: " + orjson.dumps(error) + b"\n\n",
        )
