"""The content filter: a message's verdict from the ContentRule table, matched on normalized text.

Rules are read from the database at most every few seconds and compiled once per read. Each
compiled rule carries the literal strings one of which any match must contain (read from the
parsed pattern), so `screen` costs a normalization and a few substring tests: a rule's regex only
runs on messages that contain one of its words.

A block rule's match raises 400 `content_blocked` (the message never reaches a provider); a flag
rule lets it through with `Verdict.flagged`. A message that only *quotes* a blocked phrase while it
talks about attacks (a discussion-cue rule matches too) is flagged instead of blocked.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from chat.filter_rules import ContentRule
from chat.normalize import hidden_text, normalize, normalize_quoted
from chatservice.errors import ServiceError
from chatservice.reread_cache import ReReadCache

logger = logging.getLogger("chat.filtering")

RULES_CACHE_SECONDS = 5.0

# The stdlib's own regex parser, to read a pattern's literals (it has no public name or type stubs).
sre_parser: Any = importlib.import_module("re._parser")


@dataclass(frozen=True)
class Verdict:
    flagged: bool = False
    rule_id: int | None = None


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule ready to match; `needles` (when known) are strings one of which every match contains."""

    id: int
    name: str
    regex: re.Pattern[str]
    needles: tuple[str, ...] | None = None

    @classmethod
    def build(cls, *, id: int, name: str, pattern: str) -> CompiledRule:
        """The compiled rule; memoized, since analysing a pattern costs milliseconds and rules rarely change."""
        regex, needles = _analysed(pattern)
        return cls(id=id, name=name, regex=regex, needles=needles)

    def search(self, text: str) -> re.Match[str] | None:
        if self.needles is not None and not any(needle in text for needle in self.needles):
            return None
        return self.regex.search(text)


@functools.lru_cache(maxsize=4096)
def _analysed(pattern: str) -> tuple[re.Pattern[str], tuple[str, ...] | None]:
    return compile_pattern(pattern), required_substrings(pattern)


@dataclass(frozen=True)
class RuleSet:
    """The enabled rules by action, in id order."""

    block: tuple[CompiledRule, ...] = ()
    flag: tuple[CompiledRule, ...] = ()
    discussion: tuple[CompiledRule, ...] = ()


@dataclass(frozen=True)
class Decision:
    """What the rules say about one message: `blocked`, or flagged (`rule_id` set), or clean."""

    blocked: bool = False
    rule_id: int | None = None

    @property
    def flagged(self) -> bool:
        return not self.blocked and self.rule_id is not None


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a rule's pattern (case-sensitive: messages are lower-cased); raises re.error when invalid."""
    return re.compile(pattern)


def required_substrings(pattern: str) -> tuple[str, ...] | None:
    """Strings of which every match of `pattern` contains at least one; None when there is no such set."""
    try:
        parsed = sre_parser.parse(pattern)
    except re.error:
        return None
    found = _required(list(parsed))
    if not found:
        return None
    if parsed.state.flags & re.IGNORECASE or _has_local_ignorecase(list(parsed)):
        found = frozenset(s.lower() for s in found)
    return tuple(sorted(found))


def _required(items: Sequence[tuple[Any, Any]]) -> frozenset[str] | None:
    """The strongest set of literals one of which a match of this sequence must contain."""
    candidates: list[frozenset[str]] = []
    run: list[str] = []
    for op, arg in items:
        if op is sre_parser.LITERAL:
            run.append(chr(arg))
            continue
        if op in (sre_parser.AT, sre_parser.ASSERT, sre_parser.ASSERT_NOT):
            continue  # zero width: the literals on either side stay adjacent
        if run:
            candidates.append(frozenset({"".join(run)}))
            run = []
        required = _required_in(op, arg)
        if required:
            candidates.append(required)
    if run:
        candidates.append(frozenset({"".join(run)}))
    return max(candidates, key=lambda c: (min(map(len, c)), -len(c)), default=None)


def _required_in(op: Any, arg: Any) -> frozenset[str] | None:
    if op is sre_parser.SUBPATTERN:
        return _required(list(arg[-1]))
    if op is sre_parser.ATOMIC_GROUP:
        return _required(list(arg))
    if op is sre_parser.BRANCH:
        branches = [_required(list(branch)) for branch in arg[1]]
        if any(not branch for branch in branches):
            return None
        return frozenset().union(*branches)  # type: ignore[arg-type]
    if op in (sre_parser.MAX_REPEAT, sre_parser.MIN_REPEAT, sre_parser.POSSESSIVE_REPEAT) and arg[0] >= 1:
        return _required(list(arg[2]))
    return None


def _has_local_ignorecase(items: Sequence[tuple[Any, Any]]) -> bool:
    for op, arg in items:
        if op is sre_parser.SUBPATTERN and (arg[1] & re.IGNORECASE or _has_local_ignorecase(list(arg[-1]))):
            return True
        if op is sre_parser.BRANCH and any(_has_local_ignorecase(list(b)) for b in arg[1]):
            return True
        repeat = op in (sre_parser.MAX_REPEAT, sre_parser.MIN_REPEAT, sre_parser.POSSESSIVE_REPEAT)
        if repeat and _has_local_ignorecase(list(arg[2])):
            return True
        if op is sre_parser.ATOMIC_GROUP and _has_local_ignorecase(list(arg)):
            return True
    return False


def rule_set_load() -> RuleSet:
    """Read and compile the enabled rules (sync ORM); a pattern that does not compile is skipped."""
    by_action: dict[str, list[CompiledRule]] = {action: [] for action in ContentRule.Action.values}
    for rule in ContentRule.objects.filter(enabled=True).order_by("id"):
        try:
            compiled = CompiledRule.build(id=rule.id, name=rule.name, pattern=rule.pattern)
        except re.error as exc:
            logger.error("content rule %s (%s) has an invalid pattern, skipped: %s", rule.id, rule.name, exc)
            continue
        by_action.setdefault(rule.action, []).append(compiled)
    return RuleSet(
        block=tuple(by_action[ContentRule.Action.BLOCK]),
        flag=tuple(by_action[ContentRule.Action.FLAG]),
        discussion=tuple(by_action[ContentRule.Action.DISCUSSION]),
    )


class RuleCache(ReReadCache[RuleSet]):
    """The compiled rules (`rule_set_load`, sync ORM), re-read when older than `ttl` seconds."""

    def __init__(
        self,
        *,
        ttl: float = RULES_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        loader: Callable[[], RuleSet] | None = None,
    ) -> None:
        super().__init__(loader or rule_set_load, ttl=ttl, clock=clock, what="content rules")


rule_cache = RuleCache()


async def screen(text: str) -> Verdict:
    """Block (raise ServiceError 400 `content_blocked`) or flag a message by the ContentRule table."""
    return await screen_all((text,))


async def screen_all(texts: Iterable[str]) -> Verdict:
    """`screen` over every text a request sends upstream (its message, its system prompt, the
    earlier turns a client supplies): the first block raises; otherwise flagged by the first flag."""
    rules = await rule_cache.aget()
    flagged = Verdict()
    for text in dict.fromkeys(texts):
        if not text:
            continue
        decision = evaluate(text, rules)
        if decision.blocked:
            logger.info("message blocked by content rule %s", decision.rule_id)
            raise ServiceError(
                "content_blocked",
                "The message was blocked by the content filter.",
                status=400,
                details={"rule_id": decision.rule_id},
            )
        if decision.flagged and not flagged.flagged:
            flagged = Verdict(flagged=True, rule_id=decision.rule_id)
    return flagged


def evaluate(text: str, rules: RuleSet) -> Decision:
    """The rules' decision on a raw message, including any text hidden in Unicode tag characters."""
    decision = evaluate_normalized(text, normalize(text), rules)
    hidden = hidden_text(text)
    if decision.blocked or not hidden:
        return decision
    hidden_decision = evaluate_normalized(hidden, normalize(hidden), rules)
    return hidden_decision if hidden_decision.rule_id is not None else decision


def evaluate_normalized(text: str, normalized: str, rules: RuleSet) -> Decision:
    """Block rules first (the first match not excused as a quoted discussion wins), then flag rules."""
    excused: int | None = None
    discussion = _Discussion(text, normalized, rules)
    for rule in rules.block:
        if rule.search(normalized) is None:
            continue
        if not discussion.only_quotes(rule):
            return Decision(blocked=True, rule_id=rule.id)
        excused = excused or rule.id
    if excused is not None:
        return Decision(rule_id=excused)
    for rule in rules.flag:
        if rule.search(normalized) is not None:
            return Decision(rule_id=rule.id)
    return Decision()


class _Discussion:
    """Whether a message talks about attacks and only quotes a rule's phrase; the discussion cues and
    the quoted form are worked out once a message, however many block rules match it."""

    def __init__(self, text: str, normalized: str, rules: RuleSet) -> None:
        self._text = text
        self._normalized = normalized
        self._rules = rules
        self._cued: bool | None = None
        self._quoted: str | None = None

    def only_quotes(self, rule: CompiledRule) -> bool:
        """True when the message talks about attacks and every occurrence of the rule's phrase is in quotes."""
        if self._cued is None:
            self._cued = any(cue.search(self._normalized) for cue in self._rules.discussion)
        if not self._cued:
            return False
        if self._quoted is None:
            self._quoted = normalize_quoted(self._text)
        return _all_quoted(rule.regex, self._quoted, self._normalized)


def _all_quoted(regex: re.Pattern[str], quoted: str, normalized: str) -> bool:
    """Every occurrence of `regex` in `quoted` opens inside a quotation (an odd number of quote marks
    before it) with a quote mark after it, and none was split by one. One pass over the message,
    however many occurrences: the quote marks before each are counted on from the previous one."""
    last_quote = quoted.rfind('"')
    quotes_before = 0
    counted_to = 0
    occurrences = 0
    for match in regex.finditer(quoted):
        start, end = match.span()
        quotes_before += quoted.count('"', counted_to, start)
        counted_to = start
        if quotes_before % 2 == 0 or last_quote < end:
            return False
        occurrences += 1
    return occurrences == len(regex.findall(normalized))  # fewer: a quote mark splits an occurrence
