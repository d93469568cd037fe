from django.core.management.base import BaseCommand

from loft.models import ApiKey, Organization


class Command(BaseCommand):
    help = "Create an API key for an organization (created if missing). The key is the last line."

    def add_arguments(self, parser):
        parser.add_argument("--org", required=True, help="Organization slug.")
        parser.add_argument("--name", default="", help="A label for the key.")

    def handle(self, *args, org: str, name: str, **options):
        organization, created = Organization.get_or_create_by_slug(org)
        if created:
            self.stderr.write(f"Created organization {organization.slug}.")
        key, secret = ApiKey.issue(organization, name=name)
        self.stderr.write(f"Created API key {key.id} for {organization.slug}; it is shown once.")
        self.stdout.write(secret)
