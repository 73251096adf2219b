"""Streaming over SSE and WebSocket, through real sockets: however a stream ends, the ledger is right."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chat.pipeline import ChatRun
from providers.base import ChatMessage, Event, Provider, ProviderRequest, Usage
from providers.catalog import catalog_entries, resolve_model
from providers.pricing import Prices, cost_of
from providers.registry import registry
from providers.sandbox.faults import reply_tokens
from providers.tokens import count_messages, count_text
from tests.chat.clients import Received, sse_chat, ws_chat
from usage.models import UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)

TRANSPORTS = ["sse", "websocket"]


def run_chat(transport: str, url: str, key: str, body: dict, **kw) -> Received:
    if transport == "sse":
        return sse_chat(url, key, body, **kw)
    ws_kw = {"cancel_after_tokens": kw.get("cancel_after_tokens"), "hang_up_after_tokens": kw.get("stop_after_tokens")}
    return asyncio.run(ws_chat(url, key, body, **ws_kw))


def wait_for_record(timeout: float = 5.0) -> UsageRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = UsageRecord.objects.first()
        if record is not None:
            return record
        time.sleep(0.05)
    raise AssertionError(f"no UsageRecord within {timeout} s")


@pytest.fixture
def fast_failures(settings):
    settings.ENABLE_FALLBACK = False
    settings.MAX_RETRY_ATTEMPTS = 1


async def started_run(make_user, message: str, model: str = "openai") -> tuple[Any, ChatRun]:
    """A premium user's request, admitted through the pipeline and started, with no client reading
    it yet (the tests below drive `ChatRun` directly). Returns the user and the run."""
    from accounts.selectors import api_key_authenticate
    from chat.pipeline import prepare
    from chat.schemas import ChatRequest
    from chatservice.db import db_async
    from chatservice.request_ids import request_id_from

    user, key = await db_async(make_user)("premium")
    principal = await db_async(api_key_authenticate)(key)
    assert principal is not None
    prepared = await prepare(
        principal=principal,
        chat=ChatRequest(message=message, model=model),
        transport="sse",
        request_id=request_id_from(None),
    )
    return user, ChatRun(prepared).start()


async def drained(run: ChatRun) -> list[object]:
    """Every event the run still gives a reader, until its stream ends."""
    return [event async for event in run.events()]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("provider", ["openai", "claude", "deepseek", "gemini"])
def test_completed_stream(service_url, sandbox, make_user, transport, provider) -> None:
    _, key = make_user("premium")
    got = run_chat(transport, service_url, key, {"message": "stream please [[tokens:6]]", "model": provider})
    assert got.shape() == ["start", "token+", "done"]
    start = got.events[0][1]
    assert start["provider"] == provider and start["request_id"] and start["conversation_id"]
    done = got.last()
    assert done["message"] == got.text() and done["output_tokens"] == 6
    record = wait_for_record()
    assert (record.status, record.usage_source, record.output_tokens) == ("ok", "provider", 6)
    ledger_id = start.get("server_request_id", start["request_id"])
    assert record.provider == provider and str(record.request_id) == ledger_id
    if transport == "websocket":
        assert all(data["request_id"] == "client-1" for _, data in got.events)


def test_a_cut_reply_is_never_billed_more_output_than_max_tokens(
    service_url, sandbox, make_user, fast_failures
) -> None:
    """The estimate counts the text with tiktoken, which reads these words as more tokens than the
    provider generated (11 chunks count 16 or so): it is capped at what max_tokens let it make."""
    _, key = make_user("premium")
    message = "x [[tokens:12]] [[drop:11]]"
    got = run_chat("sse", service_url, key, {"message": message, "model": "claude-haiku-4-5", "max_tokens": 12})
    assert got.last()["error"]["code"] == "provider_connection_error"
    assert count_text(got.text(), "claude-haiku-4-5").tokens > 12  # the premise: the count runs over
    record = wait_for_record()
    assert (record.status, record.usage_source, record.output_tokens) == ("partial", "estimated", 12)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_failure_before_first_token(service_url, sandbox, make_user, fast_failures, transport) -> None:
    _, key = make_user("premium")
    got = run_chat(transport, service_url, key, {"message": "x [[fail:503]]", "model": "openai"})
    assert got.names() == ["error"]
    assert got.last()["error"]["code"] == "provider_unavailable"
    record = wait_for_record()
    assert (record.status, record.output_tokens, record.cost) == ("failed", 0, 0)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("provider", ["openai", "claude", "gemini"])
def test_upstream_cut_after_k_chunks(service_url, sandbox, make_user, fast_failures, transport, provider) -> None:
    _, key = make_user("premium")
    got = run_chat(transport, service_url, key, {"message": "x [[tokens:8]] [[drop:3]]", "model": provider})
    assert got.shape() == ["start", "token+", "error"]
    assert got.text() == "".join(reply_tokens("x [[tokens:8]] [[drop:3]]", 3))  # every chunk before the cut
    assert got.last()["error"]["code"] == "provider_connection_error"
    record = wait_for_record()
    assert record.status == "partial" and record.usage_source == "estimated"
    assert record.output_tokens == count_text(got.text(), record.model).tokens > 0
    assert record.cost > 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_cut_thinking_stream_is_billed_for_its_thoughts(
    service_url, sandbox, make_user, fast_failures, transport
) -> None:
    """Gemini's thoughts are output the provider bills but the text does not show: a cut stream is
    billed for them (the running total Gemini reported), not only for the text counted."""
    _, key = make_user("premium")
    got = run_chat(
        transport, service_url, key, {"message": "x [[tokens:8]] [[drop:3]] [[thoughts:300]]", "model": "gemini"}
    )
    assert got.shape() == ["start", "token+", "error"]
    record = wait_for_record()
    assert (record.status, record.usage_source) == ("partial", "estimated")
    assert record.output_tokens >= 300 + 3
    prices = Prices.of(resolve_model(catalog_entries(), "gemini"))
    assert record.cost == cost_of(Usage(record.input_tokens, record.output_tokens), prices)


def test_a_cancelled_thinking_stream_is_billed_for_its_thoughts(service_url, sandbox, make_user) -> None:
    _, key = make_user("premium")
    body = {"message": "x [[tokens:50]] [[slow:100]] [[thoughts:300]]", "model": "gemini"}
    got = asyncio.run(ws_chat(service_url, key, body, cancel_after_tokens=2))
    assert got.last()["error"]["code"] == "cancelled"
    record = wait_for_record()
    assert (record.status, record.usage_source) == ("cancelled", "estimated")
    assert 300 + 2 <= record.output_tokens < 300 + 50


REASONER = "deepseek-reasoner"


def reasoner_prompt_tokens(message: str) -> int:
    """The input the pipeline counted for a bare message to deepseek-reasoner."""
    return count_messages((ChatMessage("user", message),), REASONER).tokens


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_reasoning_stream_cut_in_its_answer_is_billed_for_its_reasoning(
    service_url, sandbox, make_user, fast_failures, transport
) -> None:
    """deepseek-reasoner's reasoning is output DeepSeek bills but the text does not show: a stream cut
    in its answer is billed for all of it (a token a chunk) and for the text, its input from the prompt."""
    _, key = make_user("premium")
    message = "x [[tokens:8]] [[thoughts:300]] [[drop:303]]"
    got = run_chat(transport, service_url, key, {"message": message, "model": REASONER})
    assert got.shape() == ["start", "token+", "error"]
    assert got.text() == "".join(reply_tokens(message, 3))
    record = wait_for_record()
    assert (record.status, record.usage_source) == ("partial", "estimated")
    assert record.output_tokens == 300 + count_text(got.text(), REASONER).tokens
    assert record.input_tokens == reasoner_prompt_tokens(message)
    prices = Prices.of(resolve_model(catalog_entries(), REASONER))
    assert record.cost == cost_of(Usage(record.input_tokens, record.output_tokens), prices)


def test_a_reasoning_stream_cut_before_its_answer_is_billed_for_its_reasoning(
    service_url, sandbox, make_user, fast_failures
) -> None:
    _, key = make_user("premium")
    message = "x [[tokens:8]] [[thoughts:300]] [[drop:100]]"
    got = run_chat("sse", service_url, key, {"message": message, "model": REASONER})
    assert got.names() == ["error"] and got.last()["error"]["code"] == "provider_connection_error"
    record = wait_for_record()
    assert (record.status, record.usage_source, record.output_tokens) == ("failed", "estimated", 100)
    assert record.input_tokens == reasoner_prompt_tokens(message) and record.cost > 0


def test_a_reasoning_stream_cancelled_in_its_answer_is_billed_for_its_reasoning(
    service_url, sandbox, make_user
) -> None:
    _, key = make_user("premium")
    body = {"message": "x [[tokens:50]] [[thoughts:20]] [[slow:50]]", "model": REASONER}
    got = asyncio.run(ws_chat(service_url, key, body, cancel_after_tokens=2))
    assert got.last()["error"]["code"] == "cancelled"
    record = wait_for_record()
    assert (record.status, record.usage_source) == ("cancelled", "estimated")
    assert 20 + 2 <= record.output_tokens < 20 + 50
    assert record.input_tokens == reasoner_prompt_tokens(body["message"])


class _Watched:
    """A provider client passed through, telling the test once the router has taken a Usage from it."""

    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.name = inner.name
        self.usage_taken = asyncio.Event()

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Event]:
        async with contextlib.aclosing(self.inner.stream(request)) as events:  # type: ignore[type-var]
            async for event in events:
                yield event
                if isinstance(event, Usage):  # the router asked for the next event: it has this one
                    self.usage_taken.set()

    async def list_models(self) -> list[str]:
        return await self.inner.list_models()


async def test_a_reasoning_stream_cancelled_before_its_answer_is_billed_for_its_reasoning(sandbox, make_user) -> None:
    """Cancelled while it reasons, before any text: the running count the router held back for
    the first token is what the record bills."""
    watched = _Watched(registry.get("deepseek"))
    registry.override("deepseek", watched)
    _, run = await started_run(make_user, "x [[tokens:5]] [[thoughts:300]] [[slow:20]]", REASONER)
    await asyncio.wait_for(watched.usage_taken.wait(), timeout=5)
    run.cancel()
    await asyncio.wait_for(run.settled.wait(), timeout=5)
    record = run.record
    assert record is not None and (record.status, record.usage_source) == ("cancelled", "estimated")
    assert 1 <= record.output_tokens < 300 and record.cost > 0
    assert record.input_tokens == run.prepared.prompt_tokens > 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_reasoning_phase_longer_than_the_first_token_timeout_is_served(
    service_url, sandbox, make_user, fast_failures, settings, transport
) -> None:
    """Reasoning is the model at work, not a silent upstream: it starts within the first-token
    timeout and lasts past it, and the answer that follows is served."""
    settings.FIRST_TOKEN_TIMEOUT_SECONDS = 0.5
    _, key = make_user("premium")
    body = {"message": "x [[tokens:2]] [[thoughts:30]] [[slow:50]]", "model": REASONER}
    got = run_chat(transport, service_url, key, body)
    assert got.shape() == ["start", "token+", "done"]
    record = wait_for_record()
    assert (record.status, record.usage_source, record.output_tokens) == ("ok", "provider", 30 + 2)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_provider_error_event_mid_stream(service_url, sandbox, make_user, fast_failures, transport) -> None:
    _, key = make_user("premium")
    got = run_chat(transport, service_url, key, {"message": "x [[tokens:8]] [[error-after:2]]", "model": "claude"})
    assert got.names() == ["start", "token", "token", "error"]
    record = wait_for_record()
    assert record.status == "partial" and record.output_tokens > 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_first_token_timeout(service_url, sandbox, make_user, fast_failures, settings, transport) -> None:
    settings.FIRST_TOKEN_TIMEOUT_SECONDS = 0.5
    _, key = make_user("premium")
    got = run_chat(transport, service_url, key, {"message": "x [[hang]]", "model": "deepseek"})
    assert got.names() == ["error"] and got.last()["error"]["code"] == "upstream_timeout"
    record = wait_for_record()
    assert record.status == "failed" and record.error_code == "upstream_timeout"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_idle_timeout_mid_stream(service_url, sandbox, make_user, fast_failures, settings, transport) -> None:
    settings.FIRST_TOKEN_TIMEOUT_SECONDS = 5
    settings.STREAM_IDLE_TIMEOUT_SECONDS = 0.4
    _, key = make_user("premium")
    # The first chunk comes after 0.2 s; a later gap of 0.9 s trips the idle timeout.
    got = run_chat(
        transport,
        service_url,
        key,
        {"message": "x [[tokens:4]] [[slow:900]]", "model": "openai"},
    )
    assert got.names()[-1] == "error" and got.last()["error"]["code"] == "upstream_timeout"
    record = wait_for_record()
    assert record.status in ("failed", "partial") and record.error_code == "upstream_timeout"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_client_leaves_after_k_chunks(service_url, sandbox, make_user, transport) -> None:
    _, key = make_user("premium")
    started = time.monotonic()
    got = run_chat(
        transport, service_url, key, {"message": "x [[tokens:50]] [[slow:100]]", "model": "openai"}, stop_after_tokens=3
    )
    assert got.names()[:4] == ["start", "token", "token", "token"]
    deadline = time.monotonic() + 2
    while sandbox.aborted_streams < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sandbox.aborted_streams == 1 and sandbox.active_streams == 0  # upstream closed within 2 s
    record = wait_for_record(5)
    assert time.monotonic() - started < 5 + 3 * 0.1 + 1
    assert record.status == "cancelled" and record.error_code == "cancelled"
    assert record.output_tokens >= 3 and record.output_tokens < 50
    assert record.usage_source == "estimated"


def test_websocket_cancel_after_k_chunks(service_url, sandbox, make_user) -> None:
    _, key = make_user("premium")
    got = asyncio.run(
        ws_chat(service_url, key, {"message": "x [[tokens:50]] [[slow:100]]", "model": "gemini"}, cancel_after_tokens=2)
    )
    assert got.names()[-1] == "error" and got.last()["error"]["code"] == "cancelled"
    assert got.names().count("token") < 50
    record = wait_for_record()
    assert record.status == "cancelled" and 2 <= record.output_tokens < 50
    assert sandbox.aborted_streams == 1


def test_streaming_disabled_refuses_both(service_url, sandbox, make_user, settings) -> None:
    settings.ENABLE_STREAMING = False
    _, key = make_user("premium")
    sse = sse_chat(service_url, key, {"message": "hi"})
    assert sse.status == 400 and sse.last()["error"]["code"] == "streaming_disabled"
    ws = asyncio.run(ws_chat(service_url, key, {"message": "hi"}))
    assert ws.names() == ["error"] and ws.last()["error"]["code"] == "streaming_disabled"
    assert UsageRecord.objects.count() == 0


def test_sse_headers_and_refusals_before_upstream(service_url, sandbox, make_user) -> None:
    _, key = make_user("free")
    refused = sse_chat(service_url, key, {"message": "hi", "model": "gpt-4o"})
    assert refused.status == 403 and refused.last()["error"]["code"] == "model_not_allowed"
    ok = sse_chat(service_url, key, {"message": "hi [[tokens:2]]"})
    assert ok.status == 200
    assert ok.headers["cache-control"] == "no-cache" and ok.headers["x-accel-buffering"] == "no"
    assert ok.headers["content-type"].startswith("text/event-stream")


def test_several_chats_over_one_socket(service_url, sandbox, make_user) -> None:
    import json

    import websockets

    _, key = make_user("premium")

    async def scenario() -> list[str]:
        url = service_url.replace("http://", "ws://") + "/ws/chat"
        dones = []
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "auth", "api_key": key}))
            assert json.loads(await ws.recv()) == {"type": "ready"}
            for i in range(3):
                await ws.send(json.dumps({"type": "chat", "request_id": f"r{i}", "message": f"n{i} [[tokens:2]]"}))
                while True:
                    message = json.loads(await ws.recv())
                    assert message["request_id"] == f"r{i}"
                    if message["type"] == "done":
                        dones.append(message["request_id"])
                        break
        return dones

    assert asyncio.run(scenario()) == ["r0", "r1", "r2"]
    assert UsageRecord.objects.count() == 3


def test_websocket_refusals(service_url, make_user) -> None:
    import websockets
    from websockets.exceptions import ConnectionClosed

    url = service_url.replace("http://", "ws://") + "/ws/chat"

    async def closed_code(**kw) -> int | None:
        async with websockets.connect(url, **kw) as ws:
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None

    async def bad_auth() -> int | None:
        async with websockets.connect(url) as ws:
            await ws.send('{"type": "auth", "api_key": "cs_bad_key"}')
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None
        return None

    assert asyncio.run(bad_auth()) == 4401
    wrong_key = {"Authorization": "Bearer cs_x_y"}
    assert asyncio.run(closed_code(additional_headers=wrong_key, origin="http://localhost")) == 4401
    assert asyncio.run(closed_code(origin="https://evil.example")) == 4403


def test_disconnect_leaves_no_task_behind(service_url, service_server, sandbox, make_user) -> None:
    _, key = make_user("premium")
    sse_chat(service_url, key, {"message": "x [[tokens:50]] [[slow:50]]", "model": "claude"}, stop_after_tokens=2)
    record = wait_for_record()
    assert record.status == "cancelled"
    deadline = time.monotonic() + 2
    while (service_server.tasks("chat-") or sandbox.active_streams) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert service_server.tasks("chat-") == [] and sandbox.active_streams == 0


async def test_a_client_that_stops_reading_is_dropped_and_billed_as_cancelled(sandbox, make_user, settings) -> None:
    """The buffer between upstream and client is bounded; a full buffer for too long ends the run."""
    settings.STREAM_BUFFER_EVENTS = 4
    settings.SLOW_CLIENT_TIMEOUT_SECONDS = 0.3
    _, run = await started_run(make_user, "x [[tokens:200]] [[slow:20]]")
    await asyncio.wait_for(run.settled.wait(), timeout=5)  # nobody reads: it gives up on its own
    assert run._queue.qsize() <= 4
    record = run.record
    assert record is not None and record.status == "cancelled" and record.error_code == "slow_client"
    assert 4 <= record.output_tokens < 200
    for _ in range(100):  # the upstream closes within 2 s
        if not sandbox.active_streams:
            break
        await asyncio.sleep(0.02)  # the sandbox's state lives in another thread
    assert sandbox.active_streams == 0 and sandbox.aborted_streams == 1


async def test_a_client_dropped_as_slow_that_reads_again_sees_its_stream_end(sandbox, make_user, settings) -> None:
    """After the slow-client drop the buffer is full, so the end of the stream must not need room:
    it was lost there, and a client that read again got the buffered events and then waited for
    good (an SSE response that never ended; on WebSocket, every later chat refused as in progress)."""
    from chat.events import Done, Failed

    settings.STREAM_BUFFER_EVENTS = 4
    settings.SLOW_CLIENT_TIMEOUT_SECONDS = 0.3
    _, run = await started_run(make_user, "x [[tokens:200]] [[slow:20]]")
    await asyncio.wait_for(run.settled.wait(), timeout=5)  # nobody reads: it gives up on its own
    assert run.record is not None and run.record.error_code == "slow_client"

    events = await asyncio.wait_for(drained(run), timeout=5)  # ends, rather than waiting forever
    assert 1 <= len(events) <= 4
    assert not any(isinstance(event, Done | Failed) for event in events)  # cancelled: no terminal event


async def test_a_terminal_event_that_finds_no_room_still_ends_the_stream(sandbox, make_user, settings) -> None:
    """The reply completed while the client was not reading: the terminal event waits for room up
    to the slow-client timeout and is then given up, but the stream still ends."""
    from chat.events import Started

    settings.STREAM_BUFFER_EVENTS = 1  # the start event fills it; the reply has no tokens
    settings.SLOW_CLIENT_TIMEOUT_SECONDS = 0.3
    _, run = await started_run(make_user, "x [[tokens:0]]")
    await asyncio.wait_for(run.settled.wait(), timeout=5)
    assert run.record is not None and run.record.status == "ok"
    await asyncio.wait_for(run._task, timeout=5)  # type: ignore[arg-type]  # gave up on the terminal put

    events = await asyncio.wait_for(drained(run), timeout=5)  # ends, rather than waiting forever
    assert [type(event) for event in events] == [Started]


async def test_a_run_cancelled_before_its_producer_ran_is_settled(sandbox, make_user) -> None:
    """A client that hangs up while the request is being admitted: the disconnect watcher
    cancels the run in the same loop turn that started it, before the producer task's first
    step. A task cancelled then never runs its body, so it must still settle (one cancelled
    record, the reservation returned) and end the event stream rather than leave it waiting."""
    from chatservice.db import db_async
    from usage.models import DailyTokenUsage, TokenReservation

    user, run = await started_run(make_user, "x [[tokens:5]]")
    run.cancel("cancelled")  # as `disconnect_guard` does when the hang-up is already queued

    events = await asyncio.wait_for(drained(run), timeout=5)  # ends, rather than waiting forever
    await asyncio.wait_for(run.settled.wait(), timeout=5)
    assert events == []
    record = run.record
    assert record is not None and record.status == "cancelled" and record.error_code == "cancelled"
    assert (record.input_tokens, record.output_tokens) == (0, 0)
    assert not await db_async(TokenReservation.objects.filter(user=user).exists)()
    day = await db_async(DailyTokenUsage.objects.get)(user=user)
    assert (day.used, day.reserved) == (0, 0)
    assert len(sandbox.requests) == 0  # nothing went upstream
