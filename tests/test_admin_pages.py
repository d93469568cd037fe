"""The Django admin opens for staff on every model, and is closed to others."""

import pytest
from django.contrib import admin
from django.test import Client
from django.urls import reverse

pytestmark = pytest.mark.django_db


def test_every_registered_model_has_a_working_changelist(staff_client):
    for model in admin.site._registry:
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        assert staff_client.get(url).status_code == 200, url


def test_non_staff_are_refused_the_admin(tenant_a):
    browser = Client()
    browser.login(username=tenant_a.user.username, password="pw-for-tests-1")
    assert browser.get("/admin/").status_code == 403
