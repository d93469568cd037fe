"""The admin for operators: every model of the fine-tuning domain, with the columns, filters
and actions running a Loft needs (cancel, retry, enable base models). Fields the server owns
are read-only: an operator acts through actions, which go through the job's lifecycle
methods, never by editing a status."""

from django.contrib import admin
from django.utils.html import format_html

from jobs.models import (
    Adapter,
    Alias,
    AliasMove,
    BaseModel,
    Checkpoint,
    Evaluation,
    File,
    FineTuneJob,
    InferenceUsage,
    JobAttempt,
    JobEvent,
    MonthlyUsage,
    Quota,
    UsageRecord,
    WorkerHeartbeat,
)
from loft.admin import OrganizationAdmin
from loft.models import Organization


def _read_only(model) -> list[str]:
    return [field.name for field in model._meta.fields]


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows the system writes; an operator reads them."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    list_display = ["name", "source", "revision", "parameters", "context_length", "enabled"]
    list_filter = ["enabled"]
    list_editable = ["enabled"]
    search_fields = ["name"]
    readonly_fields = ["created_at"]
    actions = ["enable", "disable"]

    @admin.action(description="Enable the selected base models (offered for new jobs)")
    def enable(self, request, queryset):
        self.message_user(request, f"Enabled {queryset.update(enabled=True)} base model(s).")

    @admin.action(description="Disable the selected base models (existing jobs keep them)")
    def disable(self, request, queryset):
        self.message_user(request, f"Disabled {queryset.update(enabled=False)} base model(s).")


@admin.register(File)
class FileAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "filename",
        "org",
        "purpose",
        "status",
        "rows",
        "tokens",
        "bytes",
        "created_at",
    ]
    list_filter = ["status", "purpose", "org", "created_at"]
    date_hierarchy = "created_at"
    search_fields = ["id", "filename", "org__slug"]
    readonly_fields = _read_only(File)


class JobAttemptInline(admin.TabularInline):
    model = JobAttempt
    extra = 0
    can_delete = False
    readonly_fields = ["number", "worker", "started_at", "ended_at", "outcome"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False


class JobEventInline(admin.TabularInline):
    model = JobEvent
    extra = 0
    can_delete = False
    readonly_fields = ["created_at", "level", "message", "data"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False


class CheckpointInline(admin.TabularInline):
    model = Checkpoint
    extra = 0
    can_delete = False
    readonly_fields = ["step", "attempt", "s3_prefix", "created_at"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(FineTuneJob)
class FineTuneJobAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "org",
        "base_model",
        "method",
        "status",
        "attempt",
        "step",
        "worker",
        "created_at",
        "finished_at",
    ]
    list_filter = ["status", "method", "base_model", "org", "created_at"]
    date_hierarchy = "created_at"
    search_fields = ["id", "org__slug", "suffix", "worker"]
    readonly_fields = _read_only(FineTuneJob)
    inlines = [JobAttemptInline, CheckpointInline, JobEventInline]
    actions = ["cancel", "retry"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="step")
    def step(self, job: FineTuneJob) -> str:
        progress = job.progress or {}
        if "step" not in progress:
            return "–"
        return f"{progress['step']}/{progress.get('total_steps', '?')}"

    @admin.action(description="Cancel the selected jobs")
    def cancel(self, request, queryset):
        for job in queryset:
            job.request_cancel()
        self.message_user(request, f"Asked {queryset.count()} job(s) to cancel.")

    @admin.action(description="Retry the selected failed jobs from their last checkpoint")
    def retry(self, request, queryset):
        retried = [job.id for job in queryset if job.retry(by=f"operator {request.user}")]
        skipped = queryset.count() - len(retried)
        message = f"Queued {len(retried)} job(s) again."
        if skipped:
            message += (
                f" {skipped} could not be retried: only failed jobs that started can be "
                "(a job that failed before starting needs a new job)."
            )
        self.message_user(request, message)


@admin.register(JobAttempt)
class JobAttemptAdmin(ReadOnlyAdmin):
    list_display = ["job", "number", "worker", "started_at", "ended_at", "outcome"]
    list_filter = ["outcome", "started_at"]
    search_fields = ["job__id", "worker"]


@admin.register(Adapter)
class AdapterAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "name",
        "org",
        "base_model",
        "size_bytes",
        "merged_status",
        "created_at",
    ]
    list_filter = ["base_model", "merged_status", "org", "created_at"]
    date_hierarchy = "created_at"
    search_fields = ["id", "name", "org__slug"]
    readonly_fields = _read_only(Adapter)


class AliasMoveInline(admin.TabularInline):
    model = AliasMove
    fields = ["created_at", "kind", "from_adapter", "to_adapter", "actor"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["-created_at", "-id"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Alias)
class AliasAdmin(ReadOnlyAdmin):
    """Aliases move through promote and rollback (the API, the Deployments page), which record
    every move; an operator reads them here, and may delete one."""

    list_display = ["name", "org", "adapter", "updated_at", "created_at"]
    list_filter = ["org", "updated_at"]
    search_fields = ["name", "org__slug", "adapter__id", "adapter__name"]
    inlines = [AliasMoveInline]


@admin.register(AliasMove)
class AliasMoveAdmin(ReadOnlyAdmin):
    list_display = ["alias", "kind", "from_adapter", "to_adapter", "actor", "org", "created_at"]
    list_filter = ["kind", "org", "created_at"]
    date_hierarchy = "created_at"
    search_fields = ["alias__name", "org__slug", "from_adapter", "to_adapter", "actor"]

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Evaluation)
class EvaluationAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "status", "org", "base_model", "job", "file", "created_at"]
    list_filter = ["kind", "status", "base_model", "org", "created_at"]
    date_hierarchy = "created_at"
    search_fields = ["id", "org__slug", "job__id", "adapter__name"]
    readonly_fields = _read_only(Evaluation)

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = ["org", "job", "trained_tokens", "compute_seconds", "created_at"]
    list_filter = ["org", "created_at"]
    date_hierarchy = "created_at"
    search_fields = ["org__slug", "job__id"]


@admin.register(InferenceUsage)
class InferenceUsageAdmin(ReadOnlyAdmin):
    list_display = [
        "org",
        "model",
        "adapter_id",
        "alias",
        "prompt_tokens",
        "completion_tokens",
        "created_at",
    ]
    list_filter = ["org", "created_at"]
    date_hierarchy = "created_at"
    search_fields = ["org__slug", "model", "adapter_id", "alias"]


@admin.register(MonthlyUsage)
class MonthlyUsageAdmin(ReadOnlyAdmin):
    list_display = [
        "month",
        "org",
        "jobs",
        "trained_tokens",
        "compute_seconds",
        "inference_prompt_tokens",
        "inference_completion_tokens",
        "updated_at",
    ]
    list_filter = ["month", "org"]
    search_fields = ["org__slug"]


@admin.register(WorkerHeartbeat)
class WorkerHeartbeatAdmin(ReadOnlyAdmin):
    list_display = [
        "hostname",
        "pid",
        "queues",
        "device",
        "memory",
        "current_job",
        "last_seen",
        "stopped_at",
    ]
    list_filter = ["device", ("stopped_at", admin.EmptyFieldListFilter)]
    search_fields = ["hostname", "current_job"]

    @admin.display(description="memory used / total")
    def memory(self, worker: WorkerHeartbeat) -> str:
        gib = 2**30
        return format_html(
            "{} / {} GiB",
            f"{worker.memory_used_bytes / gib:.1f}",
            f"{worker.memory_total_bytes / gib:.1f}",
        )


class QuotaInline(admin.StackedInline):
    """An organization's limits; an empty field takes the operator's default (settings)."""

    model = Quota
    can_delete = False
    verbose_name_plural = "quota (empty: the default; 0: nothing allowed)"


# An organization's page (loft/admin.py) shows its quota too: the platform knows no quotas, so the
# domain adds its inline here.
admin.site.unregister(Organization)


@admin.register(Organization)
class OrganizationWithQuotaAdmin(OrganizationAdmin):
    inlines = [QuotaInline, *OrganizationAdmin.inlines]
