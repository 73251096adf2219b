"""Drop the single-column indexes that a composite index already leads with.

`chat_conversation.user_id` is the first column of `conversation_user_recent` and
`chat_message.conversation_id` the first of `message_conversation_order`, so every lookup by
them (a user's conversations, a conversation's messages, the cascades) uses the composite
index; `chat_conversation.updated_at` alone serves no query (a user's recent conversations
are read through `conversation_user_recent`). Each index is written on every request that
keeps a conversation: the three of them were 3 of the 7 index entries of a new conversation
with its two messages. The state changes only the fields' `db_index`; the database drops the
indexes alone (Django's own AlterField would also drop and re-add the foreign keys, which
re-checks every row under a lock), concurrently on Postgres.
"""

from django.conf import settings
from django.db import migrations, models
from django.db.models import CASCADE

from chatservice.migration_operations import DropFieldIndex


class Migration(migrations.Migration):
    atomic = False  # DROP INDEX CONCURRENTLY cannot run inside a transaction

    dependencies = [
        ("chat", "0005_one_way_to_split_words_in_seeded_rules"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        DropFieldIndex("conversation", "updated_at", models.DateTimeField(auto_now=True)),
        DropFieldIndex(
            "conversation",
            "user",
            models.ForeignKey(db_index=False, on_delete=CASCADE, related_name="conversations", to=settings.AUTH_USER_MODEL),
        ),
        DropFieldIndex(
            "message",
            "conversation",
            models.ForeignKey(db_index=False, on_delete=CASCADE, related_name="messages", to="chat.conversation"),
        ),
    ]
