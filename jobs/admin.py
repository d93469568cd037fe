from django.contrib import admin

from jobs.models import (
    Adapter,
    BaseModel,
    Checkpoint,
    Evaluation,
    File,
    FineTuneJob,
    JobEvent,
)


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    list_display = ["name", "source", "revision", "parameters", "context_length", "enabled"]
    list_filter = ["enabled"]
    list_editable = ["enabled"]
    search_fields = ["name"]
    readonly_fields = ["created_at"]


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
    list_filter = ["status", "purpose", "org"]
    search_fields = ["id", "filename", "org__slug"]
    readonly_fields = [f.name for f in File._meta.fields]


class JobEventInline(admin.TabularInline):
    model = JobEvent
    extra = 0
    can_delete = False
    readonly_fields = ["created_at", "level", "message", "data"]


class CheckpointInline(admin.TabularInline):
    model = Checkpoint
    extra = 0
    can_delete = False
    readonly_fields = ["step", "attempt", "s3_prefix", "created_at"]


@admin.register(FineTuneJob)
class FineTuneJobAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "org",
        "base_model",
        "method",
        "status",
        "attempt",
        "created_at",
        "finished_at",
    ]
    list_filter = ["status", "method", "org", "base_model"]
    search_fields = ["id", "org__slug", "suffix"]
    readonly_fields = [f.name for f in FineTuneJob._meta.fields]
    inlines = [CheckpointInline, JobEventInline]
    actions = ["cancel"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Cancel the selected jobs")
    def cancel(self, request, queryset):
        for job in queryset:
            job.request_cancel()
        self.message_user(request, f"Asked {queryset.count()} job(s) to cancel.")


@admin.register(Adapter)
class AdapterAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "org", "base_model", "size_bytes", "created_at"]
    list_filter = ["org", "base_model"]
    search_fields = ["id", "name", "org__slug"]
    readonly_fields = [f.name for f in Adapter._meta.fields]


@admin.register(Evaluation)
class EvaluationAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "status", "org", "base_model", "job", "file", "created_at"]
    list_filter = ["kind", "status", "org", "base_model"]
    search_fields = ["id", "org__slug", "job__id", "adapter__name"]
    readonly_fields = [f.name for f in Evaluation._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False
