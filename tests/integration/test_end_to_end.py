"""Each provider through the running service: JSON, SSE, WebSocket, usage and cost, fallback, auth.

The checks are about the contract, not wording, so the same tests run against the sandbox
(`--mock`, the default) and the real providers (`--api-keys`).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import pytest

from providers.base import ChatMessage, ProviderAuthError, ProviderRequest, Usage
from providers.catalog import acatalog_entries, catalog_entries, resolve_model
from providers.pricing import Prices, cost_of
from providers.registry import build_provider, provider_config
from tests.chat.clients import sse_chat, ws_chat
from tests.integration.conftest import CHEAP_MODELS, MAX_TOKENS, Mode
from usage.models import UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)
PROVIDERS = list(CHEAP_MODELS)


def ask(provider: str) -> dict:
    return {"message": "Say hello in three words.", "model": CHEAP_MODELS[provider], "max_tokens": MAX_TOKENS}


def assert_billed_right(body: dict, record: UsageRecord) -> None:
    assert str(record.request_id) == body["request_id"] and record.status == "ok"
    assert record.usage_source == "provider"
    assert (record.input_tokens, record.output_tokens) == (body["input_tokens"], body["output_tokens"])
    assert record.output_tokens > 0 and record.input_tokens > 0
    entry = resolve_model(catalog_entries(), record.model)
    usage = Usage(record.input_tokens, record.output_tokens, record.cached_input_tokens)
    assert record.cost == cost_of(usage, Prices.of(entry))
    assert (record.input_price, record.output_price) == (entry.input_price, entry.output_price)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_non_streaming(service_url, sandbox, make_user, mode: Mode, provider) -> None:
    mode.require(provider)
    _, key = make_user("enterprise")
    response = httpx.post(
        f"{service_url}/chat", json=ask(provider), headers={"Authorization": f"Bearer {key}"}, timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["provider"] == provider and body["message"].strip()
    assert_billed_right(body, UsageRecord.objects.get())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sse_deltas_join_to_the_final_text(service_url, sandbox, make_user, mode: Mode, provider) -> None:
    mode.require(provider)
    _, key = make_user("enterprise")
    got = sse_chat(service_url, key, ask(provider))
    assert got.names()[0] == "start" and got.names()[-1] == "done", got.events
    done = got.last()
    assert got.text() == done["message"] and done["message"].strip()
    assert_billed_right(done, UsageRecord.objects.get())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_websocket(service_url, sandbox, make_user, mode: Mode, provider) -> None:
    mode.require(provider)
    _, key = make_user("enterprise")
    got = asyncio.run(ws_chat(service_url, key, ask(provider)))
    assert got.names()[-1] == "done", got.events
    assert got.text() == got.last()["message"]
    record = UsageRecord.objects.get()
    assert record.transport == "websocket" and record.status == "ok" and record.output_tokens > 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_usage_reports_what_the_ledger_holds(service_url, sandbox, make_user, mode: Mode, provider) -> None:
    mode.require(provider)
    _, key = make_user("enterprise")
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(2):
        assert httpx.post(f"{service_url}/chat", json=ask(provider), headers=headers, timeout=60).status_code == 200
    usage = httpx.get(f"{service_url}/usage", headers=headers, timeout=30).json()
    records = list(UsageRecord.objects.all())
    assert usage["requests"] == 2
    assert usage["input_tokens"] == sum(r.input_tokens for r in records)
    assert usage["output_tokens"] == sum(r.output_tokens for r in records)
    assert Decimal(usage["cost"]) == sum((r.cost for r in records), Decimal(0))
    assert [row["provider"] for row in usage["by_provider"]] == [provider]


@pytest.mark.parametrize("provider", ["openai", "claude"])
def test_fallback_when_the_first_provider_fails(service_url, sandbox, make_user, mode: Mode, provider) -> None:
    if mode.real:
        pytest.skip("failures are injected with sandbox fault markers: --mock only")
    _, key = make_user("enterprise")
    body = {"message": f"hello [[fail:503@{provider}]]", "model": provider}
    response = httpx.post(f"{service_url}/chat", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["fallback_path"] == [provider] and answer["provider"] != provider
    record = UsageRecord.objects.get()
    assert record.fallback_path == [provider] and record.provider == answer["provider"]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_invalid_key_maps_to_the_auth_error(sandbox, mode: Mode, provider) -> None:
    mode.require(provider)
    config = provider_config(provider)
    client = build_provider(type(config)(provider, "invalid-key-for-test", config.base_url, config.sandboxed))
    entry = resolve_model(await acatalog_entries(), CHEAP_MODELS[provider])
    request = ProviderRequest(model=entry.upstream_model, messages=(ChatMessage("user", "hi"),), max_tokens=MAX_TOKENS)
    with pytest.raises(ProviderAuthError):
        async for _ in client.stream(request):
            pass
