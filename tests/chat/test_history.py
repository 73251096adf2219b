"""History over a real socket: the caller's conversations newest first with cursor pages, one
conversation's messages with each reply's model, tokens and cost, deletion that keeps the ledger,
and another user's conversations answered 404 in the JSON error shape."""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.db import connection

from accounts.models import ApiKey
from chat.models import Conversation, Message
from usage.models import UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(url: str, key: str, body: dict[str, object]) -> dict[str, Any]:
    response = httpx.post(f"{url}/chat", json=body, headers=auth(key), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def make_conversations(user, count: int) -> list[Conversation]:
    """`count` conversations with distinct activity times, newest last."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    made = []
    for n in range(count):
        conversation = Conversation.objects.create(user=user, title=f"conversation {n}")
        Message.objects.create(conversation=conversation, role="user", content=f"question {n}")
        # updated_at is auto_now: set it with an UPDATE to fix the order.
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=base + timedelta(minutes=n))
        made.append(conversation)
    return made


def test_a_chat_appears_in_history_with_its_messages_tokens_and_cost(service_url, sandbox, make_user) -> None:
    _, key = make_user("premium")
    first = chat(service_url, key, {"message": "Plan   a trip\nto Lisbon [[tokens:4]]", "model": "openai"})
    second = chat(
        service_url,
        key,
        {"message": "And Porto? [[tokens:3]]", "model": "deepseek", "conversation_id": first["conversation_id"]},
    )

    listing = httpx.get(f"{service_url}/history", headers=auth(key)).json()
    assert listing["next"] is None and listing["previous"] is None
    [row] = listing["results"]
    assert row["id"] == first["conversation_id"]
    assert row["title"] == "Plan a trip to Lisbon [[tokens:4]]"  # the first message, whitespace collapsed
    assert row["message_count"] == 4

    response = httpx.get(f"{service_url}/history/{first['conversation_id']}", headers=auth(key))
    assert response.status_code == 200
    detail = response.json()
    roles = [(m["role"], m["model"]) for m in detail["messages"]]
    assert roles == [("user", ""), ("assistant", "gpt-4o-mini"), ("user", ""), ("assistant", "deepseek-chat")]
    for reply, answer in ((detail["messages"][1], first), (detail["messages"][3], second)):
        record = UsageRecord.objects.get(request_id=answer["request_id"])
        assert reply["request_id"] == answer["request_id"] and reply["content"] == answer["message"]
        assert (reply["input_tokens"], reply["output_tokens"]) == (record.input_tokens, record.output_tokens)
        assert isinstance(reply["cost"], str) and Decimal(reply["cost"]) == record.cost > 0
        assert reply["provider"] == record.provider and reply["incomplete"] is False
    assert detail["messages"][1]["output_tokens"] == 4 and detail["messages"][3]["output_tokens"] == 3


def test_history_is_newest_first_in_cursor_pages_without_gaps(service_url, make_user) -> None:
    user, key = make_user("premium")
    made = make_conversations(user, 7)
    other, _ = make_user("premium")
    make_conversations(other, 2)  # never listed for `user`

    seen: list[str] = []
    url: str | None = f"{service_url}/history?page_size=3"
    pages = 0
    while url is not None and pages < 10:
        page = httpx.get(url, headers=auth(key)).json()
        assert len(page["results"]) <= 3
        seen += [row["id"] for row in page["results"]]
        url = page["next"]
        pages += 1
    assert pages == 3
    assert seen == [str(c.id) for c in reversed(made)]

    second = httpx.get(f"{service_url}/history?page_size=3", headers=auth(key)).json()["next"]
    back = httpx.get(httpx.get(second, headers=auth(key)).json()["previous"], headers=auth(key)).json()
    assert [row["id"] for row in back["results"]] == seen[:3]


def test_a_new_reply_moves_its_conversation_to_the_top(service_url, sandbox, make_user) -> None:
    user, key = make_user("premium")
    older = make_conversations(user, 3)[0]
    Message.objects.filter(conversation=older).delete()
    chat(service_url, key, {"message": "back again", "model": "deepseek", "conversation_id": str(older.id)})
    rows = httpx.get(f"{service_url}/history", headers=auth(key)).json()["results"]
    assert rows[0]["id"] == str(older.id) and rows[0]["message_count"] == 2


def test_delete_removes_the_conversation_and_keeps_the_ledger(service_url, sandbox, make_user) -> None:
    _, key = make_user("premium")
    answer = chat(service_url, key, {"message": "forget me", "model": "deepseek"})
    conversation_id = answer["conversation_id"]

    response = httpx.delete(f"{service_url}/history/{conversation_id}", headers=auth(key))
    assert response.status_code == 204
    assert not Conversation.objects.filter(id=conversation_id).exists()
    assert not Message.objects.filter(conversation_id=conversation_id).exists()
    record = UsageRecord.objects.get(request_id=answer["request_id"])
    assert str(record.conversation_id) == conversation_id and record.cost > 0

    again = httpx.get(f"{service_url}/history/{conversation_id}", headers=auth(key))
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"
    assert httpx.delete(f"{service_url}/history/{conversation_id}", headers=auth(key)).status_code == 404
    assert httpx.get(f"{service_url}/history", headers=auth(key)).json()["results"] == []


def test_deleting_a_conversation_while_its_reply_streams_keeps_the_whole_ledger_row(
    service_url, sandbox, make_user
) -> None:
    """The DELETE wins; the stream still ends with done and its record is written in full, its API
    key included: only the exchange is not kept, since the conversation it belonged to is gone."""
    user, key = make_user("premium")
    conversation_id = chat(service_url, key, {"message": "first", "model": "deepseek"})["conversation_id"]
    body = {"message": "second [[tokens:6]] [[slow:150]]", "model": "openai", "conversation_id": conversation_id}
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("POST", f"{service_url}/chat/stream", json=body, headers=auth(key), timeout=30) as stream:
        name = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name == "start":
                    deleted = httpx.delete(f"{service_url}/history/{conversation_id}", headers=auth(key))
                    assert deleted.status_code == 204, deleted.text

    assert events[-1][0] == "done", events
    record = UsageRecord.objects.get(request_id=events[-1][1]["request_id"])
    assert record.api_key_id == ApiKey.objects.get(user=user).pk
    assert (record.status, record.output_tokens, str(record.conversation_id)) == ("ok", 6, conversation_id)
    assert record.cost > 0
    assert not Conversation.objects.filter(id=conversation_id).exists()
    assert not Message.objects.filter(conversation_id=conversation_id).exists()


PAUSE_LOCK = 4242  # an advisory lock the test holds to stop a DELETE between its two statements


@contextlib.contextmanager
def deletes_of_messages_paused() -> Iterator[None]:
    """Every DELETE of messages waits, after deleting them and in its transaction, until the block
    ends: the moment between a conversation's messages and the conversation itself going."""
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION test_pause() RETURNS trigger LANGUAGE plpgsql AS"
            f" $$ BEGIN PERFORM pg_advisory_xact_lock_shared({PAUSE_LOCK}); RETURN NULL; END $$"
        )
        cursor.execute(
            "CREATE TRIGGER test_pause AFTER DELETE ON chat_message FOR EACH STATEMENT EXECUTE FUNCTION test_pause()"
        )
        cursor.execute("SELECT pg_advisory_lock(%s)", [PAUSE_LOCK])
        try:
            yield
        finally:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [PAUSE_LOCK])
            cursor.execute("DROP TRIGGER test_pause ON chat_message")
            cursor.execute("DROP FUNCTION test_pause()")


def lock_waits(advisory: bool) -> int:
    """Sessions of this test database waiting for an advisory lock, or for any other lock."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND (wait_event = 'advisory') = %s",
            [advisory],
        )
        return cursor.fetchone()[0]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_reply_settling_while_its_conversation_is_deleted_neither_fails_the_delete_nor_is_lost(
    service_url, sandbox, make_user
) -> None:
    """A reply whose ledger write lands after the DELETE removed the messages but before it removed
    the conversation: the DELETE is still a 204 and leaves nothing behind, the reply still a 200
    with its usage recorded."""
    user, key = make_user("premium")
    conversation_id = chat(service_url, key, {"message": "first", "model": "deepseek"})["conversation_id"]
    body = {"message": "second [[tokens:3]]", "model": "openai", "conversation_id": conversation_id}
    with ThreadPoolExecutor(2) as pool, deletes_of_messages_paused():
        deleted = pool.submit(httpx.delete, f"{service_url}/history/{conversation_id}", headers=auth(key), timeout=30)
        wait_until(lambda: lock_waits(advisory=True) == 1)  # the messages are deleted, the conversation not yet
        answered = pool.submit(httpx.post, f"{service_url}/chat", json=body, headers=auth(key), timeout=30)
        wait_until(lambda: answered.done() or lock_waits(advisory=False) > 0)
    assert deleted.result().status_code == 204, deleted.result().text
    assert answered.result().status_code == 200, answered.result().text
    assert not Conversation.objects.filter(id=conversation_id).exists()
    assert not Message.objects.filter(conversation_id=conversation_id).exists()
    record = UsageRecord.objects.get(request_id=answered.result().json()["request_id"])
    assert (record.status, record.output_tokens) == ("ok", 3)
    assert record.api_key_id == ApiKey.objects.get(user=user).pk


def test_an_empty_reply_keeps_the_conversation_its_response_names(service_url, sandbox, make_user) -> None:
    """A 200 whose reply is empty (the provider answered no text) still names a conversation: it
    exists, holds the exchange, and can be continued, rather than a 404 for an id the reply gave."""
    _, key = make_user("premium")
    first = chat(service_url, key, {"message": "say nothing [[tokens:0]]", "model": "openai"})
    assert first["message"] == "" and first["input_tokens"] > 0

    response = httpx.get(f"{service_url}/history/{first['conversation_id']}", headers=auth(key))
    assert response.status_code == 200, response.text
    messages = response.json()["messages"]
    assert [(m["role"], m["content"], m["incomplete"]) for m in messages] == [
        ("user", "say nothing [[tokens:0]]", False),
        ("assistant", "", False),
    ]
    second = chat(
        service_url,
        key,
        {"message": "and now? [[tokens:2]]", "model": "claude", "conversation_id": first["conversation_id"]},
    )
    assert second["conversation_id"] == first["conversation_id"]
    assert httpx.get(f"{service_url}/history", headers=auth(key)).json()["results"][0]["message_count"] == 4


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_another_users_conversation_is_404_like_a_missing_one(service_url, make_user, method) -> None:
    owner, _ = make_user("premium")
    _, intruder_key = make_user("premium")
    [conversation] = make_conversations(owner, 1)
    for target in (conversation.id, uuid.uuid4()):
        response = httpx.request(method, f"{service_url}/history/{target}", headers=auth(intruder_key))
        assert response.status_code == 404
        assert response.json() == {
            "error": {"code": "not_found", "message": "The conversation was not found.", "details": {}}
        }
    assert Conversation.objects.filter(id=conversation.id).exists()


def test_a_conversation_id_is_read_in_any_case_and_a_malformed_one_is_400(service_url, make_user) -> None:
    """A UUID's hex digits are case-insensitive: the id a client sends in upper case (Swift's
    `uuidString`, as chat accepts it) names the same conversation; one that is no UUID is a 400."""
    user, key = make_user("premium")
    [conversation] = make_conversations(user, 1)
    upper = str(conversation.id).upper()
    response = httpx.get(f"{service_url}/history/{upper}", headers=auth(key))
    assert response.status_code == 200, response.text
    assert response.json()["id"] == str(conversation.id)
    for method in ("GET", "DELETE"):
        response = httpx.request(method, f"{service_url}/history/not-a-uuid", headers=auth(key))
        assert response.status_code == 400, response.text
        assert response.json() == {
            "error": {
                "code": "invalid_request",
                "message": "Invalid request: conversation_id: must be a UUID",
                "details": {"fields": {"conversation_id": "must be a UUID"}},
            }
        }
    assert httpx.delete(f"{service_url}/history/{upper}", headers=auth(key)).status_code == 204
    assert not Conversation.objects.filter(id=conversation.id).exists()


def test_history_needs_a_key(service_url) -> None:
    response = httpx.get(f"{service_url}/history")
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthenticated"
    assert httpx.get(f"{service_url}/history/{uuid.uuid4()}").status_code == 401


def _cursor(query: str) -> str:
    return base64.b64encode(query.encode()).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        _cursor("p=garbage"),
        _cursor("o=1&p=x"),
        _cursor("p=" + "9" * 5000),
        _cursor("p=2026-13-45 10:00:00"),
        "not base64 at all",
    ],
)
def test_a_malformed_cursor_is_404_invalid_cursor_not_a_500(service_url, make_user, cursor: str) -> None:
    user, key = make_user("premium")
    make_conversations(user, 2)
    response = httpx.get(f"{service_url}/history", params={"cursor": cursor}, headers=auth(key))
    assert response.status_code == 404, response.text
    assert response.json() == {"error": {"code": "not_found", "message": "Invalid cursor", "details": {}}}


def test_conversations_active_at_the_same_instant_are_each_listed_once(service_url, make_user) -> None:
    user, key = make_user("premium")
    made = make_conversations(user, 7)
    Conversation.objects.filter(user=user).update(updated_at=datetime(2026, 1, 1, tzinfo=UTC))

    seen: list[str] = []
    url: str | None = f"{service_url}/history?page_size=3"
    pages = 0
    while url is not None and pages < 10:
        page = httpx.get(url, headers=auth(key)).json()
        seen += [row["id"] for row in page["results"]]
        url = page["next"]
        pages += 1
    assert sorted(seen) == sorted(str(c.id) for c in made) and len(seen) == 7
