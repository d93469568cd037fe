"""Browser pages of the account: the organization's API keys, its members and invitations, and
the page of a person who belongs to no organization yet. (The usage page is
jobs/views/usage.py: usage and quotas are jobs' models.)"""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.text import slugify
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from loft.auth import may_manage_keys
from loft.models import ApiKey, Invitation, Membership, Organization
from loft.tenancy import SESSION_ORG_KEY, org_or_404

API_KEY_NAME_MAX = ApiKey._meta.get_field("name").max_length
INVITEE_MAX = Invitation._meta.get_field("invitee").max_length
ORG_NAME_MAX = Organization._meta.get_field("name").max_length
ONLY_OWNERS = "Only owners of this organization can invite or remove members."
ONLY_OWNERS_KEYS = "Only owners of this organization can create or revoke API keys."


# --- API keys -------------------------------------------------------------------------------


def _keys_page(request, org: Organization, status: int = 200, **context):
    return render(
        request,
        "account/keys.html",
        {
            "keys": ApiKey.objects.for_org(org).select_related("created_by"),
            "may_manage": may_manage_keys(request, org),
            "only_owners": ONLY_OWNERS_KEYS,
            "scopes": ApiKey.Scope.choices,
            "name": "",
            "scope": ApiKey.Scope.STANDARD,
            **context,
        },
        status=status,
    )


@login_required
@never_cache
def api_keys(request):
    """The keys, and for owners a form that issues one. The new secret is in this response
    only: it is never stored, so a reload (or the back button, with no-store) cannot show it."""
    org = org_or_404(request)
    if request.method != "POST":
        return _keys_page(request, org)
    if not may_manage_keys(request, org):
        return _keys_page(request, org, status=403, refused=ONLY_OWNERS_KEYS)
    name = request.POST.get("name", "").strip()
    scope = request.POST.get("scope", ApiKey.Scope.STANDARD)
    error = _api_key_name_error(name)
    if scope not in ApiKey.Scope.values:
        error = "Choose what the key may do from the list."
    if error:
        return _keys_page(request, org, status=400, error=error, name=name, scope=scope)
    new_key, new_secret = ApiKey.issue(org, name=name, created_by=request.user, scope=scope)
    return _keys_page(request, org, new_key=new_key, new_secret=new_secret)


def _api_key_name_error(name: str) -> str:
    if not name:
        return "Give the key a name, so you can tell it apart from the others."
    if len(name) > API_KEY_NAME_MAX:
        return f"The name is longer than {API_KEY_NAME_MAX} characters."
    return ""


@login_required
@require_POST
def revoke_api_key(request, key_id: str):
    org = org_or_404(request)
    key = get_object_or_404(ApiKey.objects.for_org(org), pk=key_id)
    if not may_manage_keys(request, org):
        return _keys_page(request, org, status=403, refused=ONLY_OWNERS_KEYS)
    key.revoke()
    messages.success(request, f"Revoked {key.prefix}… ({key.name or 'unnamed'}).")
    return redirect("account-keys")


# --- members and invitations ----------------------------------------------------------------


def _members_page(request, org: Organization, status: int = 200, **context):
    members = Membership.objects.for_org(org).select_related("user").order_by("created_at")
    is_owner = org.is_owner(request.user)
    invitations = (
        Invitation.objects.for_org(org)
        .filter(status=Invitation.Status.PENDING)
        .select_related("invited_by")
        if is_owner
        else []
    )
    return render(
        request,
        "account/members.html",
        {
            "members": members,
            "invitations": invitations,
            "is_owner": is_owner,
            "only_owners": ONLY_OWNERS,
            "invitee": "",
            **context,
        },
        status=status,
    )


@login_required
def members(request):
    """The members; an owner invites someone by username or e-mail address. The answer is the
    same whether or not such a person has an account: the page tells nobody who is on Loft."""
    org = org_or_404(request)
    if request.method != "POST":
        return _members_page(request, org)
    if not org.is_owner(request.user):
        return _members_page(request, org, status=403, refused=ONLY_OWNERS)
    invitee = request.POST.get("invitee", "").strip()
    error = ""
    if not invitee:
        error = "Enter the username or the e-mail address of the person to invite."
    elif len(invitee) > INVITEE_MAX:
        error = f"That is longer than {INVITEE_MAX} characters."
    elif org.has_member_called(invitee):
        error = f"{invitee} is already a member of {org.name}."
    if error:
        return _members_page(request, org, status=400, error=error, invitee=invitee)
    org.invite(invitee, invited_by=request.user)
    messages.success(
        request,
        f"Invited {invitee}. If they have an account on Loft, they see the invitation when "
        "they sign in, and join once they accept it.",
    )
    return redirect("account-members")


@login_required
@require_POST
def withdraw_invitation(request, invitation_id: int):
    org = org_or_404(request)
    invitation = get_object_or_404(
        Invitation.objects.for_org(org).filter(status=Invitation.Status.PENDING), pk=invitation_id
    )
    if not org.is_owner(request.user):
        return _members_page(request, org, status=403, refused=ONLY_OWNERS)
    invitation.delete()
    messages.success(request, f"Withdrew the invitation of {invitation.invitee}.")
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
    if not org.is_owner(request.user):
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


# --- your organizations: invitations to answer, and for staff a first organization ---------


def _organization_page(request, status: int = 200, **context):
    memberships = (
        Membership.objects.filter(user=request.user, org__is_active=True)
        .select_related("org")
        .order_by("created_at")
    )
    return render(
        request,
        "account/organization.html",
        {
            "memberships": memberships,
            "invitations": Invitation.pending_for(request.user),
            "organizations": Organization.objects.filter(is_active=True).order_by("slug")
            if request.user.is_staff
            else [],
            "next": _safe_next(request),
            "new_name": "",
            **context,
        },
        status=status,
    )


def _safe_next(request) -> str:
    """Where to go once in an organization: the page that sent the person here, if it is ours."""
    target = request.POST.get("next") or request.GET.get("next") or ""
    if url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return ""


def _enter(request, org: Organization, said: str):
    """Act for ``org`` from now on, and go where the person was going."""
    request.session[SESSION_ORG_KEY] = org.pk
    messages.success(request, said)
    return redirect(_safe_next(request) or "home")


@login_required
def organization(request):
    """Where a signed-in person who belongs to no organization lands (loft.tenancy sends them):
    it says so, lists the invitations waiting for them, and lets staff create an organization
    or join one, as its owner."""
    if request.method != "POST":
        return _organization_page(request)
    if not request.user.is_staff:
        return _organization_page(
            request, status=403, refused="Only staff can create or join an organization."
        )
    if request.POST.get("action") == "join":
        org = Organization.objects.filter(is_active=True, slug=request.POST.get("slug")).first()
        if org is None:
            return _organization_page(
                request, status=400, join_error="Choose an organization from the list."
            )
        org.add_member(request.user, role=Membership.Role.OWNER)
        return _enter(request, org, f"You joined {org.name} as an owner.")
    name = request.POST.get("name", "").strip()
    slug = slugify(name)[: Organization._meta.get_field("slug").max_length]
    error = ""
    if not slug:
        error = "Give the organization a name, with letters or digits."
    elif len(name) > ORG_NAME_MAX:
        error = f"The name is longer than {ORG_NAME_MAX} characters."
    elif Organization.objects.filter(slug=slug).exists():
        error = f"There is already an organization {slug}; join it instead."
    if error:
        return _organization_page(request, status=400, create_error=error, new_name=name)
    with transaction.atomic():
        org = Organization.objects.create(name=name, slug=slug)
        org.add_member(request.user, role=Membership.Role.OWNER)
    return _enter(request, org, f"Created {org.name}; you are its owner.")


@login_required
@require_POST
def answer_invitation(request, token: str, answer: str):
    invitation = get_object_or_404(Invitation.pending_for(request.user), token=token)
    if answer == "decline":
        invitation.decline()
        messages.success(request, f"Declined the invitation to {invitation.org.name}.")
        return redirect("account-organization")
    invitation.accept(request.user)
    return _enter(request, invitation.org, f"You joined {invitation.org.name}.")
