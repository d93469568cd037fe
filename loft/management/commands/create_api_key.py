from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils.text import slugify

from loft.models import ApiKey, Membership, Organization


class Command(BaseCommand):
    help = (
        "Create an API key for an organization (created if missing), and with --owner make a "
        "user its owner, e.g. the one `createsuperuser` made. The key is the last line."
    )

    def add_arguments(self, parser):
        parser.add_argument("--org", required=True, help="Organization slug.")
        parser.add_argument("--name", default="", help="A label for the key.")
        parser.add_argument(
            "--owner",
            metavar="USERNAME",
            help="An existing user who becomes an owner of the organization (signs in to it).",
        )
        parser.add_argument(
            "--scope",
            choices=ApiKey.Scope.values,
            default=ApiKey.Scope.STANDARD,
            help="standard (the default): the API, except creating and revoking keys; "
            "manage_keys: also that.",
        )

    def handle(self, *args, org: str, name: str, owner: str | None, scope: str, **options):
        if not slugify(org):
            raise CommandError(f"--org {org!r} has no letters or digits to make a slug of.")
        user = None
        if owner is not None:
            user = get_user_model().objects.filter(username=owner).first()
            if user is None:
                raise CommandError(
                    f"There is no user named {owner!r}; create one first, e.g. with "
                    "`manage.py createsuperuser`."
                )
        with transaction.atomic():
            organization, created = Organization.get_or_create_by_slug(org)
            if user is not None:
                organization.add_member(user, role=Membership.Role.OWNER)
            key, secret = ApiKey.issue(organization, name=name, created_by=user, scope=scope)
        if created:
            self.stderr.write(f"Created organization {organization.slug}.")
        if user is not None:
            self.stderr.write(f"{user.username} is an owner of {organization.slug}.")
        self.stderr.write(f"Created API key {key.id} for {organization.slug}; it is shown once.")
        self.stdout.write(secret)
