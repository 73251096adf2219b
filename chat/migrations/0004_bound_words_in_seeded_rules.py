"""Bound the words in the seeded content rules (`\\w{1,64}` for `\\w+`): see WORD_LIMIT in 0003.

Only a rule whose stored pattern is still the one 0003 seeded is rewritten; a pattern an operator
edited in admin is left as it is.
"""

import importlib

from django.db import migrations

SEED = importlib.import_module("chat.migrations.0003_seed_content_rules")


def bound(apps, schema_editor):
    ContentRule = apps.get_model("chat", "ContentRule")
    for (name, _, old, _), (_, _, new, _) in zip(SEED.UNBOUNDED_RULES, SEED.BOUNDED_RULES, strict=True):
        ContentRule.objects.filter(name=name, pattern=old).update(pattern=new)


def unbound(apps, schema_editor):
    ContentRule = apps.get_model("chat", "ContentRule")
    for (name, _, old, _), (_, _, new, _) in zip(SEED.UNBOUNDED_RULES, SEED.BOUNDED_RULES, strict=True):
        ContentRule.objects.filter(name=name, pattern=new).update(pattern=old)


class Migration(migrations.Migration):
    dependencies = [("chat", "0003_seed_content_rules")]
    operations = [migrations.RunPython(bound, unbound)]
