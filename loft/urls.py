"""The root URLconf: the platform's own routes, and each app's routes by name (jobs/urls.py for
pages, jobs/api/urls.py for /v1), so the platform imports no domain module."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from loft import account, views
from loft.api.views import ApiKeyViewSet
from loft.api.webhooks import WebhookEndpointViewSet
from loft.auth import SignInForm
from loft.health import healthz

# OpenAI's paths have no trailing slash.
router = SimpleRouter(trailing_slash=False)
router.register("api_keys", ApiKeyViewSet, basename="api-key")
router.register("webhook_endpoints", WebhookEndpointViewSet, basename="webhook-endpoint")

api_v1 = [
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="openapi-schema"),
    path("", include("jobs.api.urls")),
    *router.urls,
]

account_pages = [
    path("keys", account.api_keys, name="account-keys"),
    path("keys/<str:key_id>/revoke", account.revoke_api_key, name="account-key-revoke"),
    path("members", account.members, name="account-members"),
    path("members/<int:membership_id>/remove", account.remove_member, name="account-member-remove"),
    path(
        "invitations/<int:invitation_id>/withdraw",
        account.withdraw_invitation,
        name="account-invitation-withdraw",
    ),
    path(
        "invitations/<str:token>/accept",
        account.answer_invitation,
        {"answer": "accept"},
        name="account-invitation-accept",
    ),
    path(
        "invitations/<str:token>/decline",
        account.answer_invitation,
        {"answer": "decline"},
        name="account-invitation-decline",
    ),
    path("organization", account.organization, name="account-organization"),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("login", auth_views.LoginView.as_view(authentication_form=SignInForm), name="login"),
    path("logout", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", healthz, name="healthz"),
    path("docs", SpectacularSwaggerView.as_view(url_name="api:openapi-schema"), name="api-docs"),
    path("account/", include(account_pages)),
    path("", include("jobs.urls")),
    path("admin/", admin.site.urls),
    path("v1/", include((api_v1, "api"))),
]

handler403 = "loft.views.permission_denied"
handler404 = "loft.views.page_not_found"
handler500 = "loft.views.server_error"
