"""What a model refuses of a request's options: one rule for selection, the pipeline and fallback."""

from __future__ import annotations

from dataclasses import dataclass

from chatservice.errors import ServiceError
from providers.catalog import CatalogEntry

ANTHROPIC_MAX_TEMPERATURE = 1.0  # the Messages API takes 0..1; the others 0..2


@dataclass(frozen=True, slots=True)
class Refusal:
    """An option a model would refuse, and the 400 a request naming that model is answered."""

    field: str  # the option, as the client names it
    message: str  # names the model
    rule: str  # what the option must be (the error's `details.fields` entry)

    def error(self) -> ServiceError:
        return ServiceError("invalid_request", self.message, status=400, details={"fields": {self.field: self.rule}})


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """The client's options that some models refuse; None (or no stop) leaves the model's default."""

    temperature: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()

    def refusal(self, entry: CatalogEntry) -> Refusal | None:
        """What `entry` would refuse of these options (its provider's API, or a max_tokens above its
        output), or None when it takes them as they are."""
        claude = entry.provider == "claude"
        if claude and self.temperature is not None and self.temperature > ANTHROPIC_MAX_TEMPERATURE:
            return Refusal(
                "temperature",
                f"temperature must be between 0 and 1 for {entry.name}.",
                "must be between 0 and 1 for Claude models",
            )
        if self.max_tokens is not None and self.max_tokens > entry.max_output_tokens:
            return Refusal(
                "max_tokens",
                f"max_tokens must be at most {entry.max_output_tokens} for {entry.name}.",
                f"must be at most {entry.max_output_tokens}",
            )
        if claude and any(not s.strip() for s in self.stop):  # Anthropic refuses it; the others take "\n"
            return Refusal(
                "stop",
                f"stop sequences must contain a non-whitespace character for {entry.name}.",
                "must contain a non-whitespace character for Claude models",
            )
        return None


NO_OPTIONS = RequestOptions()  # every model takes these
