"""Operators change plans, per-user limits and the catalog in Django admin; the next request sees the change.

A staff user logs in with the test client and submits the admin change forms as a browser would
(every field of the rendered form, one changed). The service keeps each key's Principal (plan and
limits included) for API_KEY_CACHE_SECONDS per process, so "the next request" is the next one
after that snapshot expires: immediately with the cache off, within the TTL with it on.
"""

from __future__ import annotations

from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from django.test import Client

from accounts.models import Plan, User
from accounts.selectors import key_cache

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"message": "hello [[tokens:1]]", "model": "openai", "max_tokens": 1}
PASSWORD = "operator-password"


class _FormFields(HTMLParser):
    """The name/value pairs a browser submits for the form with id `form_id` when its `_save` button is clicked."""

    def __init__(self, form_id: str) -> None:
        super().__init__(convert_charrefs=True)
        self.form_id = form_id
        self.inside = False
        self.fields: list[tuple[str, str]] = []
        self._select: tuple[str, bool] | None = None  # name, multiple
        self._options: list[tuple[str, bool]] = []  # value, selected
        self._option: tuple[str | None, bool] | None = None
        self._option_text: list[str] = []
        self._textarea: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.inside = a.get("id") == self.form_id
            return
        name = a.get("name")
        if not self.inside or "disabled" in a:
            return
        if tag == "input" and name:
            kind = (a.get("type") or "text").lower()
            if kind in ("checkbox", "radio"):
                if "checked" in a:
                    self.fields.append((name, a.get("value") or "on"))
            elif kind in ("submit", "button", "image", "reset", "file"):
                if name == "_save":
                    self.fields.append((name, a.get("value") or ""))
            else:
                self.fields.append((name, a.get("value") or ""))
        elif tag == "select" and name:
            self._select, self._options = (name, "multiple" in a), []
        elif tag == "option" and self._select is not None:
            self._option, self._option_text = (a.get("value"), "selected" in a), []
        elif tag == "textarea" and name:
            self._textarea, self._text = name, []

    def handle_data(self, data: str) -> None:
        if self._textarea is not None:
            self._text.append(data)
        elif self._option is not None:
            self._option_text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.inside = False
        elif tag == "option" and self._option is not None:
            value, selected = self._option
            self._options.append((value if value is not None else "".join(self._option_text).strip(), selected))
            self._option = None
        elif tag == "select" and self._select is not None:
            name, multiple = self._select
            chosen = [value for value, selected in self._options if selected]
            if not chosen and not multiple and self._options:
                chosen = [self._options[0][0]]  # a single select submits its first option by default
            self.fields.extend((name, value) for value in chosen)
            self._select = None
        elif tag == "textarea" and self._textarea is not None:
            # The HTML parser drops the newline right after <textarea>, as browsers do.
            self.fields.append((self._textarea, "".join(self._text).removeprefix("\n")))
            self._textarea = None


def admin_save(client: Client, model: str, pk: int, **changes: str) -> None:
    """Open the admin change form of `model` `pk`, change some fields, and save it as a browser would."""
    saved = admin_submit(client, model, pk, **changes)
    errors = saved.context["adminform"].form.errors if saved.status_code == 200 and saved.context else None
    assert saved.status_code == 302, errors


def admin_refused(client: Client, model: str, pk: int, app: str = "accounts", **changes: str) -> dict[str, Any]:
    """Submit the change form as `admin_save` does, expecting it back with errors: returns them by field."""
    refused = admin_submit(client, model, pk, app, **changes)
    assert refused.status_code == 200, refused.status_code
    errors: dict[str, Any] = refused.context["adminform"].form.errors
    assert errors
    return errors


def admin_submit(client: Client, model: str, pk: int, app: str = "accounts", **changes: str) -> Any:
    """Open the admin change form of `model` `pk`, change some fields, and submit it as a browser would."""
    url = f"/admin/{app}/{model}/{pk}/change/"
    page = client.get(url)
    assert page.status_code == 200, page.status_code
    parser = _FormFields(f"{model}_form")
    parser.feed(page.content.decode())
    data: dict[str, list[str]] = {}
    for name, value in parser.fields:
        data.setdefault(name, []).append(value)
    assert "_save" in data and set(changes) <= set(data), sorted(data)
    data.update({name: [value] for name, value in changes.items()})
    return client.post(url, data)


@pytest.fixture
def operator(transactional_db: None) -> Client:
    """The test client, logged in to admin as a staff superuser."""
    User.objects.create_superuser(username="operator", email="ops@example.com", password=PASSWORD)
    client = Client()
    assert client.login(username="operator", password=PASSWORD)
    return client


def chat(url: str, key: str) -> httpx.Response:
    return httpx.post(f"{url}/chat", json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def hourly_quota(url: str, key: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/usage", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200, response.text
    quota: dict[str, Any] = response.json()["quota"]["requests_per_hour"]
    return quota


def test_a_plans_daily_tokens_changed_in_admin_apply_to_the_next_request(
    service_url: str, make_user: Callable[..., tuple[Any, str]], operator: Client, settings: Any
) -> None:
    settings.API_KEY_CACHE_SECONDS = 0  # no snapshot: every request reads the plan
    _, key = make_user("premium")
    premium = Plan.objects.get(name="premium")
    assert chat(service_url, key).status_code == 200

    before = (premium.name, premium.requests_per_hour, premium.allowed_providers, premium.priority)
    admin_save(operator, "plan", premium.pk, tokens_per_day="1")
    premium.refresh_from_db()
    assert premium.tokens_per_day == 1
    assert (premium.name, premium.requests_per_hour, premium.allowed_providers, premium.priority) == before
    refused = chat(service_url, key)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "token_quota_exceeded"
    assert refused.json()["error"]["details"]["limit"] == 1
    assert refused.headers["X-RateLimit-Limit"] == "1"

    admin_save(operator, "plan", premium.pk, tokens_per_day="100000")
    admitted = chat(service_url, key)
    assert admitted.status_code == 200, admitted.text


def test_a_users_hourly_override_changed_in_admin_applies_to_the_next_request(
    service_url: str, make_user: Callable[..., tuple[Any, str]], operator: Client, settings: Any
) -> None:
    settings.API_KEY_CACHE_SECONDS = 0
    user, key = make_user("premium")
    plan_limit = str(user.plan.effective_requests_per_hour)
    for _ in range(2):
        response = chat(service_url, key)
        assert response.status_code == 200 and response.headers["X-RateLimit-Limit"] == plan_limit

    before = (user.plan_id, user.is_active, user.is_staff, user.password, user.tokens_per_day_override)
    admin_save(operator, "user", user.pk, requests_per_hour_override="2")
    user.refresh_from_db()
    assert user.requests_per_hour_override == 2
    assert (user.plan_id, user.is_active, user.is_staff, user.password, user.tokens_per_day_override) == before
    refused = chat(service_url, key)  # a lower limit holds at once: the window already has 2
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert (refused.headers["X-RateLimit-Limit"], refused.headers["X-RateLimit-Remaining"]) == ("2", "0")

    admin_save(operator, "user", user.pk, requests_per_hour_override="3")
    admitted = chat(service_url, key)
    assert admitted.status_code == 200
    assert (admitted.headers["X-RateLimit-Limit"], admitted.headers["X-RateLimit-Remaining"]) == ("3", "0")

    admin_save(operator, "user", user.pk, requests_per_hour_override="")  # back to the plan's limit
    user.refresh_from_db()
    assert user.requests_per_hour_override is None
    quota = hourly_quota(service_url, key)
    assert (quota["limit"], quota["used"], quota["remaining"]) == (int(plan_limit), 3, int(plan_limit) - 3)


def test_with_the_key_cache_on_a_change_applies_once_the_snapshot_expires(
    service_url: str, make_user: Callable[..., tuple[Any, str]], operator: Client, settings: Any
) -> None:
    settings.API_KEY_CACHE_SECONDS = 5  # the default: each process keeps a verified key's Principal this long
    user, key = make_user("premium")
    assert chat(service_url, key).status_code == 200  # the Principal, limits included, is cached now

    admin_save(operator, "user", user.pk, requests_per_hour_override="1")
    # Within the TTL the cached snapshot still carries the plan's limit.
    assert hourly_quota(service_url, key)["limit"] == user.plan.effective_requests_per_hour
    assert chat(service_url, key).status_code == 200

    key_cache.clear()  # what the TTL's expiry does
    assert hourly_quota(service_url, key)["limit"] == 1
    refused = chat(service_url, key)
    assert refused.status_code == 429 and refused.headers["X-RateLimit-Limit"] == "1"


@pytest.mark.parametrize(
    "value",
    ['"openai"', "5", '{"openai": true}', '["openai", "opnai"]', '["openai", 1]'],
    ids=["a-string", "a-number", "an-object", "a-typo", "a-non-string"],
)
def test_a_plans_providers_must_be_a_list_of_known_names(
    service_url: str, make_user: Callable[..., tuple[Any, str]], operator: Client, settings: Any, value: str
) -> None:
    """Saved as they were, "5" made every request of the plan's users a 500, and a string or a typo
    refused every model with 403; the admin form now says what is wrong and keeps the plan as it was."""
    settings.API_KEY_CACHE_SECONDS = 0
    _, key = make_user("premium")
    premium = Plan.objects.get(name="premium")
    before = premium.allowed_providers

    errors = admin_refused(operator, "plan", premium.pk, allowed_providers=value)
    assert list(errors) == ["allowed_providers"]
    assert "provider" in str(errors["allowed_providers"])
    premium.refresh_from_db()
    assert premium.allowed_providers == before
    assert chat(service_url, key).status_code == 200

    admin_save(operator, "plan", premium.pk, allowed_providers='["openai", "gemini"]')  # a valid list is saved
    premium.refresh_from_db()
    assert premium.allowed_providers == ["openai", "gemini"]


@pytest.mark.parametrize(
    "changes",
    [
        {"input_price": "-1"},
        {"cached_input_price": "-0.5"},
        {"output_price": "-10"},
        {"context_window": "0"},
        {"max_output_tokens": "0"},
    ],
    ids=["input-price", "cached-input-price", "output-price", "context-window", "max-output"],
)
def test_a_model_cannot_be_saved_with_a_negative_price_or_an_empty_window(
    operator: Client, changes: dict[str, str]
) -> None:
    """A negative price was saved as it was and credited every caller of the model in the ledger."""
    from providers.models import LLMModel

    model = LLMModel.objects.get(name="gpt-4o-mini")
    before = LLMModel.objects.filter(pk=model.pk).values().get()

    errors = admin_refused(operator, "llmmodel", model.pk, app="providers", **changes)
    assert list(errors) == list(changes)
    assert LLMModel.objects.filter(pk=model.pk).values().get() == before

    assert admin_submit(operator, "llmmodel", model.pk, app="providers", input_price="0").status_code == 302  # free
    assert LLMModel.objects.get(pk=model.pk).input_price == 0
