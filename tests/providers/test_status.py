"""Live model status from real traffic, the status endpoint, and the checkproviders command."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from django.core.management import call_command
from django.test import AsyncRequestFactory, override_settings

from chatservice.db import db_async
from providers.base import ProviderAuthError, ProviderUnavailable
from providers.catalog import PROVIDERS, acatalog_entries, catalog_cache
from providers.circuit import SharedRedis, get_circuit
from providers.models import LLMModel
from providers.registry import registry
from providers.router import Router
from providers.routing_types import RouteTrace
from providers.sandbox.faults import SandboxState
from providers.status import FLUSH_SECONDS, StatusStore, get_status_store, model_status
from providers.views import model_status_view
from tests.providers.scripted import (
    ScriptedProvider,
    collect,
    collect_until_error,
    fail,
    isolated_router_state,
    reply,
    route_request,
)
from tests.redis_proxy import RedisProxy

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def scripted() -> Iterator[dict[str, ScriptedProvider]]:
    providers = {name: ScriptedProvider(name) for name in PROVIDERS}
    for name, provider in providers.items():
        registry.override(name, provider)
    with isolated_router_state(), override_settings(RETRY_DELAY_SECONDS=0, CIRCUIT_FAILURE_THRESHOLD=100):
        yield providers


async def test_status_shows_the_error_rate_and_latency_of_real_traffic(
    scripted: dict[str, ScriptedProvider],
) -> None:
    scripted["openai"].push(
        fail(ProviderUnavailable, status=503),
        fail(ProviderUnavailable, status=503),
        reply("slow", first_delay=0.25),
        reply("slow", first_delay=0.25),
    )
    gpt = next(e for e in await acatalog_entries() if e.name == "gpt-4o-mini")
    router = Router()
    await collect(router, route_request(gpt))  # two failed attempts, then one that answers after 0.25 s
    await collect(router, route_request(gpt))

    status = await model_status("gpt-4o-mini")

    assert status["provider"] == "openai" and status["model"] == "gpt-4o-mini"
    assert status["error_rate"] == pytest.approx(0.5)  # 2 of 4 attempts failed
    assert status["status"] == "degraded"
    assert 0.1 <= status["response_time_avg"] < 1.0  # (0 + 0 + 0.25 + 0.25) / 4, failures were instant
    assert datetime.fromisoformat(status["last_check"]).tzinfo is not None


async def test_healthy_traffic_is_online_and_no_traffic_has_no_last_check(
    scripted: dict[str, ScriptedProvider],
) -> None:
    entry = next(e for e in await acatalog_entries() if e.name == "deepseek-chat")
    assert (await model_status("deepseek-chat"))["last_check"] is None
    for _ in range(3):
        await collect(Router(), route_request(entry))

    status = await model_status("deepseek")  # a provider name means its default model

    assert status == {
        "provider": "deepseek",
        "model": "deepseek-chat",
        "status": "online",
        "response_time_avg": status["response_time_avg"],
        "error_rate": 0.0,
        "last_check": status["last_check"],
    }
    assert status["last_check"] is not None and status["response_time_avg"] < 0.5


async def test_open_circuit_is_offline(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["claude"].default = fail(ProviderAuthError, "bad key", status=401)
    entry = next(e for e in await acatalog_entries() if e.name == "claude-haiku-4-5")
    with override_settings(CIRCUIT_FAILURE_THRESHOLD=2):
        for _ in range(2):
            _, error = await collect_until_error(Router(), route_request(entry), trace=RouteTrace())
            assert isinstance(error, ProviderAuthError)  # final, but it counts toward the circuit
        status = await model_status("claude-haiku-4-5")
    assert status["status"] == "offline" and status["error_rate"] == 1.0


async def test_maintenance_is_reported(scripted: dict[str, ScriptedProvider]) -> None:
    await db_async(LLMModel.objects.filter(name="gemini-2.5-pro").update)(maintenance=True)
    catalog_cache.invalidate()
    assert (await model_status("gemini-2.5-pro"))["status"] == "maintenance"
    assert (await model_status("gemini-2.5-flash"))["status"] == "online"


async def test_status_is_shared_between_stores_over_redis() -> None:
    writer, reader = StatusStore(redis=SharedRedis()), StatusStore(redis=SharedRedis())
    await writer.record_call("gemini", "gemini-2.5-flash", ok=True, latency=0.4)
    await writer.record_call("gemini", "gemini-2.5-flash", ok=False, latency=0.2)
    assert (await reader.window("gemini", "gemini-2.5-flash")).calls == 0  # not sent yet: within FLUSH_SECONDS

    for _ in range(100):  # the writer's timer sends them; nothing else here does
        await asyncio.sleep(FLUSH_SECONDS / 2)
        stats = await reader.window("gemini", "gemini-2.5-flash")
        if stats.calls:
            break

    assert (stats.calls, stats.errors) == (2, 1)
    assert stats.response_time_avg == pytest.approx(0.3)
    local = StatusStore(redis=SharedRedis(""))
    assert (await local.window("gemini", "gemini-2.5-flash")).calls == 0


async def test_window_keeps_the_last_calls_only() -> None:
    store = StatusStore(redis=SharedRedis())
    for _ in range(150):
        await store.record_call("openai", "gpt-4o", ok=False, latency=1.0)
    for _ in range(100):
        await store.record_call("openai", "gpt-4o", ok=True, latency=0.1)
    stats = await store.window("openai", "gpt-4o")
    assert stats.calls == 100 and stats.errors == 0


# --- the endpoint ------------------------------------------------------------------------------


async def _get(path_model: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = AsyncRequestFactory().get(f"/models/{path_model}/status", headers=headers or {})
    response = await model_status_view(request, model=path_model)
    return response.status_code, json.loads(response.content)


async def test_endpoint_returns_the_status(make_user: Callable[..., tuple[Any, str]]) -> None:
    _, key = await db_async(make_user)("free")
    status, body = await _get("gpt-4o", {"Authorization": f"Bearer {key}"})
    assert status == 200
    assert set(body) == {"provider", "model", "status", "response_time_avg", "error_rate", "last_check"}
    assert body["model"] == "gpt-4o" and body["status"] == "online"


async def test_endpoint_unknown_model_is_404(make_user: Callable[..., tuple[Any, str]]) -> None:
    _, key = await db_async(make_user)("premium")
    status, body = await _get("gpt-99", {"X-API-Key": key})
    assert status == 404
    assert body["error"]["code"] == "not_found" and body["error"]["details"] == {}


async def test_endpoint_requires_a_key() -> None:
    status, body = await _get("gpt-4o")
    assert status == 401 and body["error"]["code"] == "unauthenticated"


# --- checkproviders ----------------------------------------------------------------------------


def test_checkproviders_probes_each_provider_and_records_it(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["gemini"].list_error = ProviderUnavailable("gemini", "down for a test", status=503)
    out = io.StringIO()

    call_command("checkproviders", stdout=out)

    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 4
    by_provider = {line.split()[0]: line for line in lines}
    assert set(by_provider) == set(PROVIDERS)
    assert "online" in by_provider["openai"] and "1 model " in by_provider["openai"]
    assert "offline" in by_provider["gemini"] and "down for a test" in by_provider["gemini"]

    gemini = asyncio.run(model_status("gemini"))
    openai = asyncio.run(model_status("openai"))
    assert gemini["status"] == "offline" and gemini["last_check"] is not None
    assert openai["status"] == "online" and openai["last_check"] is not None
    check = asyncio.run(get_status_store().last_check("gemini"))
    assert check is not None and not check.ok


def test_checkproviders_never_prints_a_credential(scripted: dict[str, ScriptedProvider], settings: Any) -> None:
    """Its output goes to the container's log every minute: a key in a base URL (Gemini's ?key=,
    a proxy's user:password@) or in an SDK error that quotes the URL is redacted there too."""
    gemini_key, proxy_password = "AIzaSy-probe-canary-51be0d7a93c4", "probe-proxy-pass-7f3a9c2e"
    settings.GEMINI_API_KEY = gemini_key
    settings.GEMINI_BASE_URL = f"https://proxy.example/gemini?key={gemini_key}"
    settings.OPENAI_API_KEY = "sk-probe-canary-c08e6f12ab57"
    settings.OPENAI_BASE_URL = f"https://gateway:{proxy_password}@proxy.example/v1"
    scripted["gemini"].list_error = ProviderUnavailable("gemini", f"refused: {settings.GEMINI_BASE_URL}", status=503)
    out = io.StringIO()

    call_command("checkproviders", "gemini", "openai", stdout=out)

    text = out.getvalue()
    assert "proxy.example" in text and "[REDACTED]" in text
    assert gemini_key not in text and proxy_password not in text


def test_a_successful_call_after_a_failed_probe_brings_the_model_back(scripted: dict[str, ScriptedProvider]) -> None:
    scripted["gemini"].list_error = ProviderUnavailable("gemini", "flaky", status=503)
    call_command("checkproviders", "gemini", stdout=io.StringIO())
    assert asyncio.run(model_status("gemini"))["status"] == "offline"

    async def serve() -> None:
        entry = next(e for e in await acatalog_entries() if e.name == "gemini-2.5-flash")
        await collect(Router(), route_request(entry))

    asyncio.run(serve())
    assert asyncio.run(model_status("gemini"))["status"] == "online"
    assert asyncio.run(get_circuit().snapshot("gemini")).state == "closed"


def test_checkproviders_against_the_sandbox_with_the_real_clients(sandbox: SandboxState) -> None:
    out = io.StringIO()
    call_command("checkproviders", stdout=out)

    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 4 and all(" online " in line and "(sandbox)" in line for line in lines), lines
    assert {r.provider for r in sandbox.calls()} == set(PROVIDERS)  # one model listing each
    assert all(r.status == 200 for r in sandbox.calls())


async def test_calls_recorded_together_go_to_redis_together() -> None:
    proxy = RedisProxy()
    await proxy.start()
    store, reader = StatusStore(redis=SharedRedis(proxy.url)), StatusStore(redis=SharedRedis())
    assert (await store.window("openai", "gpt-4o")).calls == 0  # connected
    before = proxy.sent

    for i in range(50):
        await store.record_call("openai", "gpt-4o", ok=i % 10 != 0, latency=0.05)
    assert proxy.sent == before  # nothing sent on the request path
    await store.flush()

    assert proxy.sent - before < 5  # one pipeline, not a round trip per call
    stats = await reader.window("openai", "gpt-4o")
    assert (stats.calls, stats.errors) == (50, 5)
    await proxy.stop()


def test_calls_still_pending_when_the_loop_ends_are_sent() -> None:
    store = StatusStore(redis=SharedRedis())

    async def record() -> None:
        await store.record_call("claude", "claude-haiku-4-5", ok=True, latency=0.3)

    asyncio.run(record())  # ends long before FLUSH_SECONDS

    async def read() -> int:
        return (await StatusStore(redis=SharedRedis()).window("claude", "claude-haiku-4-5")).calls

    assert asyncio.run(read()) == 1
