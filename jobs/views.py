"""Browser pages of the fine-tuning domain: datasets (so far)."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from jobs.models import File, FileInUse
from loft.tenancy import current_org


def _org_or_404(request):
    org = current_org(request)
    if org is None:
        raise Http404("You are not a member of an organization.")
    return org


@login_required
def dataset_list(request):
    org = _org_or_404(request)
    files = File.objects.for_org(org).order_by("-created_at")[:200]
    return render(
        request, "jobs/dataset_list.html", {"files": files, "purposes": File.Purpose.choices}
    )


@login_required
def dataset_detail(request, file_id: str):
    file = get_object_or_404(File.objects.for_org(_org_or_404(request)), pk=file_id)
    return render(request, "jobs/dataset_detail.html", {"file": file, "report": file.report})


@login_required
@require_POST
def dataset_delete(request, file_id: str):
    file = get_object_or_404(File.objects.for_org(_org_or_404(request)), pk=file_id)
    try:
        file.delete_with_content()
    except FileInUse as error:
        messages.error(request, str(error))
        return redirect("dataset-detail", file_id=file.id)
    messages.success(request, f"Deleted {file.filename}.")
    return redirect("dataset-list")
