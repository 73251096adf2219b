"""What a request costs: provider-reported tokens times catalog prices, exact in Decimal."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from providers.base import Usage
from providers.catalog import CatalogEntry

PER_MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class Prices:
    input: Decimal
    cached_input: Decimal
    output: Decimal

    @classmethod
    def of(cls, entry: CatalogEntry) -> Prices:
        return cls(entry.input_price, entry.cached_input_price, entry.output_price)


def cost_of(usage: Usage, prices: Prices) -> Decimal:
    """USD for `usage`: uncached input, cached input and output, each at its own price.

    Exact: prices have six decimals per million tokens, so the result has at most twelve.
    """
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    uncached = usage.input_tokens - cached
    total = uncached * prices.input + cached * prices.cached_input + usage.output_tokens * prices.output
    return total / PER_MILLION
