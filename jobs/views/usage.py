"""The usage page: this month's usage against the organization's quotas, every month's totals
and the month's ledger lines. The figures are those of ``GET /v1/usage`` (jobs/usage.py)."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from jobs.usage import quota_meters, usage_of
from loft.tenancy import org_or_404

RECENT_LINES = 50


@login_required
def usage(request):
    org = org_or_404(request)
    this_month = usage_of(org, max_records=RECENT_LINES)
    return render(
        request,
        "account/usage.html",
        {
            "usage": this_month,
            "meters": quota_meters(org, this_month),
            "recent_lines": RECENT_LINES,
        },
    )
