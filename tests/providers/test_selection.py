"""Model selection: explicit models within the plan, auto-selection, health, the code detector."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from decimal import Decimal
from unittest.mock import patch

import pytest
from django.test import override_settings

import providers.catalog
from accounts.principal import Principal
from chatservice.db import db_async
from chatservice.errors import ServiceError
from providers.catalog import CatalogEntry, _Catalog, acatalog_entries, catalog_cache
from providers.circuit import get_circuit
from providers.models import LLMModel
from providers.options import NO_OPTIONS, RequestOptions
from providers.selection import code_score, looks_like_code, select_model
from tests.providers.scripted import isolated_router_state

ALL = frozenset({"openai", "claude", "deepseek", "gemini"})


@pytest.fixture(autouse=True)
def _state() -> Iterator[None]:
    with isolated_router_state(), override_settings(DEFAULT_LLM="openai", LONG_CONVERSATION_TOKENS=8000):
        yield


def principal(plan: str = "premium") -> Principal:
    allowed = frozenset({"deepseek", "gemini"}) if plan == "free" else ALL
    return Principal(
        user_id=1,
        username="u",
        is_staff=False,
        plan=plan,
        priority={"free": 0, "premium": 1, "enterprise": 2}[plan],
        allowed_providers=allowed,
        requests_per_hour=100,
        tokens_per_day=10_000,
        api_key_id=None,
    )


async def select(
    *,
    requested: str | None = None,
    plan: str = "premium",
    message: str = "Hello there",
    history: int = 0,
    options: RequestOptions = NO_OPTIONS,
) -> tuple[CatalogEntry, str, bool]:
    selection = await select_model(
        requested=requested,
        principal=principal(plan),
        user_message=message,
        history_tokens=history,
        entries=await acatalog_entries(),
        options=options,
    )
    return selection.entry, selection.reason, selection.explicit


async def set_maintenance(name: str) -> None:
    await db_async(LLMModel.objects.filter(name=name).update)(maintenance=True)
    catalog_cache.invalidate()


async def open_circuit(provider: str) -> None:
    with override_settings(CIRCUIT_FAILURE_THRESHOLD=1):
        await get_circuit().record_failure(provider)


# --- explicit ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_explicit_model_is_honoured() -> None:
    entry, reason, explicit = await select(requested="claude-sonnet-4", message="def f(): pass")
    assert (entry.name, reason, explicit) == ("claude-sonnet-4", "requested", True)


@pytest.mark.django_db(transaction=True)
async def test_provider_name_means_its_default_model() -> None:
    entry, _, explicit = await select(requested="gemini", plan="free")
    assert entry.name == "gemini-2.5-flash" and explicit


@pytest.mark.django_db(transaction=True)
async def test_unknown_model_is_400() -> None:
    with pytest.raises(ServiceError) as caught:
        await select(requested="gpt-17")
    assert caught.value.status == 400 and caught.value.code == "unknown_model"


@pytest.mark.django_db(transaction=True)
async def test_model_outside_the_plan_is_403_with_what_is_allowed() -> None:
    with pytest.raises(ServiceError) as caught:
        await select(requested="gpt-4o", plan="free")
    err = caught.value
    assert (err.status, err.code) == (403, "model_not_allowed")
    assert err.details["plan"] == "free"
    assert err.details["allowed_providers"] == ["deepseek", "gemini"]
    assert "deepseek-chat" in err.details["allowed_models"] and "gpt-4o" not in err.details["allowed_models"]


@pytest.mark.django_db(transaction=True)
async def test_explicit_model_in_maintenance_is_503() -> None:
    await set_maintenance("gpt-4o")
    with pytest.raises(ServiceError) as caught:
        await select(requested="gpt-4o")
    assert (caught.value.status, caught.value.code) == (503, "model_unavailable")


# --- auto-selection ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_code_goes_to_deepseek() -> None:
    entry, reason, explicit = await select(message="Why does this fail?\n```python\nprint(1/0)\n```")
    assert (entry.provider, reason, explicit) == ("deepseek", "code detected", False)


@pytest.mark.django_db(transaction=True)
async def test_long_conversation_goes_to_claude() -> None:
    entry, reason, _ = await select(history=9120)
    assert entry.provider == "claude" and reason == "long conversation (9120 tokens)"


@pytest.mark.django_db(transaction=True)
async def test_free_plan_defaults_to_deepseek() -> None:
    entry, reason, _ = await select(plan="free")
    assert entry.name == "deepseek-chat" and reason == "free plan default"


@pytest.mark.django_db(transaction=True)
async def test_otherwise_the_default_llm() -> None:
    entry, reason, _ = await select()
    assert entry.name == "gpt-4o-mini" and reason == "default model"
    with override_settings(DEFAULT_LLM="gpt-4.1"):
        assert (await select())[0].name == "gpt-4.1"
        await set_maintenance("gpt-4.1")
        entry, reason, _ = await select()
        assert entry.name == "gpt-4o-mini" and reason == "default model; gpt-4.1 unavailable, using gpt-4o-mini"
    with override_settings(DEFAULT_LLM="claude"):
        assert (await select())[0].name == "claude-haiku-4-5"


@pytest.mark.django_db(transaction=True)
async def test_preference_outside_the_plan_moves_to_an_allowed_one() -> None:
    entry, reason, _ = await select(plan="free", history=50_000)
    assert entry.provider == "gemini"  # the free plan has no claude; gemini holds long contexts
    assert reason == "long conversation (50000 tokens); claude not in plan, using gemini"


@pytest.mark.django_db(transaction=True)
async def test_open_circuit_moves_to_the_next_healthy_provider() -> None:
    await open_circuit("deepseek")
    entry, reason, _ = await select(message='Traceback (most recent call last):\n  File "a.py", line 1')
    assert entry.provider == "openai"
    assert reason == "code detected; deepseek unavailable, using openai"


@pytest.mark.django_db(transaction=True)
async def test_default_in_maintenance_is_skipped() -> None:
    await set_maintenance("gpt-4o-mini")
    entry, reason, _ = await select()
    assert entry.provider == "claude" and "openai unavailable" in reason


@pytest.mark.django_db(transaction=True)
async def test_no_healthy_allowed_provider_is_503_with_retry_after() -> None:
    await open_circuit("deepseek")
    await set_maintenance("gemini-2.5-flash")
    with pytest.raises(ServiceError) as caught:
        await select(plan="free")
    err = caught.value
    assert (err.status, err.code) == (503, "no_provider_available")
    assert 1 <= int(err.headers["Retry-After"]) <= 30


# --- options some models refuse -----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("options", "field"),
    [(RequestOptions(temperature=1.5), "temperature"), (RequestOptions(stop=("\n",)), "stop")],
    ids=["temperature-above-claude-max", "whitespace-stop"],
)
async def test_a_long_conversation_goes_past_claude_when_claude_would_refuse_the_options(
    options: RequestOptions, field: str
) -> None:
    """Valid elsewhere, refused by Anthropic: the client named no model, so one that takes them serves."""
    entry, reason, explicit = await select(history=9120, options=options)
    assert (entry.name, explicit) == ("gemini-2.5-flash", False)
    assert reason == f"long conversation (9120 tokens); claude refuses this {field}, using gemini"


@pytest.mark.django_db(transaction=True)
async def test_max_tokens_above_the_preferred_models_output_goes_to_one_that_gives_it() -> None:
    code = "Why does this fail?\n```python\nprint(1/0)\n```"
    entry, reason, _ = await select(message=code, options=RequestOptions(max_tokens=10_000))
    assert entry.name == "gpt-4o-mini"  # deepseek-chat gives at most 8192
    assert reason == "code detected; deepseek refuses this max_tokens, using openai"
    entry, reason, _ = await select(options=RequestOptions(max_tokens=20_000))
    assert entry.name == "claude-haiku-4-5"  # gpt-4o-mini gives at most 16384
    assert reason == "default model; openai refuses this max_tokens, using claude"


@pytest.mark.django_db(transaction=True)
async def test_a_conversation_longer_than_every_window_goes_to_the_largest_that_takes_the_options() -> None:
    await open_circuit("gemini")
    entry, reason, _ = await select(history=1_100_000, options=RequestOptions(temperature=1.5))
    assert entry.name == "gpt-4o-mini"  # not claude-haiku-4-5, whose 200k window is larger
    assert reason == (
        "long conversation (1100000 tokens); no allowed model taking the options holds it all, "
        "using gpt-4o-mini with the most recent history"
    )


@pytest.mark.django_db(transaction=True)
async def test_options_no_allowed_model_takes_leave_the_choice_as_without_them() -> None:
    """The caller then refuses them for the chosen model, as it does for that model asked for by name."""
    entry, reason, _ = await select(history=9120, options=RequestOptions(temperature=1.5, max_tokens=100_000))
    assert (entry.name, reason) == ("claude-haiku-4-5", "long conversation (9120 tokens)")
    entry, reason, explicit = await select(requested="claude", options=RequestOptions(temperature=1.5))
    assert (entry.name, reason, explicit) == ("claude-haiku-4-5", "requested", True)


# --- the code detector -------------------------------------------------------------------------

CODE = [
    "```python\nprint('hi')\n```",
    "def add(a, b):\n    return a + b\nwhy does this fail?",
    'Traceback (most recent call last):\n  File "app.py", line 3, in <module>\n    x = foo()',
    "I get TypeError: unsupported operand type(s) for +: 'int' and 'str' when I run it",
    "$ npm install react\nnpm ERR! code ERESOLVE",
    "for (int i = 0; i < n; i++) {\n  sum += a[i];\n}",
    "const x = arr.map(v => v * 2);",
    "SELECT name FROM users WHERE id = 3;",
    "why does `os.path.join(a, b)` return a relative path?",
    'Exception in thread "main" java.lang.NullPointerException\n    at com.example.App.main(App.java:14)',
    '#include <stdio.h>\nint main() { printf("hi"); return 0; }',
    "My config.yaml has `replicas: 3` but the pod count stays at 1",
    "git push origin main\nerror: failed to push some refs",
    "thread 'main' panicked at 'index out of bounds', src/main.rs:4:5",
]
PROSE = [
    "Hello, how are you today?",
    "I'm learning Python and I love it. What books would you recommend?",
    "Can you explain what a function is in Python, in simple terms?",
    "Write a poem about the sea (in the style of Neruda), please.",
    "I'm comparing Node.js and Deno for a new project; which community is bigger?",
    "Make sure you bring the tickets, the passports and the snacks.",
    "The python in the zoo escaped yesterday; was anyone hurt?",
    "Error: I forgot my password. How do I reset it?",
    "I called the function of the committee into question during the meeting.",
    "Let me know what you think: is 5 = 5 always true?",
    "For (a few) reasons I prefer tea.\nfor example:\n- it is warm\n- it is cheap",
    "Summarize the history of the Java programming language and its class libraries.",
]


@pytest.mark.parametrize("text", CODE)
def test_detects_code(text: str) -> None:
    assert looks_like_code(text), code_score(text)


@pytest.mark.parametrize("text", PROSE)
def test_prose_is_not_code(text: str) -> None:
    assert not looks_like_code(text), code_score(text)


@pytest.mark.django_db(transaction=True)
async def test_the_catalog_is_never_read_from_the_event_loop_when_it_goes_stale_mid_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cache's age is looked at once: a cache that is fresh when the call looks, and stale a
    moment later, is served as it is, never re-read with a query on the event loop (which Django
    refuses with SynchronousOnlyOperation, a 500 under load)."""
    loaded = await acatalog_entries()  # read and cached (the first read goes to a thread)
    ages = iter([1.9])  # seconds since the read at the first look at the clock; 2.1 at any later one
    read_at = catalog_cache._loaded_at
    with monkeypatch.context() as patch:
        patch.setattr(catalog_cache, "clock", lambda: read_at + next(ages, 2.1))
        served = await acatalog_entries()
        assert next(ages, None) is None  # the clock was looked at
    assert served == loaded


def _entry(name: str) -> CatalogEntry:
    return CatalogEntry(
        name, "openai", name, 128_000, 16_384, Decimal("1"), Decimal("0.5"), Decimal("2"),
        True, False, True, False,
    )  # fmt: skip


async def test_a_stale_catalog_is_re_read_once_while_the_requests_that_find_it_stale_keep_being_served() -> None:
    """A burst of requests finding the catalog stale: one re-read, in a thread; the others are
    served the entries in hand meanwhile, rather than each re-reading it (a query each) or
    queuing behind the one that does."""
    now = [0.0]
    started, release = threading.Event(), threading.Event()
    reads: list[int] = []

    def loader() -> tuple[CatalogEntry, ...]:
        reads.append(len(reads))
        if len(reads) > 1:  # the re-read holds on until the burst has been served
            started.set()
            assert release.wait(5)
        return (_entry(f"m{len(reads)}"),)

    catalog = _Catalog(ttl=2.0, clock=lambda: now[0], loader=loader)
    with patch.object(providers.catalog, "catalog_cache", catalog):
        assert [e.name for e in await acatalog_entries()] == ["m1"]  # the first read is waited for
        now[0] = 3.0  # stale
        first = asyncio.ensure_future(acatalog_entries())  # re-reads
        assert await asyncio.to_thread(started.wait, 5)
        burst = await asyncio.wait_for(asyncio.gather(*(acatalog_entries() for _ in range(20))), 5)
        assert {tuple(e.name for e in entries) for entries in burst} == {("m1",)}
        release.set()
        assert [e.name for e in await first] == ["m2"]
        assert [e.name for e in await acatalog_entries()] == ["m2"]  # fresh again: no read
    assert len(reads) == 2


async def test_after_invalidate_the_next_request_waits_for_the_re_read() -> None:
    reads: list[int] = []

    def loader() -> tuple[CatalogEntry, ...]:
        reads.append(len(reads))
        return (_entry(f"m{len(reads)}"),)

    catalog = _Catalog(loader=loader)
    with patch.object(providers.catalog, "catalog_cache", catalog):
        assert [e.name for e in await acatalog_entries()] == ["m1"]
        assert [e.name for e in await acatalog_entries()] == ["m1"]
        catalog.invalidate()
        assert [e.name for e in await acatalog_entries()] == ["m2"]
    assert len(reads) == 2


async def test_a_failing_re_read_keeps_the_catalog_in_hand(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    results: list[tuple[CatalogEntry, ...] | Exception] = [(_entry("m1"),), RuntimeError("database down")]

    def loader() -> tuple[CatalogEntry, ...]:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    catalog = _Catalog(ttl=2.0, clock=lambda: now[0], loader=loader)
    with patch.object(providers.catalog, "catalog_cache", catalog):
        assert [e.name for e in await acatalog_entries()] == ["m1"]
        now[0] = 3.0
        assert [e.name for e in await acatalog_entries()] == ["m1"]  # the re-read failed: kept
        assert catalog.fresh() is not None  # for another period, not re-read on every request
    assert "re-reading the model catalog failed" in caplog.text


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("plan", ["premium", "free"])
async def test_a_conversation_longer_than_every_window_goes_to_the_largest_one(plan: str) -> None:
    """The prompt keeps the most recent history that fits, so a longer conversation is served, not refused."""
    entry, reason, _ = await select(plan=plan, history=1_100_000)
    assert entry.name == "gemini-2.5-flash"
    assert reason == (
        "long conversation (1100000 tokens); no allowed model holds it all, "
        "using gemini-2.5-flash with the most recent history"
    )
    await open_circuit("gemini")
    entry, _, _ = await select(plan=plan, history=1_100_000)
    assert entry.name == ("claude-haiku-4-5" if plan == "premium" else "deepseek-chat")


@pytest.mark.django_db(transaction=True)
async def test_a_message_longer_than_the_default_models_window_goes_to_one_that_holds_it() -> None:
    """100,000 CJK characters are ~177k tokens: more than gpt-4o-mini's 128k window, within Claude's."""
    selection = await select_model(
        requested=None,
        principal=principal(),
        user_message="long document",
        history_tokens=0,
        entries=await acatalog_entries(),
        message_tokens=176_807,
    )
    assert selection.entry.name == "claude-haiku-4-5"
    assert selection.reason == "default model; openai too small, using claude"
