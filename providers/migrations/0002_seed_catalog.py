"""Seed the catalog: the original models and the providers' current ones.

Prices are USD per million tokens (input, cached input, output), from the providers' public
price lists; operators keep them current in admin.
"""

from decimal import Decimal as D

from django.db import migrations

# name, provider, upstream id, context window, max output, input, cached input, output, vision, default
MODELS = [
    ("gpt-4", "openai", "", 8_192, 8_192, "30", "30", "60", False, False),
    ("gpt-4-turbo", "openai", "", 128_000, 4_096, "10", "10", "30", True, False),
    ("gpt-3.5-turbo", "openai", "", 16_385, 4_096, "0.5", "0.5", "1.5", False, False),
    ("gpt-4o", "openai", "", 128_000, 16_384, "2.5", "1.25", "10", True, False),
    ("gpt-4o-mini", "openai", "", 128_000, 16_384, "0.15", "0.075", "0.6", True, True),
    ("gpt-4.1", "openai", "", 1_047_576, 32_768, "2", "0.5", "8", True, False),
    ("gpt-4.1-mini", "openai", "", 1_047_576, 32_768, "0.4", "0.1", "1.6", True, False),
    ("claude-3-opus", "claude", "claude-3-opus-20240229", 200_000, 4_096, "15", "1.5", "75", True, False),
    ("claude-3-sonnet", "claude", "claude-3-sonnet-20240229", 200_000, 4_096, "3", "0.3", "15", True, False),
    ("claude-3-haiku", "claude", "claude-3-haiku-20240307", 200_000, 4_096, "0.25", "0.03", "1.25", True, False),
    ("claude-sonnet-4", "claude", "claude-sonnet-4-20250514", 200_000, 64_000, "3", "0.3", "15", True, False),
    ("claude-haiku-4-5", "claude", "claude-haiku-4-5-20251001", 200_000, 64_000, "1", "0.1", "5", True, True),
    ("deepseek-chat", "deepseek", "", 128_000, 8_192, "0.28", "0.028", "0.42", False, True),
    ("deepseek-coder", "deepseek", "deepseek-chat", 128_000, 8_192, "0.28", "0.028", "0.42", False, False),
    ("deepseek-reasoner", "deepseek", "", 128_000, 64_000, "0.28", "0.028", "0.42", False, False),
    ("gemini-pro", "gemini", "gemini-1.0-pro", 32_760, 8_192, "0.5", "0.5", "1.5", False, False),
    ("gemini-pro-vision", "gemini", "gemini-1.0-pro-vision", 16_384, 2_048, "0.5", "0.5", "1.5", True, False),
    ("gemini-ultra", "gemini", "gemini-1.0-ultra", 32_760, 8_192, "7", "7", "21", False, False),
    ("gemini-2.5-flash", "gemini", "", 1_048_576, 65_536, "0.3", "0.075", "2.5", True, True),
    ("gemini-2.5-pro", "gemini", "", 1_048_576, 65_536, "1.25", "0.31", "10", True, False),
]


def seed(apps, schema_editor):
    LLMModel = apps.get_model("providers", "LLMModel")
    for name, provider, upstream, ctx, out, inp, cached, outp, vision, default in MODELS:
        LLMModel.objects.update_or_create(
            name=name,
            defaults={
                "provider": provider,
                "upstream_id": upstream,
                "context_window": ctx,
                "max_output_tokens": out,
                "input_price": D(inp),
                "cached_input_price": D(cached),
                "output_price": D(outp),
                "supports_vision": vision,
                "is_provider_default": default,
            },
        )


def unseed(apps, schema_editor):
    apps.get_model("providers", "LLMModel").objects.filter(name__in=[m[0] for m in MODELS]).delete()


class Migration(migrations.Migration):
    dependencies = [("providers", "0001_initial")]
    operations = [migrations.RunPython(seed, unseed)]
