"""ContentRule: one content-filter rule (a regex over normalized text and what a match does)."""

from __future__ import annotations

from django.db import models


class ContentRule(models.Model):
    """A pattern matched against `chat.normalize.normalize(message)`; edited in admin.

    The pattern is validated (compiled) by the admin form, not here; the filter skips, and
    logs, a stored pattern that does not compile.
    """

    class Action(models.TextChoices):
        BLOCK = "block", "block: refuse with 400 content_blocked"
        FLAG = "flag", "flag: serve, mark the usage record as flagged"
        DISCUSSION = "discussion", "discussion cue: a quoted blocked phrase is flagged instead of blocked"

    name = models.CharField(max_length=100, unique=True)
    pattern = models.TextField(
        help_text=(
            "A Python regular expression, matched against the normalized message, which is "
            "lower case, no accents, look-alike letters mapped to Latin, leetspeak digits inside words read "
            "as letters, punctuation between letters removed, other punctuation and whitespace as single "
            "spaces. Write it in lower case, with \\s* between words so that words run together still match."
        )
    )
    action = models.CharField(max_length=16, choices=Action.choices, default=Action.BLOCK)
    enabled = models.BooleanField(default=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        app_label = "chat"
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.action})"
