"""The OpenAI SDK client (OpenAI and DeepSeek) against the sandbox's OpenAI wire, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import cast

import aiohttp
import httpx2
import orjson
import pytest

from providers.base import (
    ChatMessage,
    ContentPolicyError,
    ContextLengthExceeded,
    Delta,
    Event,
    Finish,
    ModelNotFound,
    Provider,
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
from providers.openai_client import OpenAIProvider, _AioHttpClient, _body_reader
from providers.registry import SANDBOX_KEY, registry
from providers.sandbox.faults import DEFAULT_REPLY_TOKENS, SandboxState, count_prompt_tokens, reply_tokens
from providers.sandbox.openai_wire import REASONING_TOKENS
from tests.sandbox_server import BackgroundServer

SYSTEM = "You are terse."
_Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def make_request(text: str, *, model: str = "gpt-4o-mini", max_tokens: int = 256, **extra: object) -> ProviderRequest:
    messages = (ChatMessage("system", SYSTEM), ChatMessage("user", text))
    return ProviderRequest(model=model, messages=messages, max_tokens=max_tokens, **extra)  # type: ignore[arg-type]


async def collect(provider: Provider, request: ProviderRequest) -> tuple[list[Event], ProviderError | None]:
    """Every event the stream yielded, and the provider error it ended with (if any)."""
    events: list[Event] = []
    try:
        async for event in provider.stream(request):
            events.append(event)
    except ProviderError as exc:
        return events, exc
    return events, None


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


def deltas(events: list[Event]) -> list[Delta]:
    return [e for e in events if isinstance(e, Delta)]


@pytest.fixture
async def provider_at(sandbox_server: BackgroundServer) -> AsyncIterator[Callable[..., OpenAIProvider]]:
    """Make OpenAI clients on the sandbox with a key and a timeout of the test's; closed after it."""
    made: list[OpenAIProvider] = []

    def make(*, api_key: str = SANDBOX_KEY, timeout: float = 10.0) -> OpenAIProvider:
        base_url = f"{sandbox_server.url}/openai/v1"
        made.append(OpenAIProvider(name="openai", api_key=api_key, base_url=base_url, timeout=timeout))
        return made[-1]

    yield make
    for provider in made:
        await provider.aclose()


# --- replies and usage ----------------------------------------------------------------------


async def test_openai_reply_text_usage_and_event_order(sandbox: SandboxState) -> None:
    provider = registry.get("openai")
    assert isinstance(provider, OpenAIProvider)
    prompt = "hello there [[tokens:5]]"
    events, error = await collect(provider, make_request(prompt))

    assert error is None
    assert events[0] == Start(provider="openai", model="gpt-4o-mini")
    assert text_of(events) == "".join(reply_tokens(prompt, 5))
    assert events[-2] == Usage(
        input_tokens=count_prompt_tokens([SYSTEM, prompt]), output_tokens=5, cached_input_tokens=0, source="provider"
    )
    assert events[-1] == Finish("stop")
    assert sum(isinstance(e, Usage) for e in events) == 1
    [call] = sandbox.calls("openai")
    assert (call.path, call.model, call.stream, call.status, call.api_key) == (
        "/openai/v1/chat/completions",
        "gpt-4o-mini",
        True,
        200,
        SANDBOX_KEY,
    )
    assert sandbox.completed_streams == 1


async def test_default_reply_length_and_max_tokens_cap(sandbox: SandboxState) -> None:
    provider = registry.get("openai")
    events, _ = await collect(provider, make_request("plain"))
    assert text_of(events) == "".join(reply_tokens("plain", DEFAULT_REPLY_TOKENS))
    assert events[-1] == Finish("stop")

    events, _ = await collect(provider, make_request("long one [[tokens:40]]", max_tokens=3))
    assert text_of(events) == "".join(reply_tokens("long one [[tokens:40]]", 3))
    usage = next(e for e in events if isinstance(e, Usage))
    assert usage.output_tokens == 3
    assert events[-1] == Finish("length")


async def test_stop_sequence_ends_the_reply(sandbox: SandboxState) -> None:
    prompt = "stop me [[tokens:8]]"
    tokens = reply_tokens(prompt, 8)
    events, _ = await collect(registry.get("openai"), make_request(prompt, stop=(tokens[3].strip(),)))
    assert text_of(events) == "".join(tokens[:3])
    assert events[-1] == Finish("stop")


async def test_deepseek_reply_and_cache_usage(sandbox: SandboxState) -> None:
    provider = registry.get("deepseek")
    assert isinstance(provider, OpenAIProvider)
    prompt = "bonjour [[tokens:4]]"
    events, error = await collect(provider, make_request(prompt, model="deepseek-chat"))

    assert error is None
    assert events[0] == Start(provider="deepseek", model="deepseek-chat")
    assert text_of(events) == "".join(reply_tokens(prompt, 4))
    assert events[-2] == Usage(input_tokens=count_prompt_tokens([SYSTEM, prompt]), output_tokens=4)
    assert sum(isinstance(e, Usage) for e in events) == 1  # no reasoning, no running count
    [call] = sandbox.calls("deepseek")
    assert call.path == "/deepseek/chat/completions"


async def test_deepseek_reasoner_keeps_reasoning_out_of_the_text(sandbox: SandboxState) -> None:
    prompt = "think [[tokens:3]]"
    events, error = await collect(registry.get("deepseek"), make_request(prompt, model="deepseek-reasoner"))

    assert error is None
    assert text_of(events) == "".join(reply_tokens(prompt, 3))
    assert events[-2] == Usage(input_tokens=count_prompt_tokens([SYSTEM, prompt]), output_tokens=3 + REASONING_TOKENS)
    assert events[-1] == Finish("stop")


async def test_deepseek_reasoning_is_counted_as_it_streams_ahead_of_the_answer(sandbox: SandboxState) -> None:
    """The reasoning is output DeepSeek bills, but not text: its running count (one token a chunk,
    input not known) goes out before the answer's first Delta, each growing; the final usage is DeepSeek's."""
    prompt = "think hard [[tokens:3]] [[thoughts:40]]"
    events, error = await collect(registry.get("deepseek"), make_request(prompt, model="deepseek-reasoner"))
    assert error is None
    first_text = next(i for i, e in enumerate(events) if isinstance(e, Delta))
    running = [e for e in events[:first_text] if isinstance(e, Usage)]
    assert running and running[-1] == Usage(0, 40, source="estimated")
    counts = [u.output_tokens for u in running]
    assert counts == sorted(set(counts))
    assert [e for e in events[first_text:] if isinstance(e, Usage)] == [
        Usage(input_tokens=count_prompt_tokens([SYSTEM, prompt]), output_tokens=3 + 40)
    ]


async def test_a_deepseek_stream_cut_mid_reasoning_has_said_how_much_it_reasoned(sandbox: SandboxState) -> None:
    prompt = "think [[tokens:3]] [[thoughts:40]] [[drop:10]]"
    events, error = await collect(registry.get("deepseek"), make_request(prompt, model="deepseek-reasoner"))
    assert isinstance(error, ProviderConnectionError)
    assert text_of(events) == ""
    assert [e for e in events if isinstance(e, Usage)][-1] == Usage(0, 10, source="estimated")


async def test_completions_go_to_the_base_urls_path(sandbox: SandboxState) -> None:
    provider = registry.get("deepseek")
    events, error = await collect(provider, make_request("hello", model="deepseek-chat"))
    assert error is None and text_of(events)
    assert [c.path for c in sandbox.calls()] == ["/deepseek/chat/completions"]


@pytest.mark.parametrize("request_id", ["req-1234", ""])
async def test_the_upstream_gets_the_headers_it_needs_and_none_of_the_sdks_telemetry(
    sandbox: SandboxState, request_id: str
) -> None:
    events, error = await collect(registry.get("openai"), make_request("hello", request_id=request_id))
    assert error is None and text_of(events)
    (call,) = sandbox.calls()
    assert {"authorization", "content-type", "accept", "user-agent"} <= set(call.headers)
    assert [name for name in call.headers if name.startswith("x-stainless")] == []


async def test_the_http_client_parses_each_url_once_and_remembers_a_bounded_number() -> None:
    client = _AioHttpClient()
    try:
        first = client.build_request("POST", "http://127.0.0.1:9/v1/chat/completions?x=1")
        again = client.build_request("POST", "http://127.0.0.1:9/v1/chat/completions?x=1")
        assert str(first.url) == str(again.url) == "http://127.0.0.1:9/v1/chat/completions?x=1"
        assert first.url.params["x"] == "1" and first.headers["host"] == "127.0.0.1:9"
        assert len(client._urls) == 1
        for n in range(2 * _AioHttpClient.MAX_URLS):
            assert str(client.build_request("GET", f"http://127.0.0.1:9/v1/models/{n}").url).endswith(f"/models/{n}")
        assert len(client._urls) == _AioHttpClient.MAX_URLS
    finally:
        await client.aclose()


async def test_list_models(sandbox: SandboxState) -> None:
    assert "gpt-4o-mini" in await registry.get("openai").list_models()
    assert set(await registry.get("deepseek").list_models()) >= {"deepseek-chat", "deepseek-reasoner"}
    assert [c.path for c in sandbox.calls()] == ["/openai/v1/models", "/deepseek/models"]


async def test_list_models_with_a_bad_key(sandbox: SandboxState, provider_at: Callable[..., OpenAIProvider]) -> None:
    with pytest.raises(ProviderAuthError):
        await provider_at(api_key="invalid-key").list_models()


# --- error mapping ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("marker", "error_class", "status", "retry_after"),
    [
        ("[[fail:429]]", RateLimited, 429, 1.0),
        ("[[fail:429]] [[retry-after:7]]", RateLimited, 429, 7.0),
        ("[[fail:429]] [[retry-after:none]]", RateLimited, 429, None),
        ("[[fail:429]] [[retry-after:Wed, 21 Oct 2099 07:28:00 GMT]]", RateLimited, 429, 3600.0),  # capped
        ("[[fail:429]] [[retry-after:soon]]", RateLimited, 429, None),  # unreadable: as if absent
        ("[[fail:500]]", ProviderUnavailable, 500, None),
        ("[[fail:502]]", ProviderUnavailable, 502, None),
        ("[[fail:503]] [[retry-after:2]]", ProviderUnavailable, 503, 2.0),
        ("[[fail:529]]", ProviderUnavailable, 529, None),
        ("[[fail:400]]", ProviderBadRequest, 400, None),
        ("[[fail:401]]", ProviderAuthError, 401, None),
        ("[[fail:403]]", ProviderAuthError, 403, None),
        ("[[fail:404]]", ModelNotFound, 404, None),
        ("[[fail:context]]", ContextLengthExceeded, 400, None),
        ("[[fail:policy]]", ContentPolicyError, 400, None),
    ],
)
async def test_status_faults_map_to_provider_errors(
    sandbox: SandboxState, marker: str, error_class: type[ProviderError], status: int, retry_after: float | None
) -> None:
    for name in ("openai", "deepseek"):
        events, error = await collect(registry.get(name), make_request(f"hi {marker}"))
        assert type(error) is error_class, (name, error)
        assert error.provider == name
        assert error.status == status
        assert error.retry_after == retry_after
        assert error.retryable == (status in (429, 500, 502, 503, 529))
        assert events == []  # refused before any chunk
    assert [c.status for c in sandbox.calls()] == [status, status]


async def test_deepseek_content_refusal_is_a_content_policy_error(sandbox: SandboxState) -> None:
    """DeepSeek refuses content with 400 "Content Exists Risk" (type and code invalid_request_error)."""
    events, error = await collect(registry.get("deepseek"), make_request("hi [[fail:policy]]"))
    assert type(error) is ContentPolicyError
    assert "Content Exists Risk" in error.message
    assert (error.status, error.retryable) == (400, False)
    assert events == []


async def test_chunks_that_arrive_together_are_one_delta(sandbox: SandboxState) -> None:
    """A burst (chunks read off the socket at once) is one Delta with their text, in order."""
    prompt = "burst [[tokens:40]]"
    events, error = await collect(registry.get("openai"), make_request(prompt, max_tokens=50))
    assert error is None
    assert text_of(events) == "".join(reply_tokens(prompt, 40))
    assert 1 <= len(deltas(events)) < 40


async def test_a_paced_stream_is_one_delta_per_chunk(sandbox: SandboxState) -> None:
    prompt = "paced [[tokens:4]] [[slow:60]]"
    events, error = await collect(registry.get("openai"), make_request(prompt))
    assert error is None
    assert [d.text for d in deltas(events)] == reply_tokens(prompt, 4)


async def test_fault_limited_to_one_provider(sandbox: SandboxState) -> None:
    request = make_request("hi [[fail:503@openai]] [[tokens:2]]")
    _, error = await collect(registry.get("openai"), request)
    assert isinstance(error, ProviderUnavailable)
    events, error = await collect(registry.get("deepseek"), request)
    assert error is None
    assert text_of(events) == "".join(reply_tokens("hi [[fail:503@openai]] [[tokens:2]]", 2))


async def test_invalid_key_is_an_auth_error(sandbox: SandboxState, provider_at: Callable[..., OpenAIProvider]) -> None:
    _, error = await collect(provider_at(api_key="invalid-123456789"), make_request("hi"))
    assert isinstance(error, ProviderAuthError)
    assert error.status == 401
    assert "Incorrect API key" in error.message
    assert sandbox.calls()[0].status == 401


async def test_connection_cut_before_the_body(sandbox: SandboxState) -> None:
    events, error = await collect(registry.get("openai"), make_request("hi [[fail:conn]]"))
    assert isinstance(error, ProviderConnectionError)
    assert deltas(events) == []


async def test_hang_with_a_short_timeout_is_a_timeout(
    sandbox: SandboxState, provider_at: Callable[..., OpenAIProvider]
) -> None:
    _, error = await collect(provider_at(timeout=0.5), make_request("wait [[hang]]"))
    assert isinstance(error, ProviderTimeout)
    assert error.retryable


async def test_the_timeout_bounds_the_wait_for_headers_not_the_gaps_between_chunks(
    sandbox: SandboxState, provider_at: Callable[..., OpenAIProvider]
) -> None:
    """Chunks 0.6 s apart under a 0.3 s timeout all arrive: a stream's silence is the router's to
    judge (one timer per stream), not an SDK read timeout set again on every read."""
    prompt = "paced [[tokens:3]] [[slow:600]]"
    events, error = await collect(provider_at(timeout=0.3), make_request(prompt))
    assert error is None
    assert text_of(events) == "".join(reply_tokens(prompt, 3))
    assert isinstance(events[-1], Finish)


async def test_the_body_is_read_off_the_sdks_aiohttp_response(sandbox: SandboxState) -> None:
    """With the pinned SDK, an unencoded body is read straight off its transport's aiohttp response
    (no httpx stream around each read); if the SDK's transport changes, this says so."""
    provider = registry.get("openai")
    assert isinstance(provider, OpenAIProvider)
    response = await provider._open(make_request("hi [[tokens:2]]"))
    try:
        reader = _body_reader(response)
        assert isinstance(reader, aiohttp.StreamReader)
        body = b""
        while data := await reader.readany():
            body += data
        assert body.rstrip().endswith(b"data: [DONE]")
    finally:
        await response.aclose()


async def test_a_compressed_body_is_decoded_through_httpx() -> None:
    """A gzip-encoded stream is not read off aiohttp raw: httpx decodes it, and the text arrives."""
    body = gzip.compress(_ONE_REPLY)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_sse_response(body, b"content-encoding: gzip\r\n"))
        await writer.drain()
        writer.close()

    async with _raw_upstream(serve) as provider:
        events, error = await collect(provider, make_request("hi"))
        assert error is None and text_of(events) == "hi"
        assert isinstance(events[-1], Finish)


async def test_drop_after_k_chunks(sandbox: SandboxState) -> None:
    events, error = await collect(registry.get("openai"), make_request("hi [[tokens:8]] [[drop:3]]"))
    assert isinstance(error, ProviderConnectionError)
    assert isinstance(events[0], Start)
    assert text_of(events) == "".join(reply_tokens("hi [[tokens:8]] [[drop:3]]", 3))  # every chunk before the cut
    assert not any(isinstance(e, Usage | Finish) for e in events)


async def test_error_event_after_k_chunks(sandbox: SandboxState) -> None:
    events, error = await collect(registry.get("deepseek"), make_request("hi [[tokens:8]] [[error-after:2]]"))
    assert type(error) is ProviderUnavailable
    assert error.status is None
    assert text_of(events) == "".join(reply_tokens("hi [[tokens:8]] [[error-after:2]]", 2))
    assert not any(isinstance(e, Usage | Finish) for e in events)


async def test_closed_port_is_a_connection_error(sandbox: SandboxState) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = OpenAIProvider(name="openai", api_key="k", base_url=f"http://127.0.0.1:{port}/v1", timeout=5)
    _, error = await collect(provider, make_request("hi"))
    assert isinstance(error, ProviderConnectionError)
    with pytest.raises(ProviderConnectionError):
        await provider.list_models()


@pytest.mark.parametrize("marker", ["[[fail:503]]", "[[fail:429]] [[retry-after:0]]", "[[fail:conn]]"])
async def test_sdk_retries_are_off(sandbox: SandboxState, marker: str) -> None:
    _, error = await collect(registry.get("openai"), make_request(f"once {marker}"))
    assert error is not None and error.retryable
    assert len(sandbox.calls("openai")) == 1


async def test_fail_n_times_then_succeed(sandbox: SandboxState) -> None:
    provider = registry.get("openai")
    request = make_request("flaky [[fail:503*1]] [[tokens:2]]")
    _, first = await collect(provider, request)
    events, second = await collect(provider, request)
    assert isinstance(first, ProviderUnavailable)
    assert second is None and text_of(events) == "".join(reply_tokens("flaky [[fail:503*1]] [[tokens:2]]", 2))


# --- closing early ----------------------------------------------------------------------------


async def test_aclose_after_two_deltas_closes_the_upstream(sandbox: SandboxState) -> None:
    stream = cast(
        AsyncGenerator[Event, None], registry.get("openai").stream(make_request("long [[tokens:200]] [[slow:20]]"))
    )
    seen = 0
    async for event in stream:
        if isinstance(event, Delta):
            seen += 1
            if seen == 2:
                break
    assert sandbox.active_streams == 1
    await stream.aclose()

    for _ in range(100):  # up to 2 s
        if sandbox.aborted_streams == 1 and sandbox.active_streams == 0:
            break
        await asyncio.sleep(0.02)
    assert (sandbox.aborted_streams, sandbox.active_streams, sandbox.completed_streams) == (1, 0, 0)


async def test_cancelling_the_consumer_closes_the_upstream(sandbox: SandboxState) -> None:
    got_delta = asyncio.Event()

    async def consume() -> None:
        async for event in registry.get("deepseek").stream(make_request("long [[tokens:200]] [[slow:20]]")):
            if isinstance(event, Delta):
                got_delta.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_delta.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if sandbox.aborted_streams == 1 and sandbox.active_streams == 0:
            break
        await asyncio.sleep(0.02)
    assert (sandbox.aborted_streams, sandbox.active_streams) == (1, 0)


# --- the wire itself (what the SDK client does not show) -------------------------------------


async def test_wire_stream_shape_without_usage(sandbox: SandboxState, sandbox_server: BackgroundServer) -> None:
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x [[tokens:2]]"}]}
    async with httpx2.AsyncClient(base_url=sandbox_server.url, timeout=5) as client:
        response = await client.post(
            "/openai/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {SANDBOX_KEY}"}
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [f.removeprefix("data: ") for f in response.text.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    chunks = [orjson.loads(f) for f in frames[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == reply_tokens("x [[tokens:2]]", 2)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)  # include_usage was not asked for


async def test_wire_json_answer_and_auth_errors(sandbox: SandboxState, sandbox_server: BackgroundServer) -> None:
    body = {"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "x [[tokens:2]]"}]}
    auth = {"Authorization": "Bearer k"}
    async with httpx2.AsyncClient(base_url=sandbox_server.url, timeout=5) as client:
        ok = await client.post("/deepseek/v1/chat/completions", json=body, headers=auth)
        missing = await client.post("/deepseek/chat/completions", json=body)
        bad = await client.post("/openai/v1/chat/completions", json={"model": "m"}, headers=auth)

    answer = ok.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "".join(reply_tokens("x [[tokens:2]]", 2))
    assert answer["choices"][0]["message"]["reasoning_content"]
    assert answer["usage"]["completion_tokens"] == 2 + REASONING_TOKENS
    assert answer["usage"]["prompt_cache_miss_tokens"] == answer["usage"]["prompt_tokens"]
    assert missing.status_code == 401
    assert missing.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "messages"


# --- connection pools ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _raw_upstream(serve: _Serve) -> AsyncIterator[OpenAIProvider]:
    """A provider pointed at a raw asyncio server on loopback that answers with `serve`."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    provider = OpenAIProvider(name="openai", api_key="k", base_url=f"http://127.0.0.1:{port}/v1", timeout=5)
    try:
        yield provider
    finally:
        await provider.aclose()
        server.close()
        await server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> None:
    """Read one HTTP request (its head and its Content-Length body) off a raw test server's connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if b"content-length:" in line.lower())
    await reader.readexactly(length)


def _sse_response(body: bytes, headers: bytes = b"") -> bytes:
    """A 200 with `body` as an event stream of known length (`headers`: more header lines)."""
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n%scontent-length: %d\r\n\r\n%s" % (
        headers,
        len(body),
        body,
    )


_ONE_REPLY = (
    b'data: {"model":"gpt-4o-mini","choices":[{"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


async def test_calls_one_after_another_keep_one_connection_alive() -> None:
    """Six calls in a row open one connection, kept alive between them by the client's pool."""
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            while True:
                await _read_request(reader)
                writer.write(_sse_response(_ONE_REPLY))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async with _raw_upstream(serve) as provider:
        for _ in range(6):
            events, error = await collect(provider, make_request("hi"))
            assert error is None and text_of(events) == "hi"
    assert accepted == 1


@pytest.mark.parametrize("framing", ["chunked", "until-close"])
async def test_a_cut_right_behind_the_chunks_keeps_every_chunk_that_arrived(framing: str) -> None:
    """The chunks and the cut arrive together (one write, then the connection ends): every chunk
    the upstream sent is relayed — and so counted and billed — before the connection error."""
    chunks = [
        b'data: {"model":"m","choices":[{"delta":{"content":"t%d"},"finish_reason":null}]}\n\n' % i for i in range(3)
    ]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        if framing == "chunked":  # a chunked body that never gets its last, empty chunk
            body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + body
            )
        else:  # a body delimited by the end of the connection, which ends before [DONE]
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n" + b"".join(chunks)
            )
        writer.transport.abort()

    async with _raw_upstream(serve) as provider:
        for _ in range(20):  # the cut lands at another point of the client's reads from run to run
            events, error = await collect(provider, make_request("hi"))
            assert isinstance(error, ProviderConnectionError)
            assert text_of(events) == "t0t1t2"


async def test_a_registry_reset_closes_the_clients_it_forgets(sandbox: SandboxState) -> None:
    provider = registry.get("openai")
    assert isinstance(provider, OpenAIProvider)
    events, error = await collect(provider, make_request("hi [[tokens:2]]"))  # a pooled connection now
    assert error is None and deltas(events)

    registry.reset()
    for _ in range(10):  # the close runs as a task of this loop
        await asyncio.sleep(0)
    assert provider._client.is_closed()
    assert registry.get("openai") is not provider
