"""Loft's admin site: Django's, except that a signed-in person who is not staff gets 403.

Django's own site sends them to its login form as if they were anonymous; for a tenant's
member that page is a dead end, and the ops pages and /metrics answer 403 too. Anonymous
visitors still go to the login form: they may be staff who have not signed in yet.
"""

from functools import update_wrapper

from django.contrib import admin
from django.contrib.admin.apps import AdminConfig


def permission_denied(request):
    # Imported late: this module is loaded with INSTALLED_APPS, before any model may be.
    from loft.views import permission_denied

    return permission_denied(request)


class LoftAdminSite(admin.AdminSite):
    site_header = "Loft administration"
    site_title = "Loft admin"

    @property
    def login_form(self):
        # Imported late, as above. Failed sign-ins are counted as on /login (loft/auth.py).
        from loft.auth import AdminSignInForm

        return AdminSignInForm

    def _refused(self, request) -> bool:
        return request.user.is_authenticated and not self.has_permission(request)

    def admin_view(self, view, cacheable=False):
        inner = super().admin_view(view, cacheable)

        def guarded(request, *args, **kwargs):
            if self._refused(request):
                return permission_denied(request)
            return inner(request, *args, **kwargs)

        return update_wrapper(guarded, inner)

    def login(self, request, extra_context=None):
        if self._refused(request):
            return permission_denied(request)
        return super().login(request, extra_context)


class LoftAdminConfig(AdminConfig):
    default_site = "loft.admin_site.LoftAdminSite"
