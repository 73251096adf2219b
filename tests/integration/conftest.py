"""Integration runs: `--mock` (the default) against the sandbox upstream, `--api-keys` against the
real providers with the keys in the environment. Either way the run ends by saying what it spent."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

import pytest
from django.conf import settings

KEY_SETTINGS = {
    "openai": "OPENAI_API_KEY",
    "claude": "CLAUDE_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "gemini": "GEMINI_API_KEY",
}
# The cheapest current model of each provider; tiny max_tokens keep a full real run under a cent.
CHEAP_MODELS = {
    "openai": "gpt-4o-mini",
    "claude": "claude-haiku-4-5",
    "deepseek": "deepseek-chat",
    "gemini": "gemini-2.5-flash",
}
MAX_TOKENS = 16

_spent: list[tuple[Decimal, int]] = []


@dataclass(frozen=True)
class Mode:
    real: bool

    def require(self, provider: str) -> None:
        """Skip, with the reason shown, a provider whose key is absent in --api-keys mode."""
        if self.real and not getattr(settings, KEY_SETTINGS[provider]):
            pytest.skip(f"{KEY_SETTINGS[provider]} is not set: {provider} skipped in --api-keys mode")


@pytest.fixture(scope="session")
def mode(pytestconfig: pytest.Config) -> Mode:
    return Mode(real=bool(pytestconfig.getoption("--api-keys")))


@pytest.fixture(autouse=True)
def _count_spend(request: pytest.FixtureRequest) -> Iterator[None]:
    """Add what each test's requests cost to the run's total (read before the database is flushed)."""
    yield
    if "service_url" not in request.fixturenames:
        return
    from django.db.models import Count, Sum

    from usage.models import UsageRecord

    totals = UsageRecord.objects.aggregate(cost=Sum("cost"), n=Count("id"))
    _spent.append((totals["cost"] or Decimal(0), totals["n"]))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _spent:
        return
    cost = sum((c for c, _ in _spent), Decimal(0))
    requests = sum(n for _, n in _spent)
    real = terminalreporter.config.getoption("--api-keys")
    where = "the real providers" if real else "the sandbox (no money spent)"
    terminalreporter.write_line(f"integration: {requests} requests to {where}; the ledger says ${cost:.6f}")
