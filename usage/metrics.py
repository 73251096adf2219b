"""Prometheus metrics of the LLM traffic, labeled by provider, model and plan — never by user.

Per-user numbers live in the ledger: a user label would give Prometheus one series per user.
With several server processes, set PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess
mode) so /metrics sums every process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from usage.services import ChatOutcome

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)

llm_requests_total = Counter(
    "llm_requests_total",
    "Chat requests served, by provider, model, plan and final status.",
    ["provider", "model", "plan", "status"],
)
llm_response_time_seconds = Histogram(
    "llm_response_time_seconds", "Whole-request latency, by provider.", ["provider"], buckets=_LATENCY_BUCKETS
)
llm_time_to_first_token_seconds = Histogram(
    "llm_time_to_first_token_seconds", "Time to the first token, by provider.", ["provider"], buckets=_TTFT_BUCKETS
)
llm_tokens_used_total = Counter(
    "llm_tokens_used_total",
    "Tokens billed, by provider, model, plan and direction (input/output).",
    ["provider", "model", "plan", "direction"],
)
llm_cost_usd_total = Counter(
    "llm_cost_usd_total", "USD billed, by provider, model and plan.", ["provider", "model", "plan"]
)
llm_errors_total = Counter(
    "llm_errors_total", "Failed or cut requests, by provider and error type.", ["provider", "error_type"]
)
llm_fallbacks_total = Counter(
    "llm_fallbacks_total", "Requests answered after falling back, by the provider that failed.", ["from_provider"]
)
llm_limit_refusals_total = Counter(
    "llm_limit_refusals_total", "Requests refused by a limit, by plan and limit.", ["plan", "limit"]
)


def observe_outcome(outcome: ChatOutcome) -> None:
    """Record one settled request."""
    provider = outcome.provider or "none"
    model = outcome.model or "none"
    llm_requests_total.labels(provider, model, outcome.plan, outcome.status).inc()
    llm_response_time_seconds.labels(provider).observe(outcome.latency_ms / 1000)
    if outcome.time_to_first_token_ms is not None:
        llm_time_to_first_token_seconds.labels(provider).observe(outcome.time_to_first_token_ms / 1000)
    if outcome.input_tokens:
        llm_tokens_used_total.labels(provider, model, outcome.plan, "input").inc(outcome.input_tokens)
    if outcome.output_tokens:
        llm_tokens_used_total.labels(provider, model, outcome.plan, "output").inc(outcome.output_tokens)
    if outcome.cost:
        llm_cost_usd_total.labels(provider, model, outcome.plan).inc(float(outcome.cost))
    if outcome.error_code:
        llm_errors_total.labels(provider, outcome.error_code).inc()
    for failed in outcome.fallback_path:
        llm_fallbacks_total.labels(failed).inc()


def observe_limit_refusal(plan: str, limit: str) -> None:
    """Record one request refused by `limit` (requests_per_hour or tokens_per_day); see usage.admission.admit."""
    llm_limit_refusals_total.labels(plan, limit).inc()
