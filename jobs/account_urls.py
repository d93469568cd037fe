"""Account pages: usage against quotas, API keys, members. They live in jobs because the usage
page needs jobs' models (loft does not import jobs)."""

from django.urls import path

from jobs.usage_page import usage
from loft import account

urlpatterns = [
    path("usage", usage, name="account-usage"),
    path("keys", account.api_keys, name="account-keys"),
    path("keys/<str:key_id>/revoke", account.revoke_api_key, name="account-key-revoke"),
    path("members", account.members, name="account-members"),
    path("members/<int:membership_id>/remove", account.remove_member, name="account-member-remove"),
]
