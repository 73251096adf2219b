"""The authenticated caller as the request path sees it: a frozen snapshot of user, plan and key."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: int
    username: str
    is_staff: bool
    plan: str
    priority: int
    allowed_providers: frozenset[str]
    requests_per_hour: int
    tokens_per_day: int
    api_key_id: int | None

    # DRF treats request.user as a user object; these make a Principal usable there.
    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def pk(self) -> int:
        return self.user_id

    def allows_provider(self, provider: str) -> bool:
        return provider in self.allowed_providers
