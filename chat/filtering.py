"""The content filter's verdict on a user message (rules come with the content-filter work)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    flagged: bool = False
    rule_id: int | None = None


async def screen(text: str) -> Verdict:
    """Block (raise ServiceError 400 `content_blocked`) or flag a message. No rules are defined yet."""
    return Verdict()
