import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from jobs.models import BaseModel
from loft import storage
from loft.models import ApiKey, Membership, Organization

DEMO_ORG = "demo"
ADMIN_USERNAME = "admin"


class Command(BaseCommand):
    help = (
        "Make an install usable: the bucket and the bundled base model; with --demo also a demo "
        "organization, a staff user and a first API key. Safe to run again: it only adds what "
        "is missing."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--demo",
            action="store_true",
            help="Also create the demo organization, staff user and key.",
        )

    def handle(self, *args, demo: bool = False, **options):
        if storage.ensure_bucket():
            self.stdout.write(f"Created bucket {settings.S3_BUCKET}.")
        BaseModel.seed_bundled()
        if demo:
            self._create_demo()

    def _create_demo(self) -> None:
        with transaction.atomic():
            org, _ = Organization.objects.get_or_create(
                slug=DEMO_ORG, defaults={"name": "Demo organization"}
            )
            password_file = settings.LOFT_HOME / "admin-password"
            user = get_user_model().objects.filter(username=ADMIN_USERNAME).first()
            if user is None:
                password = secrets.token_urlsafe(12)
                user = get_user_model().objects.create_superuser(ADMIN_USERNAME, "", password)
                password_file.parent.mkdir(parents=True, exist_ok=True)
                password_file.write_text(password + "\n")
                password_file.chmod(0o600)
            if not Membership.objects.filter(org=org, user=user).exists():
                org.add_member(user, role=Membership.Role.OWNER)
            first_key = None
            if not ApiKey.objects.for_org(org).exists():
                _, first_key = ApiKey.issue(org, name="first key", created_by=user)

        self.stdout.write(f"Sign in as '{ADMIN_USERNAME}' with the password in {password_file}.")
        if first_key:
            self.stdout.write(f"API key for organization '{org.slug}' (shown once): {first_key}")
        else:
            self.stdout.write(
                f"Organization '{org.slug}' has its API keys; make another with "
                f"`.venv/bin/python manage.py create_api_key --org {org.slug}`."
            )
