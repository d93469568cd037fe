"""The fine-tuning domain's part of /v1 (included by loft/urls.py in the ``api`` namespace)."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from jobs.api.aliases import AliasViewSet
from jobs.api.chat import ChatCompletionsView
from jobs.api.completions import (
    StoredCompletionFeedbackView,
    StoredCompletionMessagesView,
    StoredCompletionView,
)
from jobs.api.evaluations import EvaluationViewSet
from jobs.api.fine_tuning import AdapterViewSet, FineTuningJobViewSet, UsageView
from jobs.api.views import FileViewSet, ModelDetailView, ModelListView

# OpenAI's paths have no trailing slash.
router = SimpleRouter(trailing_slash=False)
router.register("files", FileViewSet, basename="file")
router.register("fine_tuning/jobs", FineTuningJobViewSet, basename="fine-tuning-job")
router.register("adapters", AdapterViewSet, basename="adapter")
router.register("evaluations", EvaluationViewSet, basename="evaluation")
router.register("aliases", AliasViewSet, basename="alias")

urlpatterns = [
    path("chat/completions", ChatCompletionsView.as_view(), name="chat-completions"),
    path(
        "chat/completions/<str:completion_id>",
        StoredCompletionView.as_view(),
        name="stored-completion",
    ),
    path(
        "chat/completions/<str:completion_id>/messages",
        StoredCompletionMessagesView.as_view(),
        name="stored-completion-messages",
    ),
    path(
        "chat/completions/<str:completion_id>/feedback",
        StoredCompletionFeedbackView.as_view(),
        name="stored-completion-feedback",
    ),
    path("models", ModelListView.as_view(), name="model-list"),
    path("models/<path:model>", ModelDetailView.as_view(), name="model-detail"),
    path("usage", UsageView.as_view(), name="usage"),
    *router.urls,
]
