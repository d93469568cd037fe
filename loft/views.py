"""Browser pages of the platform: the home page and the error pages."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render

from loft.api.errors import error_response
from loft.models import ApiKey, Invitation
from loft.tenancy import current_org


def _wants_json(request) -> bool:
    return request.path.startswith("/v1/")


@login_required
def home(request):
    org = current_org(request)
    if org is None:
        return redirect("account-organization")
    keys = ApiKey.objects.for_org(org).filter(revoked_at__isnull=True)[:10]
    invitations = Invitation.pending_for(request.user).count()
    return render(request, "home.html", {"api_keys": keys, "invitations": invitations})


def page_not_found(request, exception=None):
    if _wants_json(request):
        return error_response(
            404,
            f"Unknown request URL: {request.method} {request.path}.",
            "invalid_request_error",
            code="unknown_url",
        )
    return render(request, "404.html", status=404)


def permission_denied(request, exception=None):
    if _wants_json(request):
        return error_response(
            403, "You may not do this with this key.", "invalid_request_error", code="forbidden"
        )
    return render(request, "403.html", status=403)


def server_error(request):
    if _wants_json(request):
        return error_response(
            500, "The server had an error while processing your request.", "server_error"
        )
    return render(request, "500.html", status=500)
