import importlib.util, json, pytest
from rest_framework.test import APIRequestFactory, force_authenticate
from jobs.models import UsageRecord, Quota
from jobs.api.fine_tuning import UsageView as New
spec = importlib.util.spec_from_file_location("old_ft", "/tmp/usagecmp/old_fine_tuning.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
from tests.conftest import tenant_a  # noqa

@pytest.mark.django_db
def test_same(tenant_a):
    for i in range(3):
        UsageRecord.objects.create(org=tenant_a.org, trained_tokens=100+i, compute_seconds=1.25*i)
    Quota.objects.create(org=tenant_a.org, max_storage_bytes=10)
    for q in ("", "?month=2020-01"):
        bodies = []
        for view in (old.UsageView, New):
            r = api_request = APIRequestFactory().get("/v1/usage" + q, HTTP_AUTHORIZATION=f"Bearer {tenant_a.secret}")
            resp = view.as_view()(r); resp.render()
            bodies.append(resp.content)
        assert bodies[0] == bodies[1], bodies
        print(bodies[0][:300])
