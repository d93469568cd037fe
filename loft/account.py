"""Browser pages of the account: the organization's API keys and its members. (The usage page
is jobs/views/usage.py: usage and quotas are jobs' models.)"""

from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from loft.models import ApiKey, Membership, Organization
from loft.tenancy import org_or_404

API_KEY_NAME_MAX = ApiKey._meta.get_field("name").max_length
ONLY_OWNERS = "Only owners of this organization can add or remove members."


# --- API keys -------------------------------------------------------------------------------


@login_required
@never_cache
def api_keys(request):
    """The keys, and a form that issues one. The new secret is in this response only: it is
    never stored, so a reload (or the back button, with no-store) cannot show it again."""
    org = org_or_404(request)
    context: dict = {"name": ""}
    status = 200
    if request.method == "POST":
        name = request.POST.get("name", "").strip()
        error = _api_key_name_error(name)
        if error:
            context.update(name=name, error=error)
            status = 400
        else:
            context["new_key"], context["new_secret"] = ApiKey.issue(
                org, name=name, created_by=request.user
            )
    context["keys"] = ApiKey.objects.for_org(org).select_related("created_by")
    return render(request, "account/keys.html", context, status=status)


def _api_key_name_error(name: str) -> str:
    if not name:
        return "Give the key a name, so you can tell it apart from the others."
    if len(name) > API_KEY_NAME_MAX:
        return f"The name is longer than {API_KEY_NAME_MAX} characters."
    return ""


@login_required
@require_POST
def revoke_api_key(request, key_id: str):
    key = get_object_or_404(ApiKey.objects.for_org(org_or_404(request)), pk=key_id)
    key.revoke()
    messages.success(request, f"Revoked {key.prefix}… ({key.name or 'unnamed'}).")
    return redirect("account-keys")


# --- members --------------------------------------------------------------------------------


def _is_owner(request, org: Organization) -> bool:
    return (
        Membership.objects.for_org(org)
        .filter(user=request.user, role=Membership.Role.OWNER)
        .exists()
    )


def _members_page(request, org: Organization, status: int = 200, **context):
    members = Membership.objects.for_org(org).select_related("user").order_by("created_at")
    return render(
        request,
        "account/members.html",
        {
            "members": members,
            "is_owner": _is_owner(request, org),
            "only_owners": ONLY_OWNERS,
            "username": "",
            **context,
        },
        status=status,
    )


@login_required
def members(request):
    """The members; an owner adds an existing user, by username, as a member."""
    org = org_or_404(request)
    if request.method != "POST":
        return _members_page(request, org)
    if not _is_owner(request, org):
        return _members_page(request, org, status=403, refused=ONLY_OWNERS)
    username = request.POST.get("username", "").strip()
    user = get_user_model().objects.filter(username=username).first() if username else None
    if user is None:
        error = f"There is no user named {username!r}." if username else "Enter a username."
        return _members_page(request, org, status=400, error=error, username=username)
    if Membership.objects.for_org(org).filter(user=user).exists():
        error = f"{user.username} is already a member of {org.name}."
        return _members_page(request, org, status=400, error=error, username=username)
    org.add_member(user, role=Membership.Role.MEMBER)
    messages.success(request, f"Added {user.username} as a member.")
    return redirect("account-members")


@login_required
@require_POST
def remove_member(request, membership_id: int):
    """An owner removes another member. Not themselves: since the one removing is an owner, the
    organization then always keeps an owner."""
    org = org_or_404(request)
    membership = get_object_or_404(
        Membership.objects.for_org(org).select_related("user"), pk=membership_id
    )
    if not _is_owner(request, org):
        return _members_page(request, org, status=403, refused=ONLY_OWNERS)
    if membership.user_id == request.user.pk:
        return _members_page(
            request,
            org,
            status=400,
            refused="You cannot remove yourself; ask another owner to do it.",
        )
    membership.delete()
    messages.success(request, f"Removed {membership.user.username} from {org.name}.")
    return redirect("account-members")
