"""Writes for accounts: issuing and revoking API keys, creating users on a plan."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from accounts.models import ApiKey, Plan, User

KEY_PREFIX = "cs"


def hash_key(raw_key: str) -> str:
    """SHA-256 of the raw key. Keys carry 256 random bits, so a fast hash is safe here."""
    return hashlib.sha256(raw_key.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    raw_key: str


def api_key_create(*, user: User, name: str = "") -> IssuedKey:
    """Issue a new key for `user`; the raw key is returned here and never stored."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    raw_key = f"{KEY_PREFIX}_{prefix}_{secret}"
    api_key = ApiKey.objects.create(user=user, name=name, prefix=prefix, key_hash=hash_key(raw_key))
    return IssuedKey(api_key=api_key, raw_key=raw_key)


def api_key_revoke(*, api_key: ApiKey) -> None:
    """Revoke a key; requests with it are refused once the key cache expires (seconds)."""
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])


@transaction.atomic
def user_get_or_create(*, username: str, plan_name: str | None = None) -> tuple[User, bool]:
    """Fetch or create `username`; put them on `plan_name` when one is given."""
    user, created = User.objects.get_or_create(username=username)
    if plan_name is not None:
        plan = Plan.objects.get(name=plan_name)
        if user.plan_id != plan.pk:
            user.plan = plan
            user.save(update_fields=["plan"])
    return user, created
