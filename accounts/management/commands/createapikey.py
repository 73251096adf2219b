"""`manage.py createapikey USERNAME --plan PLAN`: create the user if needed, print a new key last."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.models import Plan, User
from accounts.services import api_key_create, user_get_or_create


class Command(BaseCommand):
    help = "Issue an API key for USERNAME (created if needed), on --plan when given. The key is the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--plan", choices=None, help="free, premium or enterprise (or any plan defined in admin)")
        parser.add_argument("--name", default="", help="a label for the key")

    def handle(self, *args: Any, **options: Any) -> None:
        username = options["username"]
        try:  # the admin's checks: blank, too long (a database error) or characters it refuses
            User._meta.get_field("username").clean(username, None)
        except ValidationError as exc:
            raise CommandError(f"Invalid username {username!r}: {' '.join(exc.messages)}") from None
        plan = options["plan"]
        if plan is not None and not Plan.objects.filter(name=plan).exists():
            names = ", ".join(Plan.objects.values_list("name", flat=True))
            raise CommandError(f"Unknown plan {plan!r}; plans: {names}")
        user, created = user_get_or_create(username=username, plan_name=plan)
        issued = api_key_create(user=user, name=options["name"])
        verb = "Created" if created else "Found"
        self.stderr.write(f"{verb} user {user.username} on plan {user.plan.name}; the key is shown once:")
        self.stdout.write(issued.raw_key)
