from django.contrib import admin

from loft.models import (
    ApiKey,
    Invitation,
    Membership,
    Organization,
    WebhookDelivery,
    WebhookEndpoint,
)


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "is_active", "created_at"]
    list_filter = ["is_active", "created_at"]
    search_fields = ["slug", "name", "id"]
    readonly_fields = ["id", "created_at"]
    inlines = [MembershipInline]  # jobs/admin.py adds the quota
    actions = ["disable", "enable"]

    @admin.action(description="Disable the selected organizations (keys and members refused)")
    def disable(self, request, queryset):
        self.message_user(request, f"Disabled {queryset.update(is_active=False)} organization(s).")

    @admin.action(description="Enable the selected organizations")
    def enable(self, request, queryset):
        self.message_user(request, f"Enabled {queryset.update(is_active=True)} organization(s).")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "name", "org", "scope", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["org", "scope", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["prefix", "name", "org__slug"]
    # Keys are created with `create_api_key` or the API, which show the secret once.
    readonly_fields = [
        "id",
        "org",
        "prefix",
        "created_by",
        "created_at",
        "last_used_at",
        "revoked_at",
    ]
    exclude = ["secret_hash"]
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset):
        for key in queryset:
            key.revoke()
        self.message_user(request, f"Revoked {queryset.count()} key(s).")


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    """Read-only: an owner invites on the members page and the invitee answers there."""

    list_display = ["invitee", "org", "status", "invited_by", "created_at", "answered_at"]
    list_filter = ["status", "org"]
    search_fields = ["invitee", "org__slug"]
    exclude = ["token"]  # the invitee's link: not for display

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    list_display = ["url", "name", "org", "enabled", "created_at"]
    list_filter = ["enabled", "org"]
    search_fields = ["url", "name", "id", "org__slug"]
    # Tenants create endpoints through the API, which shows the secret once; an operator can
    # only switch one off.
    readonly_fields = ["id", "org", "url", "name", "event_types", "created_at"]
    exclude = ["secret"]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = [
        "event_type",
        "endpoint",
        "org",
        "status",
        "attempts",
        "last_response_code",
        "created_at",
    ]
    list_filter = ["status", "event_type", "org"]
    search_fields = ["id", "event_id", "endpoint__url", "org__slug"]
    readonly_fields = [field.name for field in WebhookDelivery._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False
