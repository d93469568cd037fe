"""What an organization's inference requests are held to before a worker sees one: requests
running at once and tokens per minute, from its Quota row or the operator's defaults (one
Redis script counts both, jobs/inference.py), the API's 429 with ``Retry-After``; and the
metering of answered requests (InferenceUsage) in ``GET /v1/usage``."""

import logging
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from jobs import inference
from jobs.models import InferenceUsage, Quota, month_start
from tests.helpers import stored_adapter

pytestmark = pytest.mark.django_db


@pytest.fixture
def limits(settings):
    """Small defaults to reach: 2 requests at once, 1,000 tokens a minute."""
    settings.LOFT_INFERENCE_CONCURRENT_PER_ORG = 2
    settings.LOFT_INFERENCE_TOKENS_PER_MINUTE_PER_ORG = 1000
    settings.LOFT_INFERENCE_RATE_WINDOW_SECONDS = 60
    return settings


@pytest.fixture
def no_redis(settings):
    """Redis at an address where nothing listens; the real one again afterwards."""
    real = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:9/0"
    inference._redis.cache_clear()
    inference._admit_script.cache_clear()
    yield
    settings.REDIS_URL = real
    inference._redis.cache_clear()
    inference._admit_script.cache_clear()


# --- requests at once -----------------------------------------------------------------------


def test_the_operators_default_caps_the_requests_running_at_once(tenant_a, tenant_b, limits):
    held = [inference.admit(tenant_a.org.id, 10) for _ in range(2)]
    with pytest.raises(inference.TooManyRequests) as refused:
        inference.admit(tenant_a.org.id, 10)
    assert refused.value.limit == "requests" and refused.value.retry_after == 5
    assert "already has 2 generation requests running, its limit" in str(refused.value)
    inference.admit(tenant_b.org.id, 10).release()  # another organization has its own places

    held[0].release()
    held.append(inference.admit(tenant_a.org.id, 10))  # a place given back is taken again
    for slot in held:
        slot.release()


def test_a_quota_row_raises_lowers_or_freezes_the_requests_at_once(tenant_a, limits):
    quota = Quota.objects.create(org=tenant_a.org, max_concurrent_inference=3)
    held = [inference.admit(tenant_a.org.id, 10) for _ in range(3)]
    with pytest.raises(inference.TooManyRequests):
        inference.admit(tenant_a.org.id, 10)
    for slot in held:
        slot.release()

    quota.max_concurrent_inference = 0
    quota.save()
    with pytest.raises(inference.TooManyRequests) as refused:
        inference.admit(tenant_a.org.id, 10)
    assert "allows no generation requests" in str(refused.value)


def test_a_default_of_zero_means_no_limit_on_requests_at_once(tenant_a, limits):
    limits.LOFT_INFERENCE_CONCURRENT_PER_ORG = 0
    held = [inference.admit(tenant_a.org.id, 10) for _ in range(20)]
    for slot in held:
        slot.release()


# --- tokens per minute ----------------------------------------------------------------------


def test_requests_reserve_their_tokens_until_the_minutes_budget_is_spent(
    tenant_a, tenant_b, limits
):
    for _ in range(2):
        inference.admit(tenant_a.org.id, 400).release()  # a place given back keeps its tokens
    with pytest.raises(inference.TooManyRequests) as refused:
        inference.admit(tenant_a.org.id, 201)
    assert refused.value.limit == "tokens"
    assert 55 <= refused.value.retry_after <= 60
    assert str(refused.value) == (
        "Your organization has used 800 of its 1,000 tokens per minute, and this request "
        f"needs 201 (its prompt and max_tokens); try again in {refused.value.retry_after} "
        "seconds."
    )
    inference.admit(tenant_a.org.id, 200).release()  # exactly the rest still fits
    with pytest.raises(inference.TooManyRequests):
        inference.admit(tenant_a.org.id, 1)
    inference.admit(tenant_b.org.id, 1000).release()  # B's budget is its own


def test_the_window_ends_and_the_budget_is_whole_again(tenant_a, limits):
    limits.LOFT_INFERENCE_RATE_WINDOW_SECONDS = 1
    inference.admit(tenant_a.org.id, 1000).release()
    with pytest.raises(inference.TooManyRequests) as refused:
        inference.admit(tenant_a.org.id, 1)
    assert refused.value.retry_after == 1
    assert "1,000 tokens per second" in str(refused.value)
    time.sleep(1.1)
    inference.admit(tenant_a.org.id, 1000).release()


def test_a_quota_row_sets_its_own_budget_and_zero_allows_nothing(tenant_a, limits):
    quota = Quota.objects.create(org=tenant_a.org, max_inference_tokens_per_minute=5000)
    inference.admit(tenant_a.org.id, 5000).release()
    with pytest.raises(inference.TooManyRequests):
        inference.admit(tenant_a.org.id, 1)

    quota.max_inference_tokens_per_minute = 0
    quota.save()
    with pytest.raises(inference.TooManyRequests) as refused:
        inference.admit(tenant_a.org.id, 1)
    assert refused.value.limit == "tokens" and "its limit is 0 tokens" in str(refused.value)

    quota.max_inference_tokens_per_minute = None  # back to the operator's default, 0: none
    quota.save()
    limits.LOFT_INFERENCE_TOKENS_PER_MINUTE_PER_ORG = 0
    inference.admit(tenant_a.org.id, 10**9).release()


def test_a_request_larger_than_the_whole_budget_is_refused_outright(tenant_a, limits):
    with pytest.raises(inference.RequestTooLarge) as refused:
        inference.admit(tenant_a.org.id, 1001)
    assert isinstance(refused.value, inference.PromptRefused)
    assert "asks for 1,001 tokens" in str(refused.value)
    assert "limit of 1,000 tokens per minute" in str(refused.value)
    inference.admit(tenant_a.org.id, 1000).release()  # and reserved nothing


def test_a_request_refused_for_one_limit_takes_nothing_of_the_other(tenant_a, limits):
    limits.LOFT_INFERENCE_CONCURRENT_PER_ORG = 1
    held = inference.admit(tenant_a.org.id, 100)
    with pytest.raises(inference.TooManyRequests) as refused:
        inference.admit(tenant_a.org.id, 100)
    assert refused.value.limit == "requests"
    held.release()
    # 900 tokens are left: the refused request reserved none.
    inference.admit(tenant_a.org.id, 900).release()
    with pytest.raises(inference.TooManyRequests) as refused:
        inference.admit(tenant_a.org.id, 1)
    assert refused.value.limit == "tokens"
    # ... and took no place: the one place is free.
    limits.LOFT_INFERENCE_TOKENS_PER_MINUTE_PER_ORG = 0
    inference.admit(tenant_a.org.id, 1).release()


def test_without_redis_inference_is_unavailable(tenant_a, limits, no_redis):
    with pytest.raises(inference.InferenceUnavailable):
        inference.admit(tenant_a.org.id, 10)


# --- the API's answers ----------------------------------------------------------------------


def generate(api, adapter, max_tokens: int = 4):
    body = {
        "model": adapter.name,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": max_tokens,
    }
    return api.post("/v1/chat/completions", body, format="json")


def test_past_the_tokens_per_minute_the_api_answers_429_with_retry_after(
    api_a, tenant_a, tmp_path, limits
):
    adapter = stored_adapter(tenant_a, tmp_path)
    inference.prompt_tokens(adapter.base_model, [{"role": "user", "content": "Hi"}])  # loaded
    inference.admit(tenant_a.org.id, 1000).release()  # the minute's budget, spent
    refused = generate(api_a, adapter)
    assert refused.status_code == 429, refused.content
    assert 55 <= int(refused["Retry-After"]) <= 60
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert error["param"] is None
    assert error["message"].startswith("Your organization has used 1,000 of its 1,000 tokens")
    assert error["message"].endswith(f"try again in {refused['Retry-After']} seconds.")


def test_past_the_requests_at_once_the_api_answers_429_with_retry_after(
    api_a, tenant_a, tmp_path, limits
):
    adapter = stored_adapter(tenant_a, tmp_path)
    held = [inference.admit(tenant_a.org.id, 1) for _ in range(2)]
    refused = generate(api_a, adapter)
    assert refused.status_code == 429, refused.content
    assert refused["Retry-After"] == "5"
    assert refused.json()["error"]["message"] == (
        "Your organization already has 2 generation requests running, its limit; "
        "try again in 5 seconds."
    )
    for slot in held:
        slot.release()


def test_a_request_larger_than_the_budget_is_a_bad_request(api_a, tenant_a, tmp_path, limits):
    adapter = stored_adapter(tenant_a, tmp_path)
    limits.LOFT_INFERENCE_TOKENS_PER_MINUTE_PER_ORG = 50
    refused = generate(api_a, adapter, max_tokens=64)
    assert refused.status_code == 400, refused.content
    assert "Retry-After" not in refused
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("request_too_large", "max_tokens")
    assert "limit of 50 tokens per minute" in error["message"]


def test_without_redis_the_api_answers_503(api_a, tenant_a, tmp_path, limits, no_redis):
    adapter = stored_adapter(tenant_a, tmp_path)
    response = generate(api_a, adapter)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "inference_unavailable"


# --- metering -------------------------------------------------------------------------------


def test_an_answered_request_is_one_line_of_the_ledger(tenant_a):
    line = InferenceUsage.record(tenant_a.org.id, "support-bot", "ft-abc", "support-bot", 12, 34)
    assert line is not None
    stored = InferenceUsage.objects.get()
    assert (stored.org_id, stored.model, stored.adapter_id, stored.alias) == (
        tenant_a.org.id,
        "support-bot",
        "ft-abc",
        "support-bot",
    )
    assert (stored.prompt_tokens, stored.completion_tokens) == (12, 34)
    base = InferenceUsage.record(tenant_a.org.id, "SmolLM2-135M-Instruct", None, None, 5, 6)
    assert (base.adapter_id, base.alias) == ("", "")


def test_a_line_that_cannot_be_written_is_logged_and_the_caller_goes_on(tenant_a, caplog):
    with caplog.at_level(logging.ERROR, logger="jobs.models.usage"):
        assert InferenceUsage.record(tenant_a.org.id, "m", None, None, 2**63, 1) is None
    assert "was not recorded" in caplog.text
    # The caller's transaction (here, the test's) survived the failed INSERT.
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    assert not InferenceUsage.objects.exists()


def test_the_usage_api_adds_the_months_inference_per_model(api_a, tenant_a, tenant_b):
    record = InferenceUsage.record
    record(tenant_a.org.id, "support-bot", "ft-new", "support-bot", 100, 20)
    record(tenant_a.org.id, "support-bot", "ft-new", "support-bot", 50, 10)
    record(tenant_a.org.id, "SmolLM2-135M-Instruct", None, None, 7, 3)
    record(tenant_b.org.id, "other", None, None, 999, 999)
    old = record(tenant_a.org.id, "support-bot", "ft-old", "support-bot", 1000, 1000)
    last_month = month_start(month_start() - timedelta(days=1))
    InferenceUsage.objects.filter(pk=old.pk).update(created_at=last_month + timedelta(hours=1))

    usage = api_a.get("/v1/usage").json()
    assert usage["totals"]["inference_requests"] == 3
    assert usage["totals"]["inference_prompt_tokens"] == 157
    assert usage["totals"]["inference_completion_tokens"] == 33
    assert usage["inference"] == [
        {
            "model": "support-bot",
            "adapter": "ft-new",
            "alias": "support-bot",
            "requests": 2,
            "prompt_tokens": 150,
            "completion_tokens": 30,
        },
        {
            "model": "SmolLM2-135M-Instruct",
            "adapter": None,
            "alias": None,
            "requests": 1,
            "prompt_tokens": 7,
            "completion_tokens": 3,
        },
    ]
    this, before = usage["months"]
    assert (this["month"], this["jobs"], this["trained_tokens"]) == (
        timezone.now().strftime("%Y-%m"),
        0,
        0,
    )
    assert (this["inference_requests"], this["inference_prompt_tokens"]) == (3, 157)
    assert (before["inference_prompt_tokens"], before["inference_completion_tokens"]) == (
        1000,
        1000,
    )
    assert usage["limits"]["concurrent_inference"] == 4
    assert usage["limits"]["inference_tokens_per_minute"] == 200_000

    last = api_a.get("/v1/usage", {"month": last_month.strftime("%Y-%m")}).json()
    assert [line["adapter"] for line in last["inference"]] == ["ft-old"]
