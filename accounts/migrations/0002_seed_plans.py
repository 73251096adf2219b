"""Seed the three plans. Requests per hour stay null: the FREE|PREMIUM|ENTERPRISE_REQUESTS_PER_HOUR
settings (50 / 500 / 5000 by default) apply until an operator sets a number in admin."""

from django.db import migrations

PLANS = [
    {"name": "free", "tokens_per_day": 10_000, "allowed_providers": ["deepseek", "gemini"], "priority": 0},
    {
        "name": "premium",
        "tokens_per_day": 100_000,
        "allowed_providers": ["openai", "claude", "deepseek", "gemini"],
        "priority": 1,
    },
    {
        "name": "enterprise",
        "tokens_per_day": 1_000_000,
        "allowed_providers": ["openai", "claude", "deepseek", "gemini"],
        "priority": 2,
    },
]


def seed(apps, schema_editor):
    Plan = apps.get_model("accounts", "Plan")
    for plan in PLANS:
        Plan.objects.update_or_create(name=plan["name"], defaults=plan)


def unseed(apps, schema_editor):
    apps.get_model("accounts", "Plan").objects.filter(name__in=[p["name"] for p in PLANS]).delete()


class Migration(migrations.Migration):
    dependencies = [("accounts", "0001_initial")]
    operations = [migrations.RunPython(seed, unseed)]
