"""Costs are exact: provider tokens times catalog prices, in Decimal, to the micro-dollar and below."""

from __future__ import annotations

from decimal import Decimal

import pytest

from providers.base import Usage
from providers.catalog import catalog_entries, resolve_model
from providers.pricing import Prices, cost_of


def test_cost_of_known_usage_is_exact() -> None:
    prices = Prices(input=Decimal("2.5"), cached_input=Decimal("1.25"), output=Decimal("10"))
    usage = Usage(input_tokens=1234, output_tokens=567, cached_input_tokens=200)
    # (1034 * 2.5 + 200 * 1.25 + 567 * 10) / 1e6 = (2585 + 250 + 5670) / 1e6
    assert cost_of(usage, prices) == Decimal("0.008505")


def test_tiny_prices_keep_every_digit() -> None:
    prices = Prices(input=Decimal("0.028"), cached_input=Decimal("0.0028"), output=Decimal("0.042"))
    assert cost_of(Usage(input_tokens=1, output_tokens=1), prices) == Decimal("0.00000007")


def test_cached_tokens_never_exceed_input() -> None:
    prices = Prices(input=Decimal("1"), cached_input=Decimal("0.1"), output=Decimal("0"))
    assert cost_of(Usage(input_tokens=10, output_tokens=0, cached_input_tokens=50), prices) == Decimal("0.000001")


@pytest.mark.django_db
def test_catalog_prices_from_the_seed() -> None:
    entry = resolve_model(catalog_entries(), "gpt-4o-mini")
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    assert cost_of(usage, Prices.of(entry)) == Decimal("0.75")


@pytest.mark.django_db
def test_provider_names_resolve_to_their_default_model() -> None:
    entries = catalog_entries()
    assert {resolve_model(entries, p).provider for p in ("openai", "claude", "deepseek", "gemini")} == {
        "openai",
        "claude",
        "deepseek",
        "gemini",
    }
    assert resolve_model(entries, "claude").name == "claude-haiku-4-5"
