"""`manage.py createapikey`: a key for a user on a plan, and a clean refusal of what it cannot create."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command

from accounts.models import User
from accounts.selectors import api_key_authenticate

pytestmark = pytest.mark.django_db


def test_the_key_printed_last_authenticates_the_user_on_the_plan() -> None:
    out = io.StringIO()
    call_command("createapikey", "ops.bot@example", "--plan", "enterprise", stdout=out, stderr=io.StringIO())
    principal = api_key_authenticate(out.getvalue().strip().splitlines()[-1])
    assert principal is not None and principal.username == "ops.bot@example" and principal.plan == "enterprise"


@pytest.mark.parametrize("username", ["", "   ", "x" * 151, "two words", "slash/name"])
def test_a_username_django_would_refuse_is_a_command_error(username: str) -> None:
    with pytest.raises(CommandError, match="username"):
        call_command("createapikey", username, "--plan", "free", stdout=io.StringIO(), stderr=io.StringIO())
    assert not User.objects.exists()


def test_an_unknown_plan_is_a_command_error_naming_the_plans() -> None:
    with pytest.raises(CommandError, match="premium"):
        call_command("createapikey", "someone", "--plan", "gold", stdout=io.StringIO(), stderr=io.StringIO())
    assert not User.objects.exists()
