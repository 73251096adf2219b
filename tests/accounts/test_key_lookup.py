"""The API-key lookup on the async path: a cache miss shared by the requests that meet it together."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from accounts import selectors
from accounts.selectors import api_key_aauthenticate, key_cache
from chatservice.db import db_async

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def counted_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every database lookup `api_key_aauthenticate` makes, each held a moment (as a query under load is)."""
    calls: list[str] = []
    lock = threading.Lock()
    lookup = selectors.api_key_authenticate

    def counted(raw_key: str) -> Any:
        with lock:
            calls.append(raw_key)
        threading.Event().wait(0.05)
        return lookup(raw_key)

    monkeypatch.setattr(selectors, "api_key_authenticate", counted)
    return calls


async def test_concurrent_misses_for_one_key_share_one_lookup(
    make_user: Callable[..., tuple[Any, str]], counted_lookups: list[str]
) -> None:
    user, key = await db_async(make_user)("premium")
    _, other_key = await db_async(make_user)("free")
    principals = await asyncio.gather(*(api_key_aauthenticate(k) for k in [key] * 50 + [other_key] * 5))
    assert {p.user_id for p in principals[:50] if p is not None} == {user.pk}
    assert all(p is not None and p.plan == "free" for p in principals[50:])
    assert sorted(counted_lookups) == sorted([key, other_key])  # one lookup per key, not 55

    assert await api_key_aauthenticate(key) is principals[0]  # cached now: no lookup
    key_cache.clear()  # the entry expires: the next miss looks the key up again
    assert (await api_key_aauthenticate(key)) == principals[0] and counted_lookups.count(key) == 2


async def test_an_unknown_key_is_refused_to_every_request_sharing_its_lookup(
    make_user: Callable[..., tuple[Any, str]], counted_lookups: list[str]
) -> None:
    _, key = await db_async(make_user)("premium")
    forged = key[:-4] + "xxxx"
    results = await asyncio.gather(*(api_key_aauthenticate(forged) for _ in range(20)))
    assert results == [None] * 20 and counted_lookups == [forged]
    assert await api_key_aauthenticate(forged) is None and counted_lookups == [forged, forged]  # never cached


async def test_a_request_that_leaves_does_not_cancel_the_lookup_of_the_others(
    make_user: Callable[..., tuple[Any, str]], counted_lookups: list[str]
) -> None:
    user, key = await db_async(make_user)("premium")
    leaving = asyncio.ensure_future(api_key_aauthenticate(key))
    staying = asyncio.ensure_future(api_key_aauthenticate(key))
    await asyncio.sleep(0.01)
    leaving.cancel()  # a client that disconnects while its key is looked up
    principal = await staying
    assert principal is not None and principal.user_id == user.pk and counted_lookups == [key]
    assert leaving.cancelled()
