"""Account pages: usage against quotas, API keys, members (filled in by the account pages work)."""

urlpatterns: list = []
