"""Read each word one way in the seeded content rules: see `_one_way_to_split` in 0003.

`encoded-orders` and `discussion-of-attacks` could split one run-together word in thousands of
ways at every place they start (2.5 s and 1.6 s to screen one crafted 100,000-character message).
Only a rule whose stored pattern is still the one 0004 left is rewritten; a pattern an operator
edited in admin is left as it is.
"""

import importlib

from django.db import migrations

SEED = importlib.import_module("chat.migrations.0003_seed_content_rules")


def _changed():
    return [
        (name, old, new)
        for (name, _, old, _), (_, _, new, _) in zip(SEED.BOUNDED_RULES, SEED.RULES, strict=True)
        if old != new
    ]


def rewrite(apps, schema_editor):
    ContentRule = apps.get_model("chat", "ContentRule")
    for name, old, new in _changed():
        ContentRule.objects.filter(name=name, pattern=old).update(pattern=new)


def restore(apps, schema_editor):
    ContentRule = apps.get_model("chat", "ContentRule")
    for name, old, new in _changed():
        ContentRule.objects.filter(name=name, pattern=new).update(pattern=old)


class Migration(migrations.Migration):
    dependencies = [("chat", "0004_bound_words_in_seeded_rules")]
    operations = [migrations.RunPython(rewrite, restore)]
