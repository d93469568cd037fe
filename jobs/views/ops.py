"""The operators' dashboard (/ops/): staff only; figures from jobs/ops.py."""

from django.contrib.auth.views import redirect_to_login
from django.shortcuts import render

from jobs.ops import snapshot
from loft.views import permission_denied


def _staff_only(view):
    def guarded(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not request.user.is_staff:
            return permission_denied(request)
        return view(request, *args, **kwargs)

    guarded.__name__ = view.__name__
    guarded.__doc__ = view.__doc__
    return guarded


@_staff_only
def dashboard(request):
    return render(request, "ops/dashboard.html", snapshot())


@_staff_only
def dashboard_live(request):
    return render(request, "ops/_live.html", snapshot())
