from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from jobs import job_pages, ops, wizard
from jobs import views as job_views
from jobs.api.evaluations import EvaluationViewSet
from jobs.api.fine_tuning import AdapterViewSet, FineTuningJobViewSet, UsageView
from jobs.api.views import FileViewSet, ModelDetailView, ModelListView
from jobs.metrics import metrics
from loft import views
from loft.api.views import ApiKeyViewSet
from loft.api.webhooks import WebhookEndpointViewSet
from loft.health import healthz

# OpenAI's paths have no trailing slash.
router = SimpleRouter(trailing_slash=False)
router.register("api_keys", ApiKeyViewSet, basename="api-key")
router.register("files", FileViewSet, basename="file")
router.register("fine_tuning/jobs", FineTuningJobViewSet, basename="fine-tuning-job")
router.register("adapters", AdapterViewSet, basename="adapter")
router.register("evaluations", EvaluationViewSet, basename="evaluation")
router.register("webhook_endpoints", WebhookEndpointViewSet, basename="webhook-endpoint")

api_v1 = [
    path("models", ModelListView.as_view(), name="model-list"),
    path("models/<path:model>", ModelDetailView.as_view(), name="model-detail"),
    path("usage", UsageView.as_view(), name="usage"),
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="openapi-schema"),
    *router.urls,
]

urlpatterns = [
    path("", views.home, name="home"),
    path("login", auth_views.LoginView.as_view(), name="login"),
    path("logout", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics, name="metrics"),
    path("ops/", ops.dashboard, name="ops"),
    path("ops/live", ops.dashboard_live, name="ops-live"),
    path("docs", SpectacularSwaggerView.as_view(url_name="api:openapi-schema"), name="api-docs"),
    path("train/new", wizard.data_step, name="wizard"),
    path("train/new/model", wizard.model_step, name="wizard-model"),
    path("train/new/review", wizard.review_step, name="wizard-review"),
    path("jobs", job_pages.job_list, name="job-list"),
    path("jobs/<str:job_id>", job_pages.job_detail, name="job-detail"),
    path("jobs/<str:job_id>/live", job_pages.job_live, name="job-live"),
    path("jobs/<str:job_id>/cancel", job_pages.job_cancel, name="job-cancel"),
    path("datasets", job_views.dataset_list, name="dataset-list"),
    path("datasets/<str:file_id>", job_views.dataset_detail, name="dataset-detail"),
    path("datasets/<str:file_id>/delete", job_views.dataset_delete, name="dataset-delete"),
    path("datasets/<str:file_id>/leaderboard", job_views.leaderboard, name="leaderboard"),
    path("evaluations/<str:evaluation_id>", job_views.evaluation_detail, name="evaluation-detail"),
    path("adapters/<str:adapter_id>/playground", job_views.playground, name="playground"),
    path("account/", include("jobs.account_urls")),
    path("", include("jobs.adapter_urls")),
    path("admin/", admin.site.urls),
    path("v1/", include((api_v1, "api"))),
]

handler403 = "loft.views.permission_denied"
handler404 = "loft.views.page_not_found"
handler500 = "loft.views.server_error"
