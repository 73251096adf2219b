"""The Gemini client (google-genai SDK) against the sandbox's Gemini wire, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable

import httpx2
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

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
from providers.gemini_client import GeminiProvider, map_error
from providers.registry import SANDBOX_KEY, registry
from providers.sandbox.faults import DEFAULT_REPLY_TOKENS, SandboxState, count_prompt_tokens, reply_tokens
from providers.sandbox.gemini_wire import SANDBOX_MODELS
from tests.sandbox_server import BackgroundServer

MODEL = "gemini-2.5-flash"
SECRET_KEY = "AIzaSyH3-recognizable-secret-key-0123456789"
SYSTEM = "You are a terse assistant. " * 10

MakeProvider = Callable[..., GeminiProvider]


def ask(text: str, *, system: str | None = None, max_tokens: int = 256, stop: tuple[str, ...] = ()) -> ProviderRequest:
    messages = ((ChatMessage("system", system),) if system else ()) + (ChatMessage("user", text),)
    return ProviderRequest(model=MODEL, messages=messages, max_tokens=max_tokens, stop=stop)


async def collect(provider: GeminiProvider, request: ProviderRequest) -> tuple[list[Event], ProviderError | None]:
    """Every event until the stream ends; the ProviderError it ended with, if any."""
    events: list[Event] = []
    try:
        async for event in provider.stream(request):
            events.append(event)
    except ProviderError as exc:
        return events, exc
    return events, None


def deltas(events: list[Event]) -> list[str]:
    return [e.text for e in events if isinstance(e, Delta)]


@pytest.fixture
async def make_provider(sandbox: SandboxState, sandbox_server: BackgroundServer) -> AsyncIterator[MakeProvider]:
    """Build clients pointed at the sandbox's /gemini mount; closed after the test."""
    made: list[GeminiProvider] = []

    def make(
        *, api_key: str = SANDBOX_KEY, timeout: float = 10.0, base_url: str | None = None, **kwargs: object
    ) -> GeminiProvider:
        provider = GeminiProvider(
            name="gemini",
            api_key=api_key,
            base_url=base_url or f"{sandbox_server.url}/gemini",
            timeout=timeout,
            **kwargs,  # type: ignore[arg-type]
        )
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


# --- replies ---------------------------------------------------------------------------------


async def test_reply_text_usage_and_system_instruction_through_the_registry(sandbox: SandboxState) -> None:
    provider = registry.get("gemini")
    assert isinstance(provider, GeminiProvider)
    text = "hello there [[tokens:5]]"

    try:
        events, error = await collect(provider, ask(text, system=SYSTEM))
    finally:
        await provider.aclose()

    assert error is None
    assert events[0] == Start(provider="gemini", model=MODEL)
    assert deltas(events) == reply_tokens(text, 5)
    # The sandbox counts every text it received: the system instruction reached it.
    assert events[-2] == Usage(input_tokens=count_prompt_tokens([SYSTEM, text]), output_tokens=5)
    assert count_prompt_tokens([SYSTEM, text]) > count_prompt_tokens([text]) + 20
    assert events[-1] == Finish("stop")
    assert sum(isinstance(e, Usage) for e in events) == 1
    [call] = sandbox.calls("gemini")
    assert (call.path, call.model, call.stream, call.status) == (
        f"/gemini/v1beta/models/{MODEL}:streamGenerateContent",
        MODEL,
        True,
        200,
    )
    assert call.api_key == SANDBOX_KEY


async def test_default_length_and_a_conversation_with_model_turns(make_provider: MakeProvider) -> None:
    messages = (
        ChatMessage("system", "be nice"),
        ChatMessage("user", "first question"),
        ChatMessage("assistant", "first answer"),
        ChatMessage("user", "second question"),
    )
    request = ProviderRequest(model=MODEL, messages=messages, max_tokens=100)

    events, error = await collect(make_provider(), request)

    assert error is None  # an "assistant" role sent as is would be refused with a 400
    assert deltas(events) == reply_tokens("second question", DEFAULT_REPLY_TOKENS)
    texts = ["be nice", "first question", "first answer", "second question"]
    assert events[-2] == Usage(input_tokens=count_prompt_tokens(texts), output_tokens=DEFAULT_REPLY_TOKENS)


async def test_max_tokens_caps_the_reply_and_finishes_with_length(make_provider: MakeProvider) -> None:
    text = "long one [[tokens:40]]"

    events, error = await collect(make_provider(), ask(text, max_tokens=4))

    assert error is None
    assert deltas(events) == reply_tokens(text, 4)
    assert events[-2] == Usage(input_tokens=count_prompt_tokens([text]), output_tokens=4)
    assert events[-1] == Finish("length")


async def test_stop_sequences_reach_the_upstream(make_provider: MakeProvider) -> None:
    text = "stop early [[tokens:8]]"
    full = reply_tokens(text, 8)

    events, error = await collect(make_provider(), ask(text, stop=(full[3],)))

    assert error is None
    assert "".join(deltas(events)) == "".join(full[:3])
    assert events[-1] == Finish("stop")


async def test_list_models_reads_every_model(make_provider: MakeProvider, sandbox: SandboxState) -> None:
    models = await make_provider().list_models()

    assert "gemini-2.5-flash" in models and "gemini-2.5-pro" in models
    assert all(not m.startswith("models/") for m in models)
    assert [c.path for c in sandbox.calls("gemini")] == ["/gemini/v1beta/models"]


async def test_list_models_follows_page_tokens(make_provider: MakeProvider, sandbox: SandboxState) -> None:
    provider = make_provider()
    provider.list_page_size = 2

    models = await provider.list_models()

    assert models == [name for name, *_ in SANDBOX_MODELS]
    assert len(sandbox.calls("gemini")) == -(-len(SANDBOX_MODELS) // 2)


async def test_list_models_with_a_rejected_key(make_provider: MakeProvider) -> None:
    with pytest.raises(ProviderAuthError) as caught:
        await make_provider(api_key="invalid-key").list_models()
    assert caught.value.status == 400


# --- faults ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("marker", "error_class", "status", "retry_after"),
    [
        ("[[fail:429]]", RateLimited, 429, 1.0),
        ("[[fail:429]] [[retry-after:none]]", RateLimited, 429, None),
        ("[[fail:429]] [[retry-after:3]]", RateLimited, 429, 3.0),
        ("[[fail:500]]", ProviderUnavailable, 500, None),
        ("[[fail:502]]", ProviderUnavailable, 502, None),
        ("[[fail:503]]", ProviderUnavailable, 503, None),
        ("[[fail:503]] [[retry-after:7]]", ProviderUnavailable, 503, 7.0),
        ("[[fail:529]]", ProviderUnavailable, 529, None),
        ("[[fail:400]]", ProviderBadRequest, 400, None),
        ("[[fail:401]]", ProviderAuthError, 401, None),
        ("[[fail:403]]", ProviderAuthError, 403, None),
        ("[[fail:404]]", ModelNotFound, 404, None),
        ("[[fail:context]]", ContextLengthExceeded, 400, None),
        ("[[fail:policy]]", ContentPolicyError, None, None),
        ("[[fail:conn]]", ProviderConnectionError, None, None),
        ("[[drop:0]]", ProviderConnectionError, None, None),
    ],
)
async def test_fault_markers_map_onto_provider_errors(
    make_provider: MakeProvider,
    sandbox: SandboxState,
    marker: str,
    error_class: type[ProviderError],
    status: int | None,
    retry_after: float | None,
) -> None:
    events, error = await collect(make_provider(), ask(f"please {marker}"))

    assert type(error) is error_class, error
    assert error.status == status
    assert error.retry_after == retry_after
    assert deltas(events) == []
    assert not any(isinstance(e, Usage | Finish) for e in events)
    assert len(sandbox.calls("gemini")) == 1  # SDK retries are off: the router is the only retry loop


async def test_policy_block_yields_nothing(make_provider: MakeProvider) -> None:
    events, error = await collect(make_provider(), ask("bad words [[fail:policy]]"))

    assert isinstance(error, ContentPolicyError)
    assert "SAFETY" in error.message
    assert events == []


def test_retry_info_in_the_body_stands_in_for_a_missing_retry_after_header() -> None:
    body = {
        "error": {
            "code": 429,
            "message": f"quota exceeded for key {SECRET_KEY}",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "23s"},
            ],
        }
    }

    error = map_error("gemini", genai_errors.ClientError(429, body), api_key=SECRET_KEY)

    assert isinstance(error, RateLimited)
    assert error.retry_after == 23.0
    assert SECRET_KEY not in str(error) and "[redacted]" in error.message


async def test_a_rejected_key_is_an_auth_error(make_provider: MakeProvider, sandbox: SandboxState) -> None:
    events, error = await collect(make_provider(api_key="invalid-sandbox-key"), ask("hi"))

    assert isinstance(error, ProviderAuthError)
    assert error.status == 400  # Gemini's answer: 400 INVALID_ARGUMENT, reason API_KEY_INVALID
    assert "API key not valid" in error.message
    assert events == []
    assert [c.status for c in sandbox.calls("gemini")] == [400]


async def test_a_hanging_upstream_times_out(make_provider: MakeProvider) -> None:
    events, error = await collect(make_provider(timeout=0.5), ask("wait [[hang]]"))

    assert isinstance(error, ProviderTimeout)
    assert error.retryable
    assert events == []


@pytest.mark.parametrize("k", [1, 3])
async def test_a_dropped_stream_gives_k_deltas_then_a_connection_error(make_provider: MakeProvider, k: int) -> None:
    text = f"drop me [[tokens:10]] [[drop:{k}]]"

    events, error = await collect(make_provider(), ask(text))

    assert isinstance(error, ProviderConnectionError)
    assert deltas(events) == reply_tokens(text, 10)[:k]
    assert events[0] == Start(provider="gemini", model=MODEL)
    assert not any(isinstance(e, Usage | Finish) for e in events)


async def test_thoughts_are_output_and_a_cut_stream_keeps_their_running_total(make_provider: MakeProvider) -> None:
    """A thinking model's thoughts are billed as output; they are not in the text, so a stream cut
    after some chunks reports the running total it had (marked estimated) before it fails."""
    text = "think [[tokens:5]] [[thoughts:40]]"
    events, error = await collect(make_provider(), ask(text))
    assert error is None
    assert events[-2] == Usage(input_tokens=count_prompt_tokens([text]), output_tokens=5 + 40)

    cut = "think more [[tokens:10]] [[thoughts:40]] [[drop:3]]"
    events, error = await collect(make_provider(), ask(cut))
    assert isinstance(error, ProviderConnectionError)
    assert deltas(events) == reply_tokens(cut, 10)[:3]
    usages = [e for e in events if isinstance(e, Usage)]
    assert usages[-1] == Usage(count_prompt_tokens([cut]), output_tokens=3 + 40, source="estimated")
    assert not any(isinstance(e, Finish) for e in events)


async def test_an_in_stream_error_gives_k_deltas_then_unavailable(
    make_provider: MakeProvider, sandbox: SandboxState
) -> None:
    text = "error me [[tokens:10]] [[error-after:2]]"

    events, error = await collect(make_provider(), ask(text))

    assert isinstance(error, ProviderUnavailable)
    assert error.status == 503
    assert deltas(events) == reply_tokens(text, 10)[:2]
    assert not any(isinstance(e, Usage | Finish) for e in events)
    assert len(sandbox.calls("gemini")) == 1


async def test_a_malformed_upstream_chunk_is_unavailable_not_a_bad_request(make_provider: MakeProvider) -> None:
    """A chunk that is JSON but not a GenerateContentResponse (the SDK's pydantic model refuses it) is
    the upstream's failure, retryable, like an unparseable one; not a request the client library refused."""
    good = {
        "candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}, "index": 0}],
        "modelVersion": MODEL,
    }
    bad = {"candidates": [{"content": {"parts": "not a list", "role": "model"}, "index": 0}], "modelVersion": MODEL}
    body = b"".join(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n" for chunk in (good, bad))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if b"content-length:" in line.lower())
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n" % len(body)
            + b"connection: close\r\n\r\n"
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        provider = make_provider(base_url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        events, error = await collect(provider, ask("hello"))
    finally:
        server.close()
        await server.wait_closed()

    assert deltas(events) == ["Hi"]
    assert type(error) is ProviderUnavailable
    assert error.retryable


async def test_a_closed_port_is_a_connection_error(make_provider: MakeProvider) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = make_provider(base_url=f"http://127.0.0.1:{port}/gemini", timeout=2.0)

    events, error = await collect(provider, ask("anyone there?"))

    assert isinstance(error, ProviderConnectionError)
    assert events == []


async def test_sdk_does_not_retry_a_failure_that_would_pass_the_second_time(
    make_provider: MakeProvider, sandbox: SandboxState
) -> None:
    provider = make_provider()

    _, first = await collect(provider, ask("once [[fail:503*1]]"))
    events, second = await collect(provider, ask("once [[fail:503*1]]"))

    assert isinstance(first, ProviderUnavailable)
    assert second is None and events[-1] == Finish("stop")
    assert [c.status for c in sandbox.calls("gemini")] == [503, 200]


# --- closing early ---------------------------------------------------------------------------


async def test_closing_early_closes_the_upstream_stream(make_provider: MakeProvider, sandbox: SandboxState) -> None:
    stream = make_provider().stream(ask("a long one [[tokens:200]] [[slow:20]]"))
    seen: list[Event] = []
    async for event in stream:
        seen.append(event)
        if len(deltas(seen)) == 2:
            break
    assert sandbox.active_streams == 1

    await stream.aclose()  # type: ignore[attr-defined]

    for _ in range(200):  # up to 2 s
        if sandbox.active_streams == 0:
            break
        await asyncio.sleep(0.01)
    assert sandbox.active_streams == 0
    assert sandbox.aborted_streams == 1
    assert sandbox.completed_streams == 0


# --- secrets ---------------------------------------------------------------------------------


SECRET_FAULTS = [
    "[[fail:400]]",
    "[[fail:401]]",
    "[[fail:403]]",
    "[[fail:404]]",
    "[[fail:429]]",
    "[[fail:500]]",
    "[[fail:502]]",
    "[[fail:503]]",
    "[[fail:529]]",
    "[[fail:context]]",
    "[[fail:policy]]",
    "[[fail:conn]]",
    "[[tokens:5]] [[drop:2]]",
    "[[tokens:5]] [[error-after:2]]",
    "[[hang]]",
]


async def test_the_key_travels_in_a_header_and_never_in_an_error(
    make_provider: MakeProvider, sandbox_server: BackgroundServer
) -> None:
    sent: list[httpx2.Request] = []

    async def record(request: httpx2.Request) -> None:
        sent.append(request)

    http = httpx2.AsyncClient(timeout=0.5, event_hooks={"request": [record]})
    provider = make_provider(api_key=SECRET_KEY, timeout=0.5, http_client=http)
    messages: list[str] = []
    try:
        for marker in SECRET_FAULTS:
            _, error = await collect(provider, ask(f"secret test {marker}"))
            assert error is not None, marker
            messages += [str(error), error.message, repr(error)]
    finally:
        await http.aclose()

    assert len(sent) == len(SECRET_FAULTS)
    assert all(r.headers["x-goog-api-key"] == SECRET_KEY for r in sent)
    assert not any(SECRET_KEY in str(r.url) for r in sent)
    assert all(SECRET_KEY not in m for m in messages)


async def test_the_key_is_never_in_an_auth_error_or_a_connection_error(make_provider: MakeProvider) -> None:
    bad_key = f"invalid-{SECRET_KEY}"
    _, auth = await collect(make_provider(api_key=bad_key), ask("hi"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = make_provider(api_key=SECRET_KEY, base_url=f"http://127.0.0.1:{port}/gemini", timeout=2.0)
    _, refused = await collect(closed, ask("hi"))

    assert isinstance(auth, ProviderAuthError) and isinstance(refused, ProviderConnectionError)
    for error in (auth, refused):
        assert SECRET_KEY not in str(error) and SECRET_KEY not in repr(error)


async def test_an_empty_key_is_refused_instead_of_read_from_the_environment() -> None:
    with pytest.raises(ValueError, match="api_key"):
        GeminiProvider(name="gemini", api_key="", base_url="http://127.0.0.1:9/gemini", timeout=1.0)


# --- the wire itself -------------------------------------------------------------------------


async def test_stream_frames_are_sse_with_cumulative_usage(
    sandbox: SandboxState, sandbox_server: BackgroundServer
) -> None:
    url = f"{sandbox_server.url}/gemini/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
    body = {"contents": [{"role": "user", "parts": [{"text": "frames [[tokens:3]]"}]}]}
    async with httpx2.AsyncClient(timeout=5) as client:
        response = await client.post(url, json=body, headers={"x-goog-api-key": "k"})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = response.text.split("\r\n\r\n")
    assert frames[-1] == ""
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    assert all(f.startswith("data: ") for f in frames[:-1])
    assert [c["usageMetadata"]["candidatesTokenCount"] for c in chunks] == [1, 2, 3, 3]
    assert [c["candidates"][0].get("finishReason") for c in chunks] == [None, None, None, "STOP"]
    assert chunks[-1]["usageMetadata"]["totalTokenCount"] == count_prompt_tokens(["frames [[tokens:3]]"]) + 3


async def test_wire_auth_missing_key_and_query_key(sandbox: SandboxState, sandbox_server: BackgroundServer) -> None:
    url = f"{sandbox_server.url}/gemini/v1beta/models/{MODEL}:generateContent"
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    async with httpx2.AsyncClient(timeout=5) as client:
        missing = await client.post(url, json=body)
        invalid = await client.post(url, json=body, headers={"x-goog-api-key": "invalid-one"})
        by_query = await client.post(url, params={"key": "fine"}, json=body)

    assert missing.status_code == 403
    assert missing.json()["error"]["status"] == "PERMISSION_DENIED"
    assert invalid.status_code == 400
    error = invalid.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    assert error["details"][0]["reason"] == "API_KEY_INVALID"
    assert by_query.status_code == 200
    assert [c.status for c in sandbox.calls("gemini")] == [403, 400, 200]


async def test_wire_non_streaming_generate_content_through_the_sdk(
    sandbox: SandboxState, sandbox_server: BackgroundServer
) -> None:
    client = genai.Client(
        api_key="k",
        http_options=types.HttpOptions(base_url=f"{sandbox_server.url}/gemini", api_version="v1beta"),
    )
    text = "one shot [[tokens:4]]"

    answer = await client.aio.models.generate_content(
        model=MODEL, contents=text, config=types.GenerateContentConfig(system_instruction="sys")
    )

    assert answer.text == "".join(reply_tokens(text, 4))
    assert answer.usage_metadata is not None
    assert answer.usage_metadata.candidates_token_count == 4
    assert answer.usage_metadata.prompt_token_count == count_prompt_tokens(["sys", text])
    assert answer.candidates and answer.candidates[0].finish_reason == types.FinishReason.STOP
    assert [c.stream for c in sandbox.calls("gemini")] == [False]
    await client.aio.aclose()
