"""Request ids: the ledger's key, echoed in `X-Request-ID` on every response."""

from __future__ import annotations

import uuid


def request_id_from(value: str | None) -> uuid.UUID:
    """A client-sent id when it is a UUID, else a fresh one."""
    if value:
        try:
            return uuid.UUID(value.strip())
        except ValueError:
            pass
    return uuid.uuid4()
