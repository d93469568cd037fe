"""Building blocks every /v1 view uses: OpenAI's list shape, tenant scoping, unix timestamps."""

from __future__ import annotations

from datetime import UTC, datetime

from django.db.models import BigIntegerField, Func, Q
from django.utils.functional import cached_property
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers, viewsets
from rest_framework.pagination import BasePagination
from rest_framework.response import Response

from loft.api.errors import LoftAPIError
from loft.tenancy import current_org


def is_id_like(text: str, max_length: int = 100) -> bool:
    """Could this be an object's id? (PostgreSQL refuses NUL in text: such an id is just not
    found, rather than a database error.)"""
    return len(text) <= max_length and "\x00" not in text


@extend_schema_field(OpenApiTypes.STR)
class ObjectTypeField(serializers.Field):
    """OpenAI's ``object`` member: the same word for every object of a kind ("file", …)."""

    def __init__(self, object_type: str):
        self.object_type = object_type
        super().__init__(read_only=True, source="*")

    def to_representation(self, value) -> str:
        return self.object_type


class UnixTimestampField(serializers.ReadOnlyField):
    """OpenAI's timestamps are whole seconds since the epoch."""

    def to_representation(self, value):
        return int(value.timestamp()) if value is not None else None


class UnixTimeField(serializers.Field):
    """A time a request gives as whole seconds since the epoch, as OpenAI's parameters do."""

    def to_internal_value(self, value):
        try:
            return datetime.fromtimestamp(int(value), tz=UTC)
        except (TypeError, ValueError, OverflowError, OSError):
            raise serializers.ValidationError(
                f"A time in seconds since 1970, not {value!r}."
            ) from None

    def to_representation(self, value):
        return int(value.timestamp())


class UnixSeconds(Func):
    """A timestamp column as OpenAI shows it, whole seconds since the epoch, computed by
    PostgreSQL (as UnixTimestampField does in Python, for rows read as values)."""

    template = "floor(extract(epoch FROM %(expressions)s))::bigint"
    output_field = BigIntegerField()


class AfterLimitPagination(BasePagination):
    """OpenAI's cursor pagination: newest first, ``?after=<id>&limit=<n>``, ``has_more``.

    The cursor is an object id; the page holds the objects after it in the list's order.
    Ordering is (created_at, id) so that objects created in the same microsecond stay in order.
    A subclass with ``orderable`` also takes ``?order=asc|desc`` (from ``default_order``).
    """

    default_limit = 20
    max_limit = 100
    default_order = "desc"
    orderable = False

    def paginate_queryset(self, queryset, request, view=None):
        limit = self._limit(request)
        order = request.query_params.get("order", self.default_order) if self.orderable else None
        if order not in (None, "asc", "desc"):
            raise LoftAPIError(f"order must be 'asc' or 'desc', not {order!r}.", param="order")
        ascending = (order or self.default_order) == "asc"
        queryset = queryset.order_by(
            *(("created_at", "pk") if ascending else ("-created_at", "-pk"))
        )
        after = request.query_params.get("after")
        if after:
            anchor = (
                queryset.filter(pk=after).values("created_at", "pk").first()
                if (is_id_like(after))
                else None
            )
            if anchor is None:
                raise LoftAPIError(f"No such object to page after: {after}", param="after")
            beyond = "gt" if ascending else "lt"
            queryset = queryset.filter(
                Q(**{f"created_at__{beyond}": anchor["created_at"]})
                | Q(created_at=anchor["created_at"], **{f"pk__{beyond}": anchor["pk"]})
            )
        rows = list(queryset[: limit + 1])
        self.has_more = len(rows) > limit
        return rows[:limit]

    def get_paginated_response(self, data):
        return Response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": self.has_more,
            }
        )

    def _limit(self, request) -> int:
        raw = request.query_params.get("limit", self.default_limit)
        try:
            limit = int(raw)
        except (TypeError, ValueError):
            raise LoftAPIError(f"limit must be an integer, got {raw!r}.", param="limit") from None
        if not 1 <= limit <= self.max_limit:
            raise LoftAPIError(f"limit must be between 1 and {self.max_limit}.", param="limit")
        return limit

    def get_paginated_response_schema(self, schema):
        return {
            "type": "object",
            "required": ["object", "data", "has_more"],
            "properties": {
                "object": {"type": "string", "enum": ["list"]},
                "data": schema,
                "first_id": {"type": "string", "nullable": True},
                "last_id": {"type": "string", "nullable": True},
                "has_more": {"type": "boolean"},
            },
        }

    def get_schema_operation_parameters(self, view):
        parameters = [
            {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
            {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer"}},
        ]
        if self.orderable:
            order = {"type": "string", "enum": ["asc", "desc"], "default": self.default_order}
            parameters.append({"name": "order", "in": "query", "required": False, "schema": order})
        return parameters


class TenantScopedViewSet(viewsets.GenericViewSet):
    """Base for every view of tenant-owned objects: the queryset is always the caller's org's.

    Subclasses set ``queryset`` to the model's manager or queryset and ``object_name`` to the
    word OpenAI uses in "No such File object: …". Another tenant's id is not found: 404.
    """

    object_name = "object"
    pagination_class = AfterLimitPagination

    @cached_property
    def org(self):
        return current_org(self.request)

    def get_queryset(self):
        return super().get_queryset().for_org(self.org)

    def get_object(self, queryset=None):
        """The caller's object the URL names, from ``queryset`` (default: ``get_queryset()``;
        e.g. its ``values()`` for a view that reads columns, not model instances)."""
        lookup = self.kwargs[self.lookup_url_kwarg or self.lookup_field]
        queryset = self.get_queryset() if queryset is None else queryset
        obj = queryset.filter(**{self.lookup_field: lookup}).first() if is_id_like(lookup) else None
        if obj is None:
            raise LoftAPIError(
                f"No such {self.object_name}: {lookup}",
                status_code=404,
                param="id",
            )
        self.check_object_permissions(self.request, obj)
        return obj

    def perform_create(self, serializer):
        serializer.save(org=self.org)
