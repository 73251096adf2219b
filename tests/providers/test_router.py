"""The router against scripted providers: retries, timeouts, fallback, deadline, Start discipline."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from django.test import override_settings

from chatservice.db import db_async
from providers.base import (
    AllProvidersFailed,
    ContentPolicyError,
    ContextLengthExceeded,
    DeadlineExceeded,
    Delta,
    Event,
    Finish,
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
from providers.catalog import PROVIDERS, CatalogEntry, acatalog_entries, catalog_cache
from providers.circuit import Circuit
from providers.models import LLMModel
from providers.registry import registry
from providers.router import Router, get_router
from providers.routing_types import RouteTrace
from providers.sandbox.faults import SandboxState, reply_tokens
from tests.providers.scripted import (
    FakeClock,
    ScriptedProvider,
    Step,
    collect,
    collect_until_error,
    fail,
    hang,
    isolated_router_state,
    reply,
    route_request,
    text_of,
)

pytestmark = pytest.mark.django_db(transaction=True)

FAST = {
    "ENABLE_FALLBACK": True,
    "FALLBACK_ORDER": ["openai", "claude", "deepseek", "gemini"],
    "MAX_RETRY_ATTEMPTS": 3,
    "RETRY_DELAY_SECONDS": 0.01,
    "FIRST_TOKEN_TIMEOUT_SECONDS": 5.0,
    "STREAM_IDLE_TIMEOUT_SECONDS": 5.0,
    "REQUEST_DEADLINE_SECONDS": 20.0,
    "CIRCUIT_FAILURE_THRESHOLD": 100,
    "CIRCUIT_COOLDOWN_SECONDS": 30.0,
    "MAX_INFLIGHT_PER_PROVIDER": 8,
    "PRIORITY_MAX_WAIT_SECONDS": 5.0,
}


@pytest.fixture
def scripted() -> Iterator[dict[str, ScriptedProvider]]:
    """A scripted provider behind every provider name, fast router settings, private Redis keys."""
    providers = {name: ScriptedProvider(name) for name in PROVIDERS}
    for name, provider in providers.items():
        registry.override(name, provider)
    with isolated_router_state(), override_settings(**FAST):
        yield providers
    registry.reset()


async def entry(name: str) -> CatalogEntry:
    return next(e for e in await acatalog_entries() if e.name == name)


def calls(scripted: dict[str, ScriptedProvider]) -> dict[str, int]:
    return {name: len(p.calls) for name, p in scripted.items() if p.calls}


async def test_serves_the_selected_model_and_passes_events_through(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["openai"].push(reply("Hi", " there", "!"))
    trace = RouteTrace()
    request = route_request(await entry("gpt-4o"), max_tokens=50_000)

    events = await collect(Router(), request, trace)

    assert events[0] == Start("openai", "gpt-4o")
    assert text_of(events) == "Hi there!"
    assert isinstance(events[-2], Usage) and events[-1] == Finish("stop")
    sent = scripted["openai"].calls[0]
    assert sent.model == "gpt-4o" and sent.max_tokens == 16_384  # capped by the model's max output
    assert sent.request_id == request.request_id and sent.temperature == 0.5
    assert (trace.attempts, trace.tried, trace.delivered) == (1, ["openai"], True)
    assert trace.served_by is not None and trace.served_by.name == "gpt-4o"
    assert trace.fallback_path == []
    assert scripted["openai"].closed_early == 0  # read to its end, not cut after the Finish


async def test_upstream_model_id_is_sent(scripted: dict[str, ScriptedProvider]) -> None:
    await collect(Router(), route_request(await entry("claude-haiku-4-5")))
    assert scripted["claude"].calls[0].model == "claude-haiku-4-5-20251001"


@pytest.mark.parametrize(
    "step",
    [
        fail(RateLimited, "429 without retry-after", status=429),
        fail(RateLimited, "429 with retry-after", status=429, retry_after=0.01),
        fail(ProviderUnavailable, "500", status=500),
        fail(ProviderUnavailable, "503", status=503),
        fail(ProviderUnavailable, "529 overloaded", status=529),
        fail(ProviderConnectionError, "connection refused"),
        fail(ProviderTimeout, "read timeout"),
    ],
    ids=["429", "429-retry-after", "500", "503", "529", "refused", "timeout"],
)
async def test_retryable_error_retries_then_falls_back(scripted: dict[str, ScriptedProvider], step: object) -> None:
    scripted["openai"].default = step  # type: ignore[assignment]
    trace = RouteTrace()

    events = await collect(Router(), route_request(await entry("gpt-4o-mini")), trace)

    assert calls(scripted) == {"openai": 3, "claude": 1}
    assert [e for e in events if isinstance(e, Start)] == [Start("claude", "claude-haiku-4-5")]
    assert trace.attempts == 4 and trace.tried == ["openai", "claude"]
    assert trace.fallback_path == ["openai"]
    assert trace.served_by is not None and trace.served_by.name == "claude-haiku-4-5"


async def test_retry_succeeds_on_the_same_provider(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["openai"].push(fail(ProviderUnavailable, status=503), fail(RateLimited, status=429))
    trace = RouteTrace()

    events = await collect(Router(), route_request(await entry("gpt-4o-mini")), trace)

    assert events[0] == Start("openai", "gpt-4o-mini")
    assert calls(scripted) == {"openai": 3}
    assert trace.attempts == 3 and trace.fallback_path == []


async def test_backoff_is_exponential(scripted: dict[str, ScriptedProvider]) -> None:
    waits: list[float] = []

    async def record_sleep(seconds: float) -> None:
        waits.append(seconds)

    scripted["openai"].default = fail(ProviderUnavailable, status=500)
    with override_settings(RETRY_DELAY_SECONDS=0.5, MAX_RETRY_ATTEMPTS=4):
        await collect(Router(sleep=record_sleep), route_request(await entry("gpt-4o-mini")))
    assert waits == [0.5, 1.0, 2.0]
    assert calls(scripted) == {"openai": 4, "claude": 1}


@pytest.mark.parametrize("no_fallback", ["fallback-off", "no-other-provider"])
async def test_retry_waits_what_retry_after_said(scripted: dict[str, ScriptedProvider], no_fallback: str) -> None:
    scripted["openai"].push(fail(RateLimited, status=429, retry_after=0.6))
    trace = RouteTrace()
    allowed = {"openai"} if no_fallback == "no-other-provider" else {"openai", "claude", "deepseek", "gemini"}

    started = time.monotonic()
    with override_settings(ENABLE_FALLBACK=no_fallback != "fallback-off"):
        events = await collect(Router(), route_request(await entry("gpt-4o-mini"), allowed=allowed), trace)
    elapsed = time.monotonic() - started

    assert events[0] == Start("openai", "gpt-4o-mini")
    assert trace.attempts == 2
    assert 0.6 <= elapsed < 3.0


async def test_retry_after_longer_than_the_backoff_falls_back_instead_of_waiting(
    scripted: dict[str, ScriptedProvider],
) -> None:
    # A provider that asks for 10 s (within the deadline) while another could answer now: the
    # user does not wait 10 s.
    scripted["openai"].push(fail(RateLimited, status=429, retry_after=10))
    trace = RouteTrace()
    waits: list[float] = []

    async def record_sleep(seconds: float) -> None:
        waits.append(seconds)

    with override_settings(RETRY_DELAY_SECONDS=1.0):
        events = await collect(Router(sleep=record_sleep), route_request(await entry("gpt-4o-mini")), trace)

    assert events[0] == Start("claude", "claude-haiku-4-5")
    assert waits == []
    assert calls(scripted) == {"openai": 1, "claude": 1}
    assert trace.fallback_path == ["openai"]


async def test_retry_after_within_the_backoff_is_waited_on_the_same_provider(
    scripted: dict[str, ScriptedProvider],
) -> None:
    scripted["openai"].push(fail(RateLimited, status=429, retry_after=0.5))
    waits: list[float] = []

    async def record_sleep(seconds: float) -> None:
        waits.append(seconds)

    with override_settings(RETRY_DELAY_SECONDS=1.0):
        events = await collect(Router(sleep=record_sleep), route_request(await entry("gpt-4o-mini")))

    assert events[0] == Start("openai", "gpt-4o-mini")
    assert waits == [0.5]
    assert calls(scripted) == {"openai": 2}


async def test_retry_after_beyond_the_deadline_moves_on_to_fallback(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["openai"].default = fail(RateLimited, status=429, retry_after=30)
    trace = RouteTrace()

    started = time.monotonic()
    with override_settings(REQUEST_DEADLINE_SECONDS=5.0):
        await collect(Router(), route_request(await entry("gpt-4o-mini")), trace)
    elapsed = time.monotonic() - started

    assert calls(scripted) == {"openai": 1, "claude": 1}
    assert elapsed < 2.0


async def test_hang_past_first_token_timeout_retries_then_falls_back(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["openai"].default = hang()
    trace = RouteTrace()

    started = time.monotonic()
    with override_settings(FIRST_TOKEN_TIMEOUT_SECONDS=0.3, MAX_RETRY_ATTEMPTS=2):
        events = await collect(Router(), route_request(await entry("gpt-4o-mini")), trace)
    elapsed = time.monotonic() - started

    assert events[0] == Start("claude", "claude-haiku-4-5")
    assert calls(scripted) == {"openai": 2, "claude": 1}
    assert scripted["openai"].closed_early == 2 and scripted["openai"].active == 0  # both hung calls closed
    assert 0.6 <= elapsed < 3.0


async def test_first_token_timeout_runs_from_the_call_not_from_start(scripted: dict[str, ScriptedProvider]) -> None:
    """A Start (the head of the answer: Anthropic's message_start, OpenAI's role chunk) is no token:
    an upstream that takes most of the timeout to begin and most of it again to its first token
    has not produced one within the timeout."""
    scripted["openai"].push(Step(texts=("late",), start_delay=0.2, first_delay=0.2))
    trace = RouteTrace()

    with override_settings(FIRST_TOKEN_TIMEOUT_SECONDS=0.3, MAX_RETRY_ATTEMPTS=1, ENABLE_FALLBACK=False):
        events, error = await collect_until_error(Router(), route_request(await entry("gpt-4o-mini")), trace)

    assert isinstance(error, ProviderTimeout) and "no first token within 0.3 s" in error.message
    assert events == [] and not trace.delivered
    assert scripted["openai"].closed_early == 1


async def test_a_slow_reader_is_not_an_upstream_silence(scripted: dict[str, ScriptedProvider]) -> None:
    """Only the waits for the upstream count against the idle timeout: time the caller takes
    between events (a client reading slowly) does not, however long the stream."""
    scripted["openai"].push(reply("one", " two", " three"))
    events: list[Event] = []
    with override_settings(STREAM_IDLE_TIMEOUT_SECONDS=0.2, FIRST_TOKEN_TIMEOUT_SECONDS=0.2):
        async for event in Router().stream(route_request(await entry("gpt-4o-mini")), RouteTrace()):
            events.append(event)
            await asyncio.sleep(0.3)  # longer than both timeouts, between every two events

    assert text_of(events) == "one two three" and isinstance(events[-1], Finish)


async def test_an_outside_cancellation_stays_a_cancellation(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["openai"].default = hang()
    with override_settings(FIRST_TOKEN_TIMEOUT_SECONDS=0.2, MAX_RETRY_ATTEMPTS=1):
        task = asyncio.ensure_future(collect(Router(), route_request(await entry("gpt-4o-mini"))))
        await asyncio.sleep(0.05)
        task.cancel()  # the caller goes away before the upstream's first token is due
        with pytest.raises(asyncio.CancelledError):
            await task
    assert scripted["openai"].active == 0


async def test_idle_stream_after_the_first_delta_is_an_error_without_fallback(
    scripted: dict[str, ScriptedProvider],
) -> None:
    scripted["openai"].push(reply("one", " two", delay=5))
    trace = RouteTrace()

    with override_settings(STREAM_IDLE_TIMEOUT_SECONDS=0.3):
        events, error = await collect_until_error(Router(), route_request(await entry("gpt-4o-mini")), trace)

    assert isinstance(error, ProviderTimeout) and error.code == "upstream_timeout"
    assert events == [Start("openai", "gpt-4o-mini"), Delta("one")]
    assert calls(scripted) == {"openai": 1}
    assert trace.delivered and trace.attempts == 1
    assert scripted["openai"].closed_early == 1


@pytest.mark.parametrize("error_type", [ProviderBadRequest, ContentPolicyError, ProviderAuthError])
async def test_final_errors_are_neither_retried_nor_fallen_back(
    scripted: dict[str, ScriptedProvider], error_type: type[ProviderError]
) -> None:
    scripted["openai"].default = fail(error_type, "no", status=400)
    trace = RouteTrace()

    events, error = await collect_until_error(Router(), route_request(await entry("gpt-4o-mini")), trace)

    assert type(error) is error_type
    assert events == []  # no Start from a provider that failed
    assert calls(scripted) == {"openai": 1}
    assert trace.attempts == 1 and not trace.delivered


async def test_context_length_falls_back_to_a_larger_window(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["openai"].push(fail(ContextLengthExceeded, "too long", status=400))
    trace = RouteTrace()

    events = await collect(Router(), route_request(await entry("gpt-4"), prompt_tokens=12_000, max_tokens=500), trace)

    # the smallest window of the same provider that holds 12,000 + 500 tokens
    assert events[0] == Start("openai", "gpt-3.5-turbo")
    assert [c.model for c in scripted["openai"].calls] == ["gpt-4", "gpt-3.5-turbo"]
    assert trace.attempts == 2


async def test_context_length_crosses_providers_when_needed(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["claude"].push(fail(ContextLengthExceeded, "prompt is too long", status=400))
    request = route_request(
        await entry("claude-haiku-4-5"), prompt_tokens=300_000, max_tokens=1000, allowed={"claude", "gemini"}
    )

    events = await collect(Router(), request)

    assert events[0] == Start("gemini", "gemini-2.5-flash")  # 1M window, cheaper than gemini-2.5-pro


async def test_context_length_without_a_larger_allowed_model_is_reraised(
    scripted: dict[str, ScriptedProvider],
) -> None:
    scripted["claude"].default = fail(ContextLengthExceeded, "prompt is too long", status=400)
    request = route_request(await entry("claude-haiku-4-5"), prompt_tokens=300_000, allowed={"claude", "deepseek"})

    with pytest.raises(ContextLengthExceeded):
        await collect(Router(), request)
    assert calls(scripted) == {"claude": 1}


async def test_deadline_bounds_all_attempts_and_fallbacks(scripted: dict[str, ScriptedProvider]) -> None:
    for provider in scripted.values():
        provider.default = hang()
    trace = RouteTrace()

    started = time.monotonic()
    with (
        override_settings(FIRST_TOKEN_TIMEOUT_SECONDS=0.4, REQUEST_DEADLINE_SECONDS=1.5),
        pytest.raises(DeadlineExceeded) as caught,
    ):
        await collect(Router(), route_request(await entry("gpt-4o-mini")), trace)
    elapsed = time.monotonic() - started

    assert caught.value.code == "deadline_exceeded"
    assert 1.4 <= elapsed <= 1.5 + 0.5
    # three 0.4 s attempts on openai, then what is left (about 0.27 s) for claude; on a busy
    # machine the overhead can eat that remainder, so the fourth attempt is not guaranteed.
    assert 3 <= trace.attempts <= 4 and trace.tried[0] == "openai"
    assert sum(p.active for p in scripted.values()) == 0


async def test_fallback_never_lands_on_a_provider_the_plan_forbids(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["deepseek"].default = fail(ProviderUnavailable, status=503)
    trace = RouteTrace()

    events = await collect(Router(), route_request(await entry("deepseek-chat"), allowed={"deepseek", "gemini"}), trace)

    assert events[0] == Start("gemini", "gemini-2.5-flash")
    assert calls(scripted) == {"deepseek": 3, "gemini": 1}
    assert trace.fallback_path == ["deepseek"]


async def test_everything_failed_is_all_providers_failed(scripted: dict[str, ScriptedProvider]) -> None:
    for provider in scripted.values():
        provider.default = fail(ProviderUnavailable, status=503)
    trace = RouteTrace()

    events, error = await collect_until_error(
        Router(), route_request(await entry("deepseek-chat"), allowed={"deepseek", "gemini"}), trace
    )

    assert isinstance(error, AllProvidersFailed) and error.code == "no_provider_available"
    assert error.provider == "gemini" and error.retry_after is not None and error.retry_after >= 1
    assert events == []
    assert trace.tried == ["deepseek", "gemini"] and trace.attempts == 6


async def test_without_fallback_the_providers_own_error_is_raised(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["openai"].default = fail(ProviderUnavailable, "boom", status=502)

    with override_settings(ENABLE_FALLBACK=False), pytest.raises(ProviderUnavailable, match="boom"):
        await collect(Router(), route_request(await entry("gpt-4o-mini")))
    assert calls(scripted) == {"openai": 3}


async def test_failure_after_a_delta_is_reraised_without_fallback(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["openai"].push(fail(ProviderConnectionError, "cut", after=1))
    trace = RouteTrace()

    events, error = await collect_until_error(Router(), route_request(await entry("gpt-4o-mini")), trace)

    assert isinstance(error, ProviderConnectionError)
    assert events == [Start("openai", "gpt-4o-mini"), Delta("Hello")]
    assert calls(scripted) == {"openai": 1}
    assert trace.delivered and trace.fallback_path == []


async def test_maintenance_is_skipped_by_fallback(scripted: dict[str, ScriptedProvider]) -> None:
    await db_async(LLMModel.objects.filter(name="claude-haiku-4-5").update)(maintenance=True)
    catalog_cache.invalidate()
    scripted["openai"].default = fail(ProviderUnavailable, status=503)
    trace = RouteTrace()

    events = await collect(Router(), route_request(await entry("gpt-4o-mini")), trace)

    assert events[0] == Start("deepseek", "deepseek-chat")
    assert calls(scripted) == {"openai": 3, "deepseek": 1}
    assert trace.fallback_path == ["openai"]  # claude was skipped, not tried


async def test_usage_before_text_is_held_until_start(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["openai"].push(reply(""))  # no text at all: Start comes with the Finish

    events = await collect(Router(), route_request(await entry("gpt-4o-mini")))

    assert [type(e).__name__ for e in events] == ["Start", "Usage", "Finish"]


async def test_closing_the_router_closes_the_upstream_stream(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["openai"].push(reply("a", "b", "c", delay=0.05))
    router = Router()
    stream = router.stream(route_request(await entry("gpt-4o-mini")), RouteTrace())

    assert await anext(stream) == Start("openai", "gpt-4o-mini")
    assert await anext(stream) == Delta("a")
    await stream.aclose()  # type: ignore[attr-defined]

    assert scripted["openai"].closed_early == 1 and scripted["openai"].active == 0
    assert router.lane.inflight("openai") == 0


async def test_unexpected_client_exception_is_treated_as_unavailable(scripted: dict[str, ScriptedProvider]) -> None:
    class Broken(ScriptedProvider):
        async def stream(self, request: ProviderRequest) -> AsyncIterator[Event]:
            self.calls.append(request)
            raise RuntimeError("bug in a client")
            yield  # pragma: no cover

    broken = Broken("gemini")
    registry.override("gemini", broken)
    events = await collect(Router(), route_request(await entry("gemini-2.5-flash"), allowed={"gemini", "deepseek"}))
    assert events[0] == Start("deepseek", "deepseek-chat")
    assert len(broken.calls) == 3


# --- the circuit through the router -----------------------------------------------------------


async def test_open_circuit_gets_no_traffic_until_the_cooldown_then_one_probe(
    scripted: dict[str, ScriptedProvider],
) -> None:
    clock = FakeClock()
    router = Router(circuit=Circuit(clock=clock))
    openai = scripted["openai"]
    openai.default = fail(ProviderUnavailable, status=503)
    gpt = await entry("gpt-4o-mini")

    with override_settings(CIRCUIT_FAILURE_THRESHOLD=3, CIRCUIT_COOLDOWN_SECONDS=30, ENABLE_FALLBACK=False):
        with pytest.raises(ProviderUnavailable):
            await collect(router, route_request(gpt))  # three failed attempts open the circuit
        assert len(openai.calls) == 3

        for _ in range(3):  # open: no traffic at all
            with pytest.raises(AllProvidersFailed) as caught:
                await collect(router, route_request(gpt))
            assert caught.value.retry_after == pytest.approx(30)
        assert len(openai.calls) == 3

        clock.advance(29)
        with pytest.raises(AllProvidersFailed):
            await collect(router, route_request(gpt))
        assert len(openai.calls) == 3

        clock.advance(2)  # cooldown over: one probe, which fails and re-opens the circuit
        with pytest.raises(ProviderUnavailable):
            await collect(router, route_request(gpt))
        assert len(openai.calls) == 4
        with pytest.raises(AllProvidersFailed):
            await collect(router, route_request(gpt))
        assert len(openai.calls) == 4

        clock.advance(31)  # the next probe succeeds and closes it
        openai.default = reply("back")
        assert text_of(await collect(router, route_request(gpt))) == "back"
        assert text_of(await collect(router, route_request(gpt))) == "back"
        assert len(openai.calls) == 6


async def test_fallback_skips_a_provider_whose_circuit_is_open(scripted: dict[str, ScriptedProvider]) -> None:
    router = Router()
    with override_settings(CIRCUIT_FAILURE_THRESHOLD=1):
        await router.circuit.record_failure("claude")
        scripted["openai"].default = fail(ProviderUnavailable, status=503)
        trace = RouteTrace()
        events = await collect(router, route_request(await entry("gpt-4o-mini")), trace)

    assert events[0] == Start("deepseek", "deepseek-chat")
    assert calls(scripted) == {"openai": 1, "deepseek": 1}  # openai's own failure opened its circuit
    assert trace.tried == ["openai", "deepseek"]


async def test_selected_provider_with_open_circuit_falls_back_without_calling_it(
    scripted: dict[str, ScriptedProvider],
) -> None:
    router = Router()
    with override_settings(CIRCUIT_FAILURE_THRESHOLD=1):
        await router.circuit.record_failure("openai")
        trace = RouteTrace()
        events = await collect(router, route_request(await entry("gpt-4o-mini")), trace)

    assert events[0] == Start("claude", "claude-haiku-4-5")
    assert calls(scripted) == {"claude": 1}
    assert trace.tried == ["claude"] and trace.fallback_path == []


def test_get_router_is_one_instance() -> None:
    assert get_router() is get_router()


# --- through the real SDK clients and the sandbox upstream over HTTP ---------------------------


@pytest.fixture
def live(sandbox: SandboxState) -> Iterator[SandboxState]:
    """Every provider is its real SDK client talking to the sandbox; fast router settings."""
    with isolated_router_state(), override_settings(**FAST):
        yield sandbox


def chat_calls(sandbox: SandboxState, provider: str) -> list[str]:
    """The models of the provider's generate calls the sandbox saw (model listings excluded)."""
    return [r.model for r in sandbox.calls(provider) if "models" not in r.path or ":" in r.path]


async def test_sandbox_serves_with_the_real_client(live: SandboxState) -> None:
    trace = RouteTrace()
    events = await collect(Router(), route_request(await entry("gpt-4o-mini"), text="hi [[tokens:3]]"), trace)
    assert events[0] == Start("openai", "gpt-4o-mini")
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "".join(reply_tokens("hi [[tokens:3]]", 3))
    assert isinstance(events[-2], Usage) and events[-2].input_tokens > 0
    assert isinstance(events[-1], Finish) and trace.attempts == 1
    assert chat_calls(live, "openai") == ["gpt-4o-mini"]
    for _ in range(100):  # the server counts the stream when its body generator ends, just after the last byte
        if live.completed_streams:
            break
        await asyncio.sleep(0.01)
    assert live.completed_streams == 1 and live.aborted_streams == 0


@pytest.mark.parametrize(
    "marker",
    [
        "[[fail:503@openai]]",
        "[[fail:500@openai]]",
        "[[fail:529@openai]]",
        "[[fail:429@openai]] [[retry-after:none]]",
        "[[fail:conn@openai]]",
        "[[drop:0@openai]]",
    ],
    ids=["503", "500", "529", "429-no-retry-after", "conn-cut", "drop-before-first-token"],
)
async def test_sandbox_retryable_faults_retry_then_fall_back(live: SandboxState, marker: str) -> None:
    trace = RouteTrace()
    events = await collect(Router(), route_request(await entry("gpt-4o-mini"), text=f"hello {marker}"), trace)

    assert [e for e in events if isinstance(e, Start)] == [Start("claude", "claude-haiku-4-5")]
    assert len(chat_calls(live, "openai")) == 3 and len(chat_calls(live, "claude")) == 1
    assert trace.attempts == 4 and trace.fallback_path == ["openai"]


async def test_sandbox_retry_after_is_honoured(live: SandboxState) -> None:
    trace = RouteTrace()
    started = time.monotonic()
    with override_settings(ENABLE_FALLBACK=False):
        events = await collect(
            Router(), route_request(await entry("deepseek-chat"), text="hi [[fail:429*1]] [[retry-after:1]]"), trace
        )
    elapsed = time.monotonic() - started

    assert events[0] == Start("deepseek", "deepseek-chat")
    assert len(chat_calls(live, "deepseek")) == 2 and trace.attempts == 2
    assert 1.0 <= elapsed < 4.0


async def test_sandbox_connection_refused_falls_back(live: SandboxState) -> None:
    with override_settings(GEMINI_BASE_URL="http://127.0.0.1:9"):
        registry.reset()
        trace = RouteTrace()
        events = await collect(
            Router(), route_request(await entry("gemini-2.5-flash"), allowed={"gemini", "deepseek"}), trace
        )
    assert events[0] == Start("deepseek", "deepseek-chat")
    assert trace.attempts == 4 and trace.tried == ["gemini", "deepseek"]


async def test_sandbox_hang_past_first_token_timeout(live: SandboxState) -> None:
    trace = RouteTrace()
    started = time.monotonic()
    with override_settings(FIRST_TOKEN_TIMEOUT_SECONDS=0.5, MAX_RETRY_ATTEMPTS=2):
        events = await collect(Router(), route_request(await entry("gpt-4o-mini"), text="x [[hang@openai]]"), trace)
    elapsed = time.monotonic() - started

    assert events[0] == Start("claude", "claude-haiku-4-5")
    assert len(chat_calls(live, "openai")) == 2 and trace.attempts == 3
    assert 1.0 <= elapsed < 4.0


@pytest.mark.parametrize(
    ("marker", "error_type"), [("[[fail:400]]", ProviderBadRequest), ("[[fail:policy]]", ContentPolicyError)]
)
async def test_sandbox_final_errors_do_not_retry(
    live: SandboxState, marker: str, error_type: type[ProviderError]
) -> None:
    trace = RouteTrace()
    events, error = await collect_until_error(
        Router(), route_request(await entry("claude-haiku-4-5"), text=f"x {marker}"), trace
    )
    assert isinstance(error, error_type) and events == []
    assert len(live.calls()) == 1 and trace.attempts == 1


async def test_sandbox_context_length_falls_back_to_a_larger_window(live: SandboxState) -> None:
    trace = RouteTrace()
    events = await collect(
        Router(), route_request(await entry("gpt-4"), text="long [[fail:context*1@openai]]", prompt_tokens=9000), trace
    )
    assert events[0] == Start("openai", "gpt-3.5-turbo")
    assert chat_calls(live, "openai") == ["gpt-4", "gpt-3.5-turbo"]


async def test_sandbox_drop_after_deltas_is_reraised_without_fallback(live: SandboxState) -> None:
    trace = RouteTrace()
    events, error = await collect_until_error(
        Router(), route_request(await entry("gpt-4o-mini"), text="x [[drop:2@openai]]"), trace
    )
    assert isinstance(error, ProviderError) and error.retryable
    assert events[0] == Start("openai", "gpt-4o-mini") and len([e for e in events if isinstance(e, Delta)]) >= 1
    assert len(chat_calls(live, "openai")) == 1 and chat_calls(live, "claude") == []
    assert trace.delivered


async def test_sandbox_deadline_is_never_exceeded(live: SandboxState) -> None:
    """Every provider hangs: one 0.5 s attempt each, falling back, until the 1.6 s deadline cuts the last.

    One attempt per provider keeps the fallback reached whatever the machine's speed: openai
    gives up at ~0.5 s and claude at ~1.0 s, so claude is tried even on a slow run.
    """
    for name in ("openai", "claude", "deepseek", "gemini"):
        registry.get(name)  # built before the clock starts: a client's first construction is not what is timed
    trace = RouteTrace()
    started = time.monotonic()
    with (
        override_settings(FIRST_TOKEN_TIMEOUT_SECONDS=0.5, REQUEST_DEADLINE_SECONDS=1.6, MAX_RETRY_ATTEMPTS=1),
        pytest.raises(DeadlineExceeded),
    ):
        await collect(Router(), route_request(await entry("gpt-4o-mini"), text="x [[hang]]"), trace)
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed <= 1.6 + 1.0
    assert trace.tried[:2] == ["openai", "claude"] and len(trace.tried) <= 4


async def test_sandbox_circuit_opens_and_stops_traffic(live: SandboxState) -> None:
    router = Router()
    deepseek = await entry("deepseek-chat")
    with override_settings(CIRCUIT_FAILURE_THRESHOLD=2, MAX_RETRY_ATTEMPTS=1, ENABLE_FALLBACK=False):
        for _ in range(2):
            with pytest.raises(ProviderUnavailable):
                await collect(router, route_request(deepseek, text="x [[fail:503@deepseek]]"))
        for _ in range(3):
            with pytest.raises(AllProvidersFailed):
                await collect(router, route_request(deepseek, text="x [[fail:503@deepseek]]"))
    assert len(chat_calls(live, "deepseek")) == 2


async def _wait_under(watch_budgets: list[float], *, cancelled_from_outside: bool = False) -> tuple[str, float]:
    """Arm a silence watch with each budget in turn (the last one is waited out) and say how it ended."""
    from providers.router import _SilenceWatch

    watch = _SilenceWatch()
    for budget in watch_budgets[:-1]:
        watch.arm(budget)
        watch.disarm()
    watch.arm(watch_budgets[-1])
    if cancelled_from_outside:
        asyncio.get_running_loop().call_soon(asyncio.current_task().cancel)  # type: ignore[union-attr]
    started = time.monotonic()
    try:
        await asyncio.sleep(2)
    except asyncio.CancelledError:
        return ("silence" if watch.expired() else "cancelled"), time.monotonic() - started
    finally:
        watch.close()
    return "event", time.monotonic() - started


async def test_the_silence_watch_fires_at_the_latest_budget_even_a_shorter_one() -> None:
    verdict, waited = await asyncio.create_task(_wait_under([30, 0.05]))
    assert verdict == "silence" and waited < 1


async def test_the_silence_watch_leaves_a_cancellation_from_outside_as_it_is() -> None:
    verdict, _ = await asyncio.create_task(_wait_under([0], cancelled_from_outside=True))
    assert verdict == "cancelled"


@pytest.mark.parametrize(
    "options", [{"temperature": 1.5}, {"stop": ("\n",)}], ids=["temperature-above-claude-max", "whitespace-stop"]
)
async def test_sandbox_fallback_skips_a_provider_that_refuses_the_requests_options(
    live: SandboxState, options: dict[str, Any]
) -> None:
    """Valid for OpenAI, refused by Claude (temperature 0..1, a stop with no visible character):
    falling back to Claude would turn the client's valid request into a 400; the next one serves it."""
    trace = RouteTrace()
    request = dataclasses.replace(
        route_request(await entry("gpt-4o-mini"), text="x [[fail:503@openai]] [[tokens:3]]"), **options
    )

    events = await collect(Router(), request, trace)

    assert events[0] == Start("deepseek", "deepseek-chat")
    assert chat_calls(live, "claude") == []
    assert trace.fallback_path == ["openai"]


def test_the_router_settings_are_read_once_and_again_when_a_setting_changes() -> None:
    from providers.router import RouterSettings

    with override_settings(FALLBACK_ORDER="claude, gemini", MAX_RETRY_ATTEMPTS=2):
        first = RouterSettings.current()
        assert (first.fallback_order, first.max_attempts) == (("claude", "gemini"), 2)
        assert RouterSettings.current() is first  # read once, not per request
        with override_settings(MAX_RETRY_ATTEMPTS=5):
            assert RouterSettings.current().max_attempts == 5
        assert RouterSettings.current().max_attempts == 2  # the override ended: back to the outer value
    assert RouterSettings.current().fallback_order != ("claude", "gemini")
