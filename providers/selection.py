"""Model selection: honour an explicit model within the plan, or pick one for the message.

Auto-selection prefers DeepSeek for code, Claude for long conversations, DeepSeek on the
free plan and DEFAULT_LLM otherwise, always among the plan's providers and healthy models
(circuit not open, not in maintenance) and, while one of those takes them, models that take the
request's options; `Selection.reason` says why.
"""

from __future__ import annotations

import logging
import math
import re

from django.conf import settings

from accounts.principal import Principal
from chatservice.errors import ServiceError
from providers.catalog import PROVIDERS, CatalogEntry, provider_default, resolve_model
from providers.circuit import Circuit, get_circuit
from providers.options import NO_OPTIONS, RequestOptions
from providers.routing_types import Selection

logger = logging.getLogger(__name__)

NO_PROVIDER_RETRY_AFTER_SECONDS = 30
CODE_SCORE_THRESHOLD = 2

# --- the code detector ------------------------------------------------------------------------

_FENCE = re.compile(r"```|~~~")
_INLINE_CODE = re.compile(r"`([^`\n]{2,})`")
_CODE_CHARS = re.compile(r"[(){}\[\];=<>.:/\\_$#]")
_TRACEBACK = re.compile(
    r"Traceback \(most recent call last\)|^\s*File \"[^\"]+\", line \d+|^\s+at [\w$.<>]+\(.*:\d+\)"
    r"|^\s*at .+ \(.+:\d+:\d+\)|Exception in thread \"|panicked at |Segmentation fault|core dumped"
    r"|^\s*[A-Z][A-Za-z]*(?:Error|Exception)(?::|$)|\b[A-Z][a-z]+(?:[A-Z][a-z]+)*(?:Error|Exception): \S",
    re.MULTILINE,
)
_SHELL = re.compile(
    r"^\s*(?:\$|>>>|\.\.\.|PS [A-Z]:\\[^>]*>|[\w.-]+@[\w.-]+:[~/][^$#]*[$#])\s+\S"
    r"|^\s*(?:sudo )?(?:pip3?|npm|yarn|pnpm|apt(?:-get)?|brew|cargo|go|gem|poetry|uv) "
    r"(?:install|add|get|run|build|remove|uninstall|test|update|upgrade)\b"
    r"|^\s*git (?:clone|commit|push|pull|checkout|rebase|merge|status|log|add|diff|reset|stash|branch)\b"
    r"|^\s*(?:docker|kubectl) (?:run|build|exec|ps|logs|apply|get|compose|describe)\b"
    r"|^\s*(?:ls|cd|chmod|chown|curl|wget|grep|find|cat|rm|mkdir|python3?|node|java|ssh) \S*(?:-{1,2}\w|/)",
    re.MULTILINE,
)
_FILE_EXT = re.compile(
    r"\b[\w./-]+\.(?:py|js|mjs|ts|tsx|jsx|java|kt|go|rs|rb|php|c|h|cc|cpp|hpp|cs|swift|scala|sh|bash"
    r"|ps1|sql|ya?ml|json|toml|ini|html?|css|scss|vue|svelte|lua|pl|r|ipynb|dockerfile|gradle|tf)\b",
    re.IGNORECASE,
)
# Statements no prose line looks like: two points each.
_STRONG_LINE = re.compile(
    r"^\s*(?:def \w+\s*\(.*\)\s*(?:->.*)?:\s*$|class \w+\s*(?:\(.*\))?\s*:\s*$|from [\w.]+ import \w"
    r"|import [\w.]+(?: as \w+)?\s*;?\s*$|#include\s*[<\"]|(?:async )?function\s*\w*\s*\(.*\)\s*\{"
    r"|fn \w+\s*[(<]|func \w+\s*\(|package [\w.]+;?\s*$|using [\w.]+;"
    r"|(?:SELECT|INSERT|UPDATE|DELETE)\b.+\b(?:FROM|INTO|SET|WHERE)\b)",
    re.MULTILINE,
)
# Code-shaped lines (a keyword with code punctuation, a bare call, an assignment): one point each.
_CODE_LINE = re.compile(
    r"^\s*(?:(?:const|let|var) \w+\s*=|(?:public|private|protected|static)\s+[\w<>\[\]]+\s.*[({;]"
    r"|(?:if|for|while|switch)\s*\(.*\)\s*\{?\s*$"
    r"|(?:if|elif|while|for|with)\b[^.!?]*[=<>()\[\]][^.!?]*:\s*$|(?:try|else|finally)\s*:\s*$"
    r"|return\b.*;|return [\w.]+(?:\(.*\)|(?: [-+*/%<>=]+ [\w.()]+)+)\s*$|@\w+(?:\(.*\))?\s*$"
    r"|[}\])];?\s*$|\w+(?:\.\w+)*\(.*\)\s*;?\s*$|\w+(?:\[[^\]]*\])?\s*[+\-*/]?=\s*[^=\s].*[;)\]}\"'\d]\s*$)",
    re.MULTILINE,
)
_CALL = re.compile(r"\b[a-z_]\w*(?:\.\w+)+\([^()]*\)|\b[a-z]+_[a-z_]+\(|\b[a-z]+[A-Z]\w*\(")


def code_score(text: str) -> int:
    """Evidence that `text` holds code, a stack trace or a shell session (0 for plain prose)."""
    score = 0
    if _FENCE.search(text):
        score += 3
    if any(_CODE_CHARS.search(m) for m in _INLINE_CODE.findall(text)):
        score += 1
    if _TRACEBACK.search(text):
        score += 2
    if _SHELL.search(text):
        score += 2
    if _FILE_EXT.search(text):
        score += 1
    score += min(4, 2 * len(_STRONG_LINE.findall(text)) + len(_CODE_LINE.findall(text)))
    if _CALL.search(text):
        score += 1
    score += _density_score(text)
    return score


def _density_score(text: str) -> int:
    """Brackets, semicolons and operators per character: high in code, low in prose."""
    compact = re.sub(r"\s+", "", text)
    if len(compact) < 20:
        return 0
    symbols = sum(compact.count(c) for c in "{}[]();=<>")
    ratio = symbols / len(compact)
    return 2 if ratio >= 0.12 else 1 if ratio >= 0.07 and symbols >= 6 else 0


def looks_like_code(text: str) -> bool:
    """True when the message is about code in code: snippets, traces, shell sessions."""
    return code_score(text) >= CODE_SCORE_THRESHOLD


# --- selection ----------------------------------------------------------------------------------


def _allowed_models(principal: Principal, entries: tuple[CatalogEntry, ...]) -> list[str]:
    return sorted(e.name for e in entries if e.enabled and principal.allows_provider(e.provider))


async def _healthy(entry: CatalogEntry, circuit: Circuit) -> bool:
    return entry.enabled and not entry.maintenance and not await circuit.is_open(entry.provider)


def _explicit(principal: Principal, requested: str, entries: tuple[CatalogEntry, ...]) -> Selection:
    entry = resolve_model(entries, requested)
    if not principal.allows_provider(entry.provider):
        raise ServiceError(
            "model_not_allowed",
            f"The {principal.plan} plan does not include {entry.name} ({entry.provider}).",
            status=403,
            details={
                "plan": principal.plan,
                "allowed_providers": sorted(principal.allowed_providers),
                "allowed_models": _allowed_models(principal, entries),
            },
        )
    if entry.maintenance:
        raise ServiceError(
            "model_unavailable",
            f"{entry.name} is down for maintenance.",
            status=503,
            details={"model": entry.name},
            headers={"Retry-After": str(NO_PROVIDER_RETRY_AFTER_SECONDS)},
        )
    return Selection(entry=entry, reason="requested", explicit=True)


def _default_preference(entries: tuple[CatalogEntry, ...]) -> CatalogEntry | str:
    """DEFAULT_LLM as a catalog entry (a model id) or a provider name."""
    configured = str(settings.DEFAULT_LLM).strip()
    if configured in PROVIDERS:
        return configured
    try:
        return resolve_model(entries, configured)
    except ServiceError:
        logger.warning("DEFAULT_LLM=%r is not in the catalog; using openai", configured)
        return "openai"


def _preferences(principal: Principal, user_message: str, history_tokens: int) -> tuple[str, str, list[str]]:
    """(reason, preferred provider, the providers to try after it) for auto-selection."""
    if looks_like_code(user_message):
        return "code detected", "deepseek", ["openai", "claude", "gemini"]
    if history_tokens >= int(settings.LONG_CONVERSATION_TOKENS):
        return f"long conversation ({history_tokens} tokens)", "claude", ["gemini", "openai", "deepseek"]
    if principal.plan == "free":
        return "free plan default", "deepseek", ["gemini", "openai", "claude"]
    return "default model", "", []


async def select_model(
    *,
    requested: str | None,
    principal: Principal,
    user_message: str,
    history_tokens: int,
    entries: tuple[CatalogEntry, ...],
    circuit: Circuit | None = None,
    message_tokens: int = 0,
    options: RequestOptions = NO_OPTIONS,
) -> Selection:
    """The model for a request: the one asked for (if the plan allows it), or the best fit.

    Auto-selection passes over a model that would refuse `options` while an allowed one takes
    them; when none does, it chooses as if they were not given, and the caller refuses them as
    for that model asked for by name. 403 `model_not_allowed` when the plan excludes the
    asked-for model, 503 `model_unavailable` when it is in maintenance, 503
    `no_provider_available` when no allowed model is healthy.
    """
    if requested and requested.strip():
        return _explicit(principal, requested, entries)
    circuit = circuit or get_circuit()
    reason, preferred, then = _preferences(principal, user_message, history_tokens)
    candidates: list[CatalogEntry] = []
    wanted: CatalogEntry | None = None  # DEFAULT_LLM when it names a model
    if not preferred:
        default = _default_preference(entries)
        if isinstance(default, CatalogEntry):
            wanted, preferred = default, default.provider
            candidates.append(default)
        else:
            preferred = default
    for provider in dict.fromkeys([preferred, *then, *settings.FALLBACK_ORDER, *PROVIDERS]):
        entry = provider_default(entries, provider)
        if entry is not None:
            candidates.append(entry)
    # The window must hold the new message (history is trimmed to fit), and all of a long conversation.
    needed = (history_tokens if reason.startswith("long") else 0) + message_tokens
    allowed = [e for e in dict.fromkeys(candidates) if principal.allows_provider(e.provider)]
    # One that would refuse the options is passed over while another takes them; when none does, the
    # choice is made without them, and the caller answers the chosen one's 400, as if asked by name.
    taking = [e for e in allowed if options.refusal(e) is None]
    usable, weighed = (taking, options) if taking else (allowed, NO_OPTIONS)
    for entry in usable:
        if entry.context_window < needed:
            continue
        if await _healthy(entry, circuit):
            if wanted is not None and entry != wanted:
                why = _why_not(principal, wanted, entries, needed, weighed)
                reason = f"{reason}; {wanted.name} {why}, using {entry.name}"
            elif wanted is None and entry.provider != preferred:
                why = _why_not(principal, preferred, entries, needed, weighed)
                reason = f"{reason}; {preferred} {why}, using {entry.provider}"
            return Selection(entry=entry, reason=reason, explicit=False)
    if needed:
        # No allowed model holds all of it: the prompt keeps the most recent turns that fit, so the
        # healthy model with the largest window serves, rather than a 503.
        for entry in sorted(usable, key=lambda e: -e.context_window):
            if await _healthy(entry, circuit):
                which = "allowed model taking the options" if len(usable) < len(allowed) else "allowed model"
                reason = f"{reason}; no {which} holds it all, using {entry.name} with the most recent history"
                return Selection(entry=entry, reason=reason, explicit=False)
    retry_after = NO_PROVIDER_RETRY_AFTER_SECONDS
    waits = [await circuit.retry_after(p) for p in sorted(principal.allowed_providers)]
    if any(w is not None for w in waits):
        retry_after = max(1, math.ceil(min(w for w in waits if w is not None)))
    raise ServiceError(
        "no_provider_available",
        "No provider your plan allows is available right now.",
        status=503,
        details={"plan": principal.plan, "allowed_providers": sorted(principal.allowed_providers)},
        headers={"Retry-After": str(retry_after)},
    )


def _why_not(
    principal: Principal,
    wanted: str | CatalogEntry,
    entries: tuple[CatalogEntry, ...],
    needed: int,
    options: RequestOptions,
) -> str:
    provider = wanted.provider if isinstance(wanted, CatalogEntry) else wanted
    if not principal.allows_provider(provider):
        return "not in plan"
    entry = wanted if isinstance(wanted, CatalogEntry) else provider_default(entries, provider)
    refusal = options.refusal(entry) if entry is not None else None
    if refusal is not None:
        return f"refuses this {refusal.field}"
    return "too small" if entry is not None and entry.context_window < needed else "unavailable"
