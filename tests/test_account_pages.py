"""The account pages: usage against quotas, API keys (shown once, revocable, by owners),
members and invitations; each scoped to the signed-in person's organization. And the page of a
person in no organization yet."""

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from jobs.models import File, FineTuneJob, InferenceUsage, Quota, UsageRecord
from loft.models import ApiKey, Invitation, Membership, Organization
from tests.helpers import api_client_for, chat_rows, jsonl, signed_in, upload

pytestmark = pytest.mark.django_db


def created_key(browser: Client, name: str) -> tuple[ApiKey, str, str]:
    """Create a key on the page; the key, its secret and the page that showed it."""
    response = browser.post("/account/keys", {"name": name})
    assert response.status_code == 200
    html = response.content.decode()
    key = ApiKey.objects.get(name=name)
    secret = response.context["new_secret"]
    return key, secret, html


# --- sign-in and tenant walls ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/account/usage", "/account/keys", "/account/members"])
def test_a_signed_out_visitor_is_sent_to_sign_in(path):
    response = Client().get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/login?next=")


def test_a_person_without_an_organization_is_told_so_instead_of_not_found(db):
    loner = get_user_model().objects.create_user("loner", password="pw-for-tests-1")
    browser = signed_in(loner)
    for path in ("/", "/train/new", "/account/usage", "/account/keys", "/account/members"):
        response = browser.get(path)
        assert response.status_code == 302, path
        assert response["Location"].startswith("/account/organization"), path
    page = browser.get("/train/new", follow=True)
    html = page.content.decode()
    assert page.status_code == 200
    assert "You are not a member of any organization yet" in html
    assert "can invite you by your username, <strong>loner</strong>" in html
    # Creating or joining an organization is for staff.
    assert "Create an organization" not in html
    refused = browser.post("/account/organization", {"action": "create", "name": "Mine"})
    assert refused.status_code == 403
    assert not Organization.objects.filter(slug="mine").exists()


def test_staff_in_no_organization_creates_one_and_lands_where_they_were_going(staff_client):
    page = staff_client.get("/train/new", follow=True)
    assert "Create an organization" in page.content.decode()
    created = staff_client.post(
        "/account/organization",
        {"action": "create", "name": "My team", "next": "/train/new"},
        follow=True,
    )
    assert created.redirect_chain[-1] == ("/train/new", 302)
    assert "Created My team; you are its owner." in created.content.decode()
    org = Organization.objects.get(slug="my-team")
    assert org.is_owner(created.wsgi_request.user)
    again = staff_client.post("/account/organization", {"action": "create", "name": "My Team"})
    assert again.status_code == 400
    assert "There is already an organization my-team; join it instead." in again.content.decode()


def test_staff_joins_an_existing_organization_as_its_owner(staff, staff_client, tenant_b):
    joined = staff_client.post(
        "/account/organization", {"action": "join", "slug": tenant_b.org.slug}, follow=True
    )
    assert f"You joined {tenant_b.org.name} as an owner." in joined.content.decode()
    assert tenant_b.org.is_owner(staff)
    unknown = staff_client.post("/account/organization", {"action": "join", "slug": "nope"})
    assert unknown.status_code == 400


# --- usage ----------------------------------------------------------------------------------


def test_the_usage_page_shows_the_ledger_against_the_quotas(tenant_a, tenant_b):
    Quota.objects.create(org=tenant_a.org, max_monthly_trained_tokens=100_000)
    UsageRecord.objects.create(org=tenant_a.org, trained_tokens=12_345, compute_seconds=67.84)
    UsageRecord.objects.create(org=tenant_b.org, trained_tokens=999_999, compute_seconds=1)

    response = signed_in(tenant_a).get("/account/usage")
    assert response.status_code == 200
    html = response.content.decode()
    assert "12,345 of 100,000 (12%)" in html
    assert '<progress class="meter" max="100" value="12"' in html
    assert "67.8 seconds" in html
    assert "0 of 4 (0%)" in html  # concurrent jobs, the operator's default limit
    assert "999,999" not in html
    assert [row["trained_tokens"] for row in response.context["usage"].months] == [12_345]


def test_a_limit_of_none_reads_no_limit_and_an_empty_ledger_says_so(tenant_b):
    html = signed_in(tenant_b).get("/account/usage").content.decode()
    assert "0 — no limit." in html  # monthly trained tokens: no default limit
    assert "No usage yet" in html and "No jobs finished this month yet." in html


def test_the_page_and_the_api_report_the_same_figures(tenant_a, api_a):
    UsageRecord.objects.create(org=tenant_a.org, trained_tokens=500, compute_seconds=2.25)
    usage = signed_in(tenant_a).get("/account/usage").context["usage"]
    assert usage.as_json() == api_a.get("/v1/usage").json()


# --- API keys -------------------------------------------------------------------------------


def test_the_keys_page_lists_only_the_organizations_keys(tenant_a, tenant_b):
    html = signed_in(tenant_a).get("/account/keys").content.decode()
    assert f"{tenant_a.key.prefix}…" in html and "a key" in html
    assert tenant_b.key.prefix not in html and "b key" not in html
    assert "Revoke" in html


def test_a_new_key_is_shown_once_and_works_against_the_api(tenant_a):
    browser = signed_in(tenant_a)
    key, secret, html = created_key(browser, "laptop")
    assert secret in html
    assert "Copy it now, it will not be shown again." in html
    assert "no-store" in browser.get("/account/keys")["Cache-Control"]
    assert key.org == tenant_a.org and key.created_by == tenant_a.user

    reloaded = browser.get("/account/keys").content.decode()
    assert secret not in reloaded and "Copy it now" not in reloaded
    assert f"{key.prefix}…" in reloaded and "laptop" in reloaded

    assert api_client_for(secret).get("/v1/files").status_code == 200


def test_a_revoked_key_stops_working(tenant_a):
    browser = signed_in(tenant_a)
    key, secret, _ = created_key(browser, "ci")
    response = browser.post(f"/account/keys/{key.id}/revoke", follow=True)
    assert response.redirect_chain == [("/account/keys", 302)]
    assert f"Revoked {key.prefix}… (ci)." in response.content.decode()
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert api_client_for(secret).get("/v1/files").status_code == 401


def test_another_tenants_key_cannot_be_revoked(tenant_a, tenant_b):
    response = signed_in(tenant_b).post(f"/account/keys/{tenant_a.key.id}/revoke")
    assert response.status_code == 404
    tenant_a.key.refresh_from_db()
    assert tenant_a.key.is_active


def test_revoking_needs_a_post(tenant_a):
    assert signed_in(tenant_a).get(f"/account/keys/{tenant_a.key.id}/revoke").status_code == 405


def test_a_key_without_a_name_is_refused_with_a_sentence_beside_the_field(tenant_a):
    response = signed_in(tenant_a).post("/account/keys", {"name": "  "})
    assert response.status_code == 400
    assert "Give the key a name" in response.content.decode()
    assert ApiKey.objects.for_org(tenant_a.org).count() == 1


def test_a_too_long_name_is_refused(tenant_a):
    response = signed_in(tenant_a).post("/account/keys", {"name": "x" * 101})
    assert response.status_code == 400
    assert "longer than 100 characters" in response.content.decode()


# --- members --------------------------------------------------------------------------------


def test_the_members_page_lists_the_organizations_members(tenant_a, tenant_b):
    html = signed_in(tenant_a).get("/account/members").content.decode()
    assert "a-person" in html and "owner" in html
    assert "b-person" not in html
    assert "Invite a member" in html


def test_a_member_sees_the_list_read_only_and_cannot_add(tenant_a, tenant_b):
    browser = signed_in(tenant_b)
    html = browser.get("/account/members").content.decode()
    assert "b-person" in html
    assert "Only owners of this organization can invite or remove members." in html
    assert "<button" not in html.split("</header>")[1]
    response = browser.post("/account/members", {"invitee": tenant_a.user.username})
    assert response.status_code == 403
    assert not Invitation.objects.exists()


def test_an_owner_invites_the_invitee_accepts_and_the_owner_removes_them(tenant_a, tenant_b):
    owner = signed_in(tenant_a)
    response = owner.post("/account/members", {"invitee": "b-person"}, follow=True)
    assert "Invited b-person." in response.content.decode()
    # Nobody joins without consent: an invitation, not a membership.
    assert not Membership.objects.for_org(tenant_a.org).filter(user=tenant_b.user).exists()
    assert "b-person" in owner.get("/account/members").content.decode()  # pending

    invitee = signed_in(tenant_b)
    assert "1 invitation to another organization" in invitee.get("/").content.decode()
    page = invitee.get("/account/organization").content.decode()
    assert "a-person invites you to <strong>Org A</strong>" in page
    invitation = Invitation.objects.get(invitee="b-person")
    joined = invitee.post(f"/account/invitations/{invitation.token}/accept", follow=True)
    assert "You joined Org A." in joined.content.decode()
    membership = Membership.objects.for_org(tenant_a.org).get(user=tenant_b.user)
    assert membership.role == Membership.Role.MEMBER
    # From now on the session acts for the organization just joined.
    assert invitee.get("/account/members").context["org"] == tenant_a.org

    response = owner.post(f"/account/members/{membership.pk}/remove", follow=True)
    assert "Removed b-person from Org A." in response.content.decode()
    assert not Membership.objects.for_org(tenant_a.org).filter(user=tenant_b.user).exists()


def test_inviting_says_the_same_whether_or_not_the_person_exists(tenant_a, tenant_b):
    """An owner cannot learn who has an account on the instance."""
    browser = signed_in(tenant_a)
    said = {}
    for invitee in ("b-person", "nobody-at-all"):
        response = browser.post("/account/members", {"invitee": invitee})
        notices = [
            str(message) for message in browser.get(response["Location"]).context["messages"]
        ]
        said[invitee] = (response.status_code, response["Location"], notices)
        said[invitee] = str(said[invitee]).replace(invitee, "NAME")
    assert said["b-person"] == said["nobody-at-all"]
    assert "If they have an account on Loft, they see the invitation" in said["b-person"]
    assert Invitation.objects.for_org(tenant_a.org).count() == 2
    # Inviting again keeps the one invitation.
    browser.post("/account/members", {"invitee": "b-person"})
    assert Invitation.objects.for_org(tenant_a.org).filter(invitee="b-person").count() == 1


def test_inviting_nobody_or_a_member_says_why(tenant_a):
    browser = signed_in(tenant_a)
    empty = browser.post("/account/members", {"invitee": " "})
    assert empty.status_code == 400
    assert "Enter the username or the e-mail address" in empty.content.decode()
    twice = browser.post("/account/members", {"invitee": "a-person"})
    assert twice.status_code == 400
    assert "a-person is already a member of Org A." in twice.content.decode()
    assert not Invitation.objects.exists()


def test_an_invitation_by_e_mail_reaches_the_account_with_that_address(tenant_a, tenant_b):
    tenant_b.user.email = "Bea@Example.com"
    tenant_b.user.save()
    signed_in(tenant_a).post("/account/members", {"invitee": "bea@example.com"})
    invitation = Invitation.objects.get()
    assert list(Invitation.pending_for(tenant_b.user)) == [invitation]
    declined = signed_in(tenant_b).post(f"/account/invitations/{invitation.token}/decline")
    assert declined.status_code == 302
    invitation.refresh_from_db()
    assert invitation.status == Invitation.Status.DECLINED
    assert not Membership.objects.for_org(tenant_a.org).filter(user=tenant_b.user).exists()


def test_an_invitation_is_only_for_the_person_it_names(tenant_a, tenant_b, member_a):
    invitation = tenant_a.org.invite("somebody-else", invited_by=tenant_a.user)
    for person in (tenant_b, member_a):
        response = signed_in(person).post(f"/account/invitations/{invitation.token}/accept")
        assert response.status_code == 404
    invitation.refresh_from_db()
    assert invitation.status == Invitation.Status.PENDING


def test_an_owner_withdraws_an_invitation_and_a_member_cannot(tenant_a, member_a):
    invitation = tenant_a.org.invite("someone", invited_by=tenant_a.user)
    refused = signed_in(member_a).post(f"/account/invitations/{invitation.pk}/withdraw")
    assert refused.status_code == 403
    withdrawn = signed_in(tenant_a).post(
        f"/account/invitations/{invitation.pk}/withdraw", follow=True
    )
    assert "Withdrew the invitation of someone." in withdrawn.content.decode()
    assert not Invitation.objects.exists()


def test_an_owner_cannot_remove_themselves(tenant_a):
    own = Membership.objects.for_org(tenant_a.org).get(user=tenant_a.user)
    response = signed_in(tenant_a).post(f"/account/members/{own.pk}/remove")
    assert response.status_code == 400
    assert "You cannot remove yourself" in response.content.decode()
    assert Membership.objects.filter(pk=own.pk).exists()


def test_a_member_cannot_remove_anyone(tenant_b, django_user_model):
    colleague = django_user_model.objects.create_user("c-person", password="pw-for-tests-1")
    membership = tenant_b.org.add_member(colleague)
    response = signed_in(tenant_b).post(f"/account/members/{membership.pk}/remove")
    assert response.status_code == 403
    assert "Only owners of this organization" in response.content.decode()
    assert Membership.objects.filter(pk=membership.pk).exists()


def test_another_organizations_membership_is_not_found(tenant_a, tenant_b):
    member_of_b = Membership.objects.for_org(tenant_b.org).get(user=tenant_b.user)
    response = signed_in(tenant_a).post(f"/account/members/{member_of_b.pk}/remove")
    assert response.status_code == 404
    assert Membership.objects.filter(pk=member_of_b.pk).exists()


# --- a member of the organization, beside its owner -----------------------------------------


def queued_job(api, tenant, filename: str) -> FineTuneJob:
    """A one-step job on a fresh file, queued (on the test's private queue: no worker takes it)."""
    file_id = upload(api, jsonl(chat_rows(30)), name=filename).json()["id"]
    return FineTuneJob.submit(
        org=tenant.org,
        training_file=File.objects.get(pk=file_id),
        hyperparameters={"max_steps": 1, "batch_size": 2, "max_seq_length": 128},
    )


def ids(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [item["id"] for item in response.json()["data"]]


@pytest.mark.usefixtures("private_queue")
def test_a_member_sees_the_organizations_files_jobs_keys_and_members_as_the_owner_does(
    tenant_a, member_a, api_a
):
    job = queued_job(api_a, tenant_a, "shared.jsonl")
    file_id = job.training_file_id
    owner, member = signed_in(tenant_a), signed_in(member_a)
    # The API, by the member's own key and by the member's session: the owner's answers.
    for path, expected in (("/v1/files", [file_id]), ("/v1/fine_tuning/jobs", [job.id])):
        assert ids(api_a.get(path)) == expected
        assert ids(api_client_for(member_a.secret).get(path)) == expected, path
        assert ids(member.get(path)) == expected, path
    # The pages.
    for path, shown in (
        ("/datasets", "shared.jsonl"),
        (f"/datasets/{file_id}", "shared.jsonl"),
        ("/jobs", job.id),
        (f"/jobs/{job.id}", job.id),
        ("/account/keys", f"{tenant_a.key.prefix}…"),
        ("/account/members", "a-person"),
    ):
        for browser in (owner, member):
            response = browser.get(path)
            assert response.status_code == 200, path
            assert shown in response.content.decode(), path
    members = member.get("/account/members").content.decode()
    assert "a-member (you)" in members and "b-person" not in members


def test_a_member_can_neither_add_nor_remove_members_which_only_owners_can(
    tenant_a, member_a, tenant_b
):
    browser = signed_in(member_a)
    html = browser.get("/account/members").content.decode()
    assert "Only owners of this organization can invite or remove members." in html
    assert "<button" not in html.split("</header>")[1]

    invited = browser.post("/account/members", {"invitee": tenant_b.user.username})
    assert invited.status_code == 403
    assert "Only owners of this organization" in invited.content.decode()
    assert not Invitation.objects.exists()

    owners = Membership.objects.for_org(tenant_a.org).get(user=tenant_a.user)
    own = Membership.objects.for_org(tenant_a.org).get(user=member_a.user)
    for membership in (owners, own):  # not the owner, and not themselves either
        response = browser.post(f"/account/members/{membership.pk}/remove")
        assert response.status_code == 403
        assert Membership.objects.filter(pk=membership.pk).exists()

    # The owner can.
    response = signed_in(tenant_a).post(f"/account/members/{own.pk}/remove", follow=True)
    assert "Removed a-member from Org A." in response.content.decode()
    assert not Membership.objects.filter(pk=own.pk).exists()


def test_a_member_sees_the_keys_but_only_owners_create_or_revoke_them(tenant_a, member_a):
    browser = signed_in(member_a)
    html = browser.get("/account/keys").content.decode()
    assert f"{tenant_a.key.prefix}…" in html
    assert "Only owners of this organization can create or revoke API keys." in html
    assert "Create a key" not in html and "Revoke" not in html

    created = browser.post("/account/keys", {"name": "member laptop"})
    assert created.status_code == 403
    assert not ApiKey.objects.filter(name="member laptop").exists()
    revoked = browser.post(f"/account/keys/{tenant_a.key.id}/revoke")
    assert revoked.status_code == 403
    tenant_a.key.refresh_from_db()
    assert tenant_a.key.is_active


def test_an_owner_issues_a_key_that_may_manage_keys(tenant_a):
    browser = signed_in(tenant_a)
    response = browser.post("/account/keys", {"name": "automation", "scope": "manage_keys"})
    assert response.status_code == 200
    key = ApiKey.objects.get(name="automation")
    assert key.can_manage_keys
    secret = response.context["new_secret"]
    created = api_client_for(secret).post("/v1/api_keys", {"name": "made"}, format="json")
    assert created.status_code == 201
    bad = browser.post("/account/keys", {"name": "x", "scope": "root"})
    assert bad.status_code == 400
    assert "Choose what the key may do" in bad.content.decode()


def test_the_usage_page_shows_the_months_inference_and_its_limits(tenant_a, tenant_b):
    Quota.objects.create(org=tenant_a.org, max_inference_tokens_per_minute=50_000)
    InferenceUsage.record(tenant_a.org.id, "support-bot", "ft-abc", "support-bot", 12_345, 678)
    InferenceUsage.record(tenant_a.org.id, "SmolLM2-135M-Instruct", None, None, 10, 2)
    InferenceUsage.record(tenant_b.org.id, "other", None, None, 999_999, 1)

    response = signed_in(tenant_a).get("/account/usage")
    html = response.content.decode()
    assert "<dt>Prompt tokens</dt><dd>12,355</dd>" in html
    assert "<dt>Completion tokens</dt><dd>680</dd>" in html
    assert "<dt>Answered requests</dt><dd>2</dd>" in html
    assert "at most 50,000 (prompt and max_tokens" in html  # tokens per minute, its own
    assert "<dt>Requests at once</dt><dd>at most 4</dd>" in html  # the operator's default
    assert "<code>ft-abc</code>" in html and "base model" in html
    assert "999,999" not in html and "No usage yet" not in html
    [month] = response.context["usage"].months
    assert (month["jobs"], month["inference_prompt_tokens"]) == (0, 12_355)


def test_an_organization_without_inference_reads_so(tenant_b):
    html = signed_in(tenant_b).get("/account/usage").content.decode()
    assert "No chat completions answered this month yet." in html


@pytest.mark.usefixtures("private_queue")
def test_a_job_pauses_and_resumes_from_its_page_and_another_tenants_job_is_not_found(
    tenant_a, tenant_b, api_a
):
    job = queued_job(api_a, tenant_a, "paused.jsonl")
    browser = signed_in(tenant_a)
    assert f'action="/jobs/{job.id}/pause"' in browser.get(f"/jobs/{job.id}").content.decode()

    page = browser.post(f"/jobs/{job.id}/pause", follow=True).content.decode()
    job.refresh_from_db()
    assert job.status == FineTuneJob.Status.PAUSED
    assert "Paused before it started" in page and f'action="/jobs/{job.id}/resume"' in page
    assert (
        "only a queued or running job pauses"
        in browser.post(f"/jobs/{job.id}/pause", follow=True).content.decode()
    )

    assert signed_in(tenant_b).post(f"/jobs/{job.id}/resume").status_code == 404
    job.refresh_from_db()
    assert job.status == FineTuneJob.Status.PAUSED

    page = browser.post(f"/jobs/{job.id}/resume", follow=True).content.decode()
    job.refresh_from_db()
    assert job.status == FineTuneJob.Status.QUEUED
    assert "Resumed: the job is queued" in page
    assert (
        "nothing to resume" in browser.post(f"/jobs/{job.id}/resume", follow=True).content.decode()
    )
