"""Fuzzing the live service: schemathesis against its own OpenAPI schema, hypothesis over hostile text.

Both run against the whole ASGI app on a loopback port (`service_url`), providers on the sandbox.
Bounded for CI: a fixed number of examples per operation, derandomized, so a failure reproduces.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import pytest
import schemathesis
from django.conf import settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from chat.models import Conversation, Message
from chat.schemas import ChatResponse, sanitize
from usage.models import UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)

# Every phase but the stateful one (links between operations are not declared), both positive and
# negative cases. The coverage phase already sends each operation its boundary and mutated cases;
# on top of that a few random ones each. Every response is checked: no 5xx, status documented,
# content type documented, body (and each Server-Sent Event) matching its schema, auth enforced,
# 405 with Allow for undeclared methods, invalid input refused.
FUZZ_CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"mode": "all", "max-examples": 10, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
    }
)
# Not checked: "valid data is accepted". A request can match the schema and still be refused for
# reasons no schema states: an unknown model, another user's conversation id, the content filter.
EXCLUDED_CHECKS = [positive_data_acceptance]


def _generated_schema() -> dict[str, Any]:
    """The document `/schema/` serves (test_live_schema_is_the_fuzzed_one holds them equal)."""
    from drf_spectacular.generators import SchemaGenerator

    return SchemaGenerator().get_schema(request=None, public=True)


schema = schemathesis.openapi.from_dict(_generated_schema(), config=FUZZ_CONFIG)


@pytest.fixture
def fuzz_keys(make_user: Any) -> itertools.cycle[str]:
    """Two enterprise users (every provider allowed, limits far away); each case uses the next."""
    keys = [make_user("enterprise", username=f"fuzz{i}", tokens_per_day_override=10**10)[1] for i in range(2)]
    return itertools.cycle(keys)


def test_live_schema_is_the_fuzzed_one(service_url: str) -> None:
    response = httpx.get(f"{service_url}/schema/", headers={"Accept": "application/json"}, timeout=30)
    assert response.status_code == 200
    served = response.json()
    assert served == _generated_schema()
    ours = {"/chat", "/chat/stream", "/chat/batch", "/v1/chat/completions", "/v1/models", "/v1/models/{model}"}
    assert ours <= served["paths"].keys()


@schema.parametrize()
@hypothesis_settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_schema_conformance(case: Any, fuzz_keys: itertools.cycle[str], service_url: str) -> None:
    auth = None
    if not case.operation.schema.is_security_param_negated(case):  # a case probing auth keeps its own
        auth = {"Authorization": f"Bearer {next(fuzz_keys)}"}
    case.call_and_validate(base_url=service_url, headers=auth, excluded_checks=EXCLUDED_CHECKS, timeout=30)


# --- hostile text on POST /chat ---------------------------------------------------------------

HOSTILE_PIECES = [
    "\x00",  # NUL: Postgres cannot store it
    "\ud800",  # lone surrogates: not encodable as UTF-8
    "\udfff",
    "\udbff\udc00",
    "\u202e",  # bidi overrides and isolates
    "\u202d",
    "\u2066",
    "\u2069",
    "\u200b",  # zero-width space, joiners, word joiner, BOM
    "\u200c",
    "\u200d",
    "\u2060",
    "\ufeff",
    "\x7f",
    "\x85",
    "\x1b[31m",
    "\r\n",
    "\t",
    " ",
    "e\u0301",
    "\U0001f600",
    '\\"',
    "</script>",
    "' OR 1=1 --",
    "%s%n",
    "{{7*7}}",
]
hostile_text = st.lists(st.one_of(st.sampled_from(HOSTILE_PIECES), st.characters()), max_size=30).map("".join)


@st.composite
def hostile_message(draw: st.DrawFn) -> str:
    text = draw(hostile_text)
    size = draw(st.sampled_from(["as is", "as is", "as is", "at the limit", "over the limit"]))
    if size == "at the limit":
        return text + "a" * max(0, settings.MAX_MESSAGE_CHARS - len(text))
    if size == "over the limit":
        return text + "a" * (settings.MAX_MESSAGE_CHARS + 1)
    return text


@st.composite
def hostile_body(draw: st.DrawFn) -> tuple[str, bytes, str | None]:
    """(how it was built, the raw body, the message when the body is well-formed JSON)."""
    how = draw(st.sampled_from(["json", "json", "raw utf-8", "other field", "bytes", "bytes in json"]))
    if how == "bytes":
        return how, draw(st.binary(max_size=300)), None
    if how == "bytes in json":  # invalid UTF-8 (and raw NULs) inside a JSON string
        return how, b'{"message": "' + draw(st.binary(min_size=1, max_size=100)) + b'"}', None
    message = draw(hostile_message())
    if how == "json":  # surrogates and control characters as \u escapes: valid JSON
        # What a JSON reader makes of it (an escaped surrogate pair is one character).
        return how, json.dumps({"message": message, "model": "openai"}).encode(), json.loads(json.dumps(message))
    if how == "raw utf-8":  # characters as they are; a lone surrogate makes the bytes invalid UTF-8
        return how, json.dumps({"message": message}, ensure_ascii=False).encode("utf-8", "surrogatepass"), None
    field = draw(st.sampled_from(["system_prompt", "model", "conversation_id", "temperature"]))
    return how, json.dumps({"message": "Hello", field: message}).encode(), None


def _counts() -> tuple[int, int, int]:
    return UsageRecord.objects.count(), Conversation.objects.count(), Message.objects.count()


@pytest.fixture
def hostile_client(service_url: str, make_user: Any) -> httpx.Client:
    _, key = make_user("enterprise", username="hostile", tokens_per_day_override=10**10)
    return httpx.Client(base_url=service_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_hostile_text_never_breaks_chat(hostile_client: httpx.Client) -> None:
    seen: dict[int, int] = {}

    @given(case=hostile_body())
    @hypothesis_settings(
        max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def one(case: tuple[str, bytes, str | None]) -> None:
        how, body, message = case
        before = _counts()
        response = hostile_client.post("/chat", content=body, headers={"Content-Type": "application/json"})
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (how, body[:200], response.text)
        assert response.headers["content-type"] == "application/json"
        data = response.json()
        if response.status_code == 200:
            assert set(ChatResponse.model_fields) <= data.keys()
            record = UsageRecord.objects.get(request_id=data["request_id"])
            assert record.status == "ok"
            conversation = Conversation.objects.get(id=data["conversation_id"])
            stored = list(conversation.messages.order_by("created_at", "id").values_list("role", "content"))
            assert [role for role, _ in stored] == ["user", "assistant"]
            if message is not None:
                assert stored[0][1] == sanitize(message)  # kept as sent, only control characters removed
            assert _counts() == (before[0] + 1, before[1] + 1, before[2] + 2)
        else:
            assert response.status_code in (400, 413), response.text
            assert data.keys() == {"error"}
            error = data["error"]
            assert isinstance(error["code"], str) and isinstance(error["message"], str)
            assert isinstance(error["details"], dict)
            assert _counts() == before  # refused: nothing written, nothing billed

    one()
    # The run reached both sides: real chats and refusals.
    assert seen.get(200, 0) >= 5 and seen.get(400, 0) >= 5, seen
