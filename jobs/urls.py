"""The fine-tuning domain's browser pages (the API's routes are jobs/api/urls.py)."""

from django.urls import path

from jobs.views import adapters, datasets, deployments, jobs, metrics, ops, usage, wizard

urlpatterns = [
    path("metrics", metrics.metrics, name="metrics"),
    path("ops/", ops.dashboard, name="ops"),
    path("ops/live", ops.dashboard_live, name="ops-live"),
    path("train/new", wizard.data_step, name="wizard"),
    path("train/new/model", wizard.model_step, name="wizard-model"),
    path("train/new/review", wizard.review_step, name="wizard-review"),
    path("jobs", jobs.job_list, name="job-list"),
    path("jobs/<str:job_id>", jobs.job_detail, name="job-detail"),
    path("jobs/<str:job_id>/live", jobs.job_live, name="job-live"),
    path("jobs/<str:job_id>/cancel", jobs.job_cancel, name="job-cancel"),
    path("jobs/<str:job_id>/pause", jobs.job_pause, name="job-pause"),
    path("jobs/<str:job_id>/resume", jobs.job_resume, name="job-resume"),
    path("datasets", datasets.dataset_list, name="dataset-list"),
    path("datasets/<str:file_id>", datasets.dataset_detail, name="dataset-detail"),
    path("datasets/<str:file_id>/delete", datasets.dataset_delete, name="dataset-delete"),
    path("datasets/<str:file_id>/leaderboard", datasets.leaderboard, name="leaderboard"),
    path("evaluations/<str:evaluation_id>", datasets.evaluation_detail, name="evaluation-detail"),
    path("adapters", adapters.adapter_list, name="adapter-list"),
    path("adapters/<str:adapter_id>", adapters.adapter_detail, name="adapter-detail"),
    path("adapters/<str:adapter_id>/merge", adapters.adapter_merge, name="adapter-merge"),
    path("adapters/<str:adapter_id>/lineage", adapters.adapter_lineage, name="adapter-lineage"),
    path(
        "adapters/<str:adapter_id>/merged.zip",
        adapters.adapter_merged_download,
        name="adapter-merged-download",
    ),
    path("adapters/<str:adapter_id>/playground", datasets.playground, name="playground"),
    path("deployments/", deployments.deployments, name="deployments"),
    path(
        "deployments/<str:name>/promote", deployments.deployment_promote, name="deployment-promote"
    ),
    path(
        "deployments/<str:name>/traffic",
        deployments.deployment_traffic,
        name="deployment-traffic",
    ),
    path(
        "deployments/<str:name>/traffic/policy",
        deployments.deployment_policy,
        name="deployment-policy",
    ),
    path(
        "deployments/<str:name>/traffic/training-file",
        deployments.deployment_training_file,
        name="deployment-training-file",
    ),
    path(
        "deployments/<str:name>/traffic/<str:completion_id>/feedback",
        deployments.deployment_feedback,
        name="deployment-feedback",
    ),
    path(
        "deployments/<str:name>/rollback",
        deployments.deployment_rollback,
        name="deployment-rollback",
    ),
    path("account/usage", usage.usage, name="account-usage"),
]
