"""The garbage collector's settings for a serving process.

A request allocates thousands of short-lived objects, and CPython's cyclic collector runs a
young collection every 700 of them and, every hundred or so of those, a full one that walks
every object the process holds, most of them loaded once at startup and never freed: Django,
pydantic, aiohttp and the service's own modules, about 145,000 objects when the application is
loaded (the provider SDKs are imported at their first use, later, and are not among them).
Measured on the benchmark, the collector took a tenth of the gateway's CPU and made the long
tail of its latency. `settle()` moves the
startup heap out of the collector's sight (`gc.freeze()`) and lets the young generation grow
to YOUNG_THRESHOLD objects before it is collected; cycles are still collected, so memory
stays flat (the benchmark's memory scenario checks it over 50,000 requests).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Collect once, freeze what survives (the startup heap), and collect young objects less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
