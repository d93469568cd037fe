from django.contrib import admin

from jobs.models import BaseModel


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    list_display = ["name", "source", "revision", "parameters", "context_length", "enabled"]
    list_filter = ["enabled"]
    list_editable = ["enabled"]
    search_fields = ["name"]
    readonly_fields = ["created_at"]
