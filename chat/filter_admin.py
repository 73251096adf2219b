"""Admin for content-filter rules: patterns validated on save, a sample message tried on save."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from chat.filter_rules import ContentRule
from chat.filtering import compile_pattern, rule_cache, sre_parser
from chat.normalize import normalize

MAX_PATTERN_CHARS = 5000


def pattern_problems(pattern: str) -> list[str]:
    """Why a pattern cannot be a rule (empty when it can): it must compile, must not match every
    message, and must be written in the normalized alphabet (lower case, no letters normalization removes)."""
    try:
        regex = compile_pattern(pattern)
        parsed = sre_parser.parse(pattern)
    except re.error as exc:
        return [f"Not a valid regular expression: {exc}."]
    problems = []
    if len(pattern) > MAX_PATTERN_CHARS:
        problems.append(f"Keep the pattern under {MAX_PATTERN_CHARS} characters.")
    if regex.search("") is not None or regex.search(" ") is not None:
        problems.append("The pattern matches an empty message, so it would match every message.")
    letters = {c for c in map(chr, _literal_codes(list(parsed))) if c.isalpha()}
    if not parsed.state.flags & re.IGNORECASE:
        upper = sorted(c for c in letters if c != c.lower())
        if upper:
            problems.append(f"Messages are lower-cased before matching: write {', '.join(upper)} in lower case.")
    if splits_words_many_ways(list(parsed)):
        problems.append(
            "A run of letters (\\w, \\S, .) meets another with nothing but optional text between, as in "
            "\\w{0,64}\\s*(?:\\w{1,64}\\s+)*: one long word can then be split thousands of ways and a single "
            "message can take seconds to screen. End the first run at a word boundary (\\b) or a required "
            "space (\\s+), or make it possessive (\\w{0,64}+)."
        )
    unreachable = sorted(c for c in letters if c == c.lower() and normalize(c) != c.casefold())
    if unreachable:
        hints = ", ".join(f"{c!r} (write {normalize(c)!r})" for c in unreachable)
        problems.append(f"Messages are normalized before matching, so these letters never occur: {hints}.")
    return problems


def _literal_codes(items: Sequence[tuple[Any, Any]]) -> Iterator[int]:
    """Every character a parsed pattern names literally (charset ranges by their ends)."""
    for op, arg in items:
        if op in (sre_parser.LITERAL, sre_parser.NOT_LITERAL):
            yield arg
        elif op is sre_parser.IN:
            for item_op, item_arg in arg:
                if item_op is sre_parser.LITERAL:
                    yield item_arg
                elif item_op is sre_parser.RANGE:
                    yield from item_arg
        elif op is sre_parser.SUBPATTERN:
            yield from _literal_codes(list(arg[-1]))
        elif op is sre_parser.BRANCH:
            for branch in arg[1]:
                yield from _literal_codes(list(branch))
        elif op in (sre_parser.MAX_REPEAT, sre_parser.MIN_REPEAT, sre_parser.POSSESSIVE_REPEAT):
            yield from _literal_codes(list(arg[2]))
        elif op in (sre_parser.ASSERT, sre_parser.ASSERT_NOT):
            yield from _literal_codes(list(arg[1]))
        elif op is sre_parser.ATOMIC_GROUP:
            yield from _literal_codes(list(arg))


_RUN_CATEGORIES = frozenset({"CATEGORY_WORD", "CATEGORY_NOT_SPACE", "CATEGORY_NOT_DIGIT"})
_REPEATS = ("MAX_REPEAT", "MIN_REPEAT")


def splits_words_many_ways(items: Sequence[tuple[Any, Any]]) -> bool:
    """Whether a parsed pattern has two backtracking runs of letters that can meet (`\\w{0,64}\\w{1,64}`,
    `\\w*\\s*(?:\\w+\\s+)`, `(?:\\w+\\s*)*`), so that one word can be split between them in many ways,
    each tried at every place a search starts. Possessive runs and atomic groups give nothing back."""
    for index, (op, arg) in enumerate(items):
        if _op(op) in _REPEATS and arg[1] > 1 and _ends_in_run(list(arg[2])) and _starts_with_run(list(arg[2])):
            return True  # consecutive repetitions meet
        if _ends_in_run([(op, arg)]):
            for next_op, next_arg in items[index + 1 :]:
                if _starts_with_run([(next_op, next_arg)]):
                    return True
                if not _can_be_empty(next_op, next_arg):
                    break
        if any(splits_words_many_ways(inner) for inner in _inner(op, arg)):
            return True
    return False


def _op(op: Any) -> str:
    return str(op)


def _is_run(op: Any, arg: Any) -> bool:
    if _op(op) not in _REPEATS or arg[1] <= 1 or len(arg[2]) != 1:
        return False
    item_op, item_arg = next(iter(arg[2]))
    if _op(item_op) == "ANY":
        return True
    return _op(item_op) == "IN" and any(
        _op(kind) == "CATEGORY" and _op(value) in _RUN_CATEGORIES for kind, value in item_arg
    )


def _ends_in_run(items: Sequence[tuple[Any, Any]]) -> bool:
    for op, arg in reversed(items):
        if _is_run(op, arg) or any(_ends_in_run(inner) for inner in _inner(op, arg, backtracking=True)):
            return True
        if not _can_be_empty(op, arg) or _op(op) == "AT":
            return False
    return False


def _starts_with_run(items: Sequence[tuple[Any, Any]]) -> bool:
    for op, arg in items:
        if _is_run(op, arg) or any(_starts_with_run(inner) for inner in _inner(op, arg, backtracking=True)):
            return True
        if not _can_be_empty(op, arg) or _op(op) == "AT":
            return False
    return False


def _inner(op: Any, arg: Any, *, backtracking: bool = False) -> list[list[tuple[Any, Any]]]:
    """The sequences inside one parsed item (for `backtracking`, only those that can give characters back)."""
    name = _op(op)
    if name == "SUBPATTERN":
        return [list(arg[-1])]
    if name == "BRANCH":
        return [list(branch) for branch in arg[1]]
    if name in _REPEATS:
        return [list(arg[2])]
    if not backtracking and name == "POSSESSIVE_REPEAT":
        return [list(arg[2])]
    if not backtracking and name == "ATOMIC_GROUP":
        return [list(arg)]
    if not backtracking and name in ("ASSERT", "ASSERT_NOT"):
        return [list(arg[1])]
    return []


def _can_be_empty(op: Any, arg: Any) -> bool:
    name = _op(op)
    if name in ("AT", "ASSERT", "ASSERT_NOT"):
        return True
    if name in (*_REPEATS, "POSSESSIVE_REPEAT"):
        return arg[0] == 0 or all(_can_be_empty(o, a) for o, a in arg[2])
    if name == "SUBPATTERN":
        return all(_can_be_empty(o, a) for o, a in arg[-1])
    if name == "ATOMIC_GROUP":
        return all(_can_be_empty(o, a) for o, a in arg)
    if name == "BRANCH":
        return any(all(_can_be_empty(o, a) for o, a in branch) for branch in arg[1])
    return False


class ContentRuleForm(forms.ModelForm):
    sample_message = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Optional: a message to try this pattern on; the result shows after saving.",
    )

    class Meta:
        model = ContentRule
        fields = ("name", "pattern", "action", "enabled", "description")

    def clean_pattern(self) -> str:
        pattern: str = self.cleaned_data["pattern"]
        problems = pattern_problems(pattern)
        if problems:
            raise forms.ValidationError(problems)
        return pattern


@admin.register(ContentRule)
class ContentRuleAdmin(admin.ModelAdmin):
    form = ContentRuleForm
    list_display = ("name", "action", "enabled", "pattern_preview", "updated_at")
    list_editable = ("action", "enabled")
    list_filter = ("action", "enabled")
    search_fields = ("name", "pattern", "description")
    readonly_fields = ("created_at", "updated_at")
    fields = ("name", "pattern", "action", "enabled", "description", "sample_message", "created_at", "updated_at")

    @admin.display(description="pattern")
    def pattern_preview(self, obj: ContentRule) -> str:
        return obj.pattern if len(obj.pattern) <= 80 else obj.pattern[:77] + "..."

    def save_model(self, request: HttpRequest, obj: ContentRule, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        rule_cache.invalidate()
        sample = form.cleaned_data.get("sample_message") if hasattr(form, "cleaned_data") else None
        if sample:
            normalized = normalize(sample)
            matched = compile_pattern(obj.pattern).search(normalized) is not None
            verdict = "matches" if matched else "does not match"
            self.message_user(request, f"The pattern {verdict} the sample (normalized: {normalized!r}).", messages.INFO)

    def delete_model(self, request: HttpRequest, obj: ContentRule) -> None:
        super().delete_model(request, obj)
        rule_cache.invalidate()

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ContentRule]) -> None:
        super().delete_queryset(request, queryset)
        rule_cache.invalidate()
