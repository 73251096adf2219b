"""The Claude client (anthropic SDK) against the sandbox's Anthropic wire, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Mapping

import httpx2
import pytest

from providers.anthropic_client import AnthropicProvider
from providers.base import (
    ChatMessage,
    ContentPolicyError,
    ContextLengthExceeded,
    Delta,
    Event,
    Finish,
    ModelNotFound,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderConnectionError,
    ProviderError,
    ProviderRequest,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    Start,
    Usage,
)
from providers.registry import registry
from providers.sandbox.faults import SandboxState, count_prompt_tokens, reply_tokens
from tests.sandbox_server import BackgroundServer

MODEL = "claude-sonnet-4-20250514"


def _request(
    text: str,
    *,
    system: str | None = None,
    max_tokens: int = 100,
    temperature: float | None = None,
    stop: tuple[str, ...] = (),
) -> ProviderRequest:
    messages: tuple[ChatMessage, ...] = (ChatMessage("system", system),) if system else ()
    messages += (ChatMessage("user", text),)
    return ProviderRequest(MODEL, messages, max_tokens, temperature=temperature, stop=stop)


async def _run(provider: AnthropicProvider, request: ProviderRequest) -> tuple[list[Event], ProviderError | None]:
    """Every event the provider yielded, and the error it ended with (None when it finished)."""
    events: list[Event] = []
    try:
        async for event in provider.stream(request):
            events.append(event)
    except ProviderError as exc:
        return events, exc
    return events, None


def _deltas(events: list[Event]) -> list[str]:
    return [e.text for e in events if isinstance(e, Delta)]


@pytest.fixture
async def claude(sandbox: SandboxState) -> AsyncIterator[AnthropicProvider]:
    """The registry's Claude client (pointed at the sandbox), its connections closed afterwards."""
    provider = registry.get("claude")
    assert isinstance(provider, AnthropicProvider)
    yield provider
    await provider.aclose()


@pytest.fixture
async def make_provider(sandbox_server: BackgroundServer) -> AsyncIterator[Callable[..., AnthropicProvider]]:
    """Build clients pointed at the sandbox with chosen keys and timeouts; closed afterwards."""
    made: list[AnthropicProvider] = []

    def make(*, api_key: str = "sandbox-key", timeout: float = 10.0, base_url: str | None = None) -> AnthropicProvider:
        provider = AnthropicProvider(
            name="claude", api_key=api_key, base_url=base_url or f"{sandbox_server.url}/anthropic", timeout=timeout
        )
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


async def test_reply_text_usage_and_system_prompt(sandbox: SandboxState, claude: AnthropicProvider) -> None:
    system, text = "You answer briefly.", "hello there, sandbox"
    events, error = await _run(claude, _request(text, system=system))

    assert error is None
    assert events[0] == Start(provider="claude", model=MODEL)
    assert "".join(_deltas(events)) == "".join(reply_tokens(text, 12))
    # The system prompt went as `system` (a role "system" message would be a 400) and was counted.
    assert events[-2] == Usage(input_tokens=count_prompt_tokens([system, text]), output_tokens=12)
    assert events[-1] == Finish("stop")
    [call] = sandbox.calls("claude")
    assert (call.path, call.model, call.stream, call.status) == ("/anthropic/v1/messages", MODEL, True, 200)
    assert call.api_key == "sandbox-key"


async def test_max_tokens_caps_the_reply_and_finishes_with_length(
    sandbox: SandboxState, claude: AnthropicProvider
) -> None:
    events, error = await _run(claude, _request("count [[tokens:9]]", max_tokens=4))

    assert error is None
    assert len(_deltas(events)) == 4
    assert next(e for e in events if isinstance(e, Usage)).output_tokens == 4
    assert events[-1] == Finish("length")


async def test_stop_sequence_and_temperature_reach_the_upstream(
    sandbox: SandboxState, claude: AnthropicProvider
) -> None:
    text = "stop me"
    tokens = reply_tokens(text, 12)
    events, error = await _run(claude, _request(text, temperature=0.3, stop=(tokens[3],)))

    assert error is None
    assert _deltas(events) == tokens[:3]
    assert events[-1] == Finish("stop")
    # Out of Anthropic's 0..1 range: the upstream refuses it, so the value was sent.
    _, error = await _run(claude, _request(text, temperature=1.5))
    assert isinstance(error, ProviderBadRequest)
    assert "temperature" in error.message


@pytest.mark.parametrize(
    ("marker", "error_class", "status", "retry_after"),
    [
        ("[[fail:429]]", RateLimited, 429, 1.0),
        ("[[fail:429]] [[retry-after:none]]", RateLimited, 429, None),
        ("[[fail:429]] [[retry-after:7]]", RateLimited, 429, 7.0),
        ("[[fail:500]]", ProviderUnavailable, 500, None),
        ("[[fail:502]]", ProviderUnavailable, 502, None),
        ("[[fail:503]] [[retry-after:2]]", ProviderUnavailable, 503, 2.0),
        ("[[fail:529]]", ProviderUnavailable, 529, None),
        ("[[fail:529]] [[retry-after:soon]]", ProviderUnavailable, 529, None),  # unreadable: as if absent
        ("[[fail:400]]", ProviderBadRequest, 400, None),
        ("[[fail:401]]", ProviderAuthError, 401, None),
        ("[[fail:403]]", ProviderAuthError, 403, None),
        ("[[fail:404]]", ModelNotFound, 404, None),
        ("[[fail:context]]", ContextLengthExceeded, 400, None),
        ("[[fail:policy]]", ContentPolicyError, 400, None),
        ("[[fail:conn]]", ProviderConnectionError, None, None),
    ],
)
async def test_fault_markers_map_to_provider_errors(
    sandbox: SandboxState,
    claude: AnthropicProvider,
    marker: str,
    error_class: type[ProviderError],
    status: int | None,
    retry_after: float | None,
) -> None:
    events, error = await _run(claude, _request(f"hi {marker}"))

    assert type(error) is error_class
    assert error.provider == "claude"
    assert error.status == status
    assert error.retry_after == retry_after
    assert _deltas(events) == []
    assert len(sandbox.calls("claude")) == 1


async def test_retryable_and_final_errors_are_told_apart(sandbox: SandboxState, claude: AnthropicProvider) -> None:
    _, overloaded = await _run(claude, _request("x [[fail:529]]"))
    _, context = await _run(claude, _request("x [[fail:context]]"))

    assert overloaded is not None and overloaded.retryable
    assert context is not None and not context.retryable
    assert "prompt is too long" in context.message


@contextlib.asynccontextmanager
async def _upstream_answering(status: int, body: Mapping[str, object]) -> AsyncIterator[str]:
    """A loopback upstream that answers every request with `status` and the JSON `body`; its base URL."""
    payload = json.dumps(body).encode()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if b"content-length:" in line.lower())
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 %d Error\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (status, len(payload))
            + b"connection: close\r\n\r\n"
            + payload
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def test_input_plus_max_tokens_over_the_window_is_context_length_exceeded(
    make_provider: Callable[..., AnthropicProvider],
) -> None:
    """Anthropic's other context-window 400: the prompt fits, the prompt plus `max_tokens` does not."""
    message = (
        "input length and `max_tokens` exceed context limit: 178959 + 64000 > 200000, "
        "decrease input length or `max_tokens` and try again"
    )
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}, "request_id": "req_1"}
    async with _upstream_answering(400, body) as base_url:
        events, error = await _run(make_provider(base_url=base_url), _request("long"))

    assert events == []
    assert type(error) is ContextLengthExceeded
    assert (error.status, error.retryable) == (400, False)


@pytest.mark.parametrize("marker", ["[[fail:529]]", "[[fail:503]]", "[[fail:429]]", "[[fail:conn]]"])
async def test_sdk_retries_are_off(sandbox: SandboxState, claude: AnthropicProvider, marker: str) -> None:
    _, error = await _run(claude, _request(f"once {marker}"))

    assert error is not None and error.retryable
    assert len(sandbox.calls("claude")) == 1


async def test_fail_n_times_then_succeed(sandbox: SandboxState, claude: AnthropicProvider) -> None:
    _, first = await _run(claude, _request("flaky [[fail:529*1]]"))
    events, second = await _run(claude, _request("flaky [[fail:529*1]]"))

    assert isinstance(first, ProviderUnavailable)
    assert second is None
    assert events[-1] == Finish("stop")
    assert [c.status for c in sandbox.calls("claude")] == [529, 200]


async def test_invalid_api_key_is_an_auth_error(
    sandbox: SandboxState, make_provider: Callable[..., AnthropicProvider]
) -> None:
    provider = make_provider(api_key="invalid-key-123")
    _, error = await _run(provider, _request("hello"))

    assert isinstance(error, ProviderAuthError)
    assert error.status == 401
    with pytest.raises(ProviderAuthError):
        await provider.list_models()


async def test_hang_with_a_short_timeout_is_a_timeout(
    sandbox: SandboxState, make_provider: Callable[..., AnthropicProvider]
) -> None:
    _, error = await _run(make_provider(timeout=0.5), _request("wait [[hang]]"))

    assert isinstance(error, ProviderTimeout)
    assert error.retryable


@pytest.mark.parametrize("k", [0, 3])
async def test_drop_after_k_chunks_is_a_connection_error(
    sandbox: SandboxState, claude: AnthropicProvider, k: int
) -> None:
    events, error = await _run(claude, _request(f"cut [[drop:{k}]]"))

    assert isinstance(events[0], Start)
    assert len(_deltas(events)) == k
    assert isinstance(error, ProviderConnectionError)
    assert not any(isinstance(e, Usage | Finish) for e in events)


async def test_error_event_after_k_chunks_is_unavailable(sandbox: SandboxState, claude: AnthropicProvider) -> None:
    events, error = await _run(claude, _request("boom [[error-after:4]]"))

    assert _deltas(events) == reply_tokens("boom [[error-after:4]]", 12)[:4]
    assert isinstance(error, ProviderUnavailable)
    assert "overloaded" in error.message
    assert not any(isinstance(e, Usage | Finish) for e in events)


async def test_closed_port_is_a_connection_error(make_provider: Callable[..., AnthropicProvider]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = make_provider(base_url=f"http://127.0.0.1:{port}/anthropic")

    events, error = await _run(provider, _request("anyone?"))

    assert events == []
    assert isinstance(error, ProviderConnectionError)
    with pytest.raises(ProviderConnectionError):
        await provider.list_models()


async def test_early_close_closes_the_upstream_stream(sandbox: SandboxState, claude: AnthropicProvider) -> None:
    stream = claude.stream(_request("long [[tokens:60]] [[slow:50]]"))
    received: list[Event] = []
    async for event in stream:
        received.append(event)
        if len(_deltas(received)) == 2:
            break
    await stream.aclose()  # type: ignore[attr-defined]

    for _ in range(40):  # up to 2 s
        if sandbox.aborted_streams == 1 and sandbox.active_streams == 0:
            break
        await asyncio.sleep(0.05)
    assert (sandbox.aborted_streams, sandbox.active_streams, sandbox.completed_streams) == (1, 0, 0)


async def test_list_models(sandbox: SandboxState, claude: AnthropicProvider) -> None:
    models = await claude.list_models()

    assert MODEL in models
    assert "claude-haiku-4-5-20251001" in models
    assert [(c.path, c.status) for c in sandbox.calls("claude")] == [("/anthropic/v1/models", 200)]


# --- the wire itself, as Anthropic's own clients see it -------------------------------------

_HEADERS = {"x-api-key": "sandbox-key", "anthropic-version": "2023-06-01"}


async def test_wire_sse_event_sequence(sandbox: SandboxState, sandbox_server: BackgroundServer) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "hi [[tokens:3]]"}],
    }
    async with httpx2.AsyncClient(base_url=f"{sandbox_server.url}/anthropic") as client:
        response = await client.post("/v1/messages", json=body, headers=_HEADERS)
    frames = [f for f in response.text.split("\n\n") if f]
    names = [f.split("\n")[0].removeprefix("event: ") for f in frames]
    payloads = [json.loads(f.split("\n")[1].removeprefix("data: ")) for f in frames]

    assert response.headers["content-type"].startswith("text/event-stream")
    assert names == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 3 + [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [p["type"] for p in payloads] == names
    usage = payloads[0]["message"]["usage"]
    assert usage["output_tokens"] == 1
    assert (usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]) == (0, 0)
    assert payloads[-2]["delta"]["stop_reason"] == "end_turn"
    assert payloads[-2]["usage"] == {"output_tokens": 3}
    assert sandbox.completed_streams == 1


async def test_wire_json_reply_and_error_bodies(sandbox_server: BackgroundServer) -> None:
    message = {"role": "user", "content": [{"type": "text", "text": "plain"}]}
    async with httpx2.AsyncClient(base_url=f"{sandbox_server.url}/anthropic") as client:
        ok = await client.post(
            "/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": [message]}, headers=_HEADERS
        )
        no_max = await client.post("/v1/messages", json={"model": MODEL, "messages": [message]}, headers=_HEADERS)
        no_key = await client.post(
            "/v1/messages",
            json={"model": MODEL, "max_tokens": 5, "messages": [message]},
            headers={"anthropic-version": "2023-06-01"},
        )
        system_role = await client.post(
            "/v1/messages",
            json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "be nice"}, message]},
            headers=_HEADERS,
        )
        limited = await client.post(
            "/v1/messages",
            json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x [[fail:429]]"}]},
            headers=_HEADERS,
        )

    reply = ok.json()
    assert (reply["type"], reply["role"], reply["stop_reason"]) == ("message", "assistant", "max_tokens")
    assert reply["content"][0]["text"] == "".join(reply_tokens("plain", 5))
    assert reply["usage"]["output_tokens"] == 5
    assert no_max.status_code == 400
    assert no_max.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in no_max.json()["error"]["message"]
    assert no_key.status_code == 401
    assert no_key.json()["type"] == "error"
    assert no_key.json()["error"]["type"] == "authentication_error"
    assert system_role.status_code == 400
    assert "system" in system_role.json()["error"]["message"]
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert limited.headers["retry-after"] == "1"
