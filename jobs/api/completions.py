"""Stored chat completions (``store: true`` on ``POST /v1/chat/completions``), in OpenAI's shape,
and Loft's feedback on them.

    GET    /v1/chat/completions                  list: model, metadata[key]=value, after, limit,
                                                 order (asc by default, as OpenAI's); Loft's
                                                 alias, rated (up, down), corrected (true, false)
    DELETE /v1/chat/completions?<filters>        delete every match (at least one filter, or
                                                 all=true)
    GET    /v1/chat/completions/{id}             one, with its metadata and feedback
    POST   /v1/chat/completions/{id}             {"metadata": {...}}: replace its metadata
    DELETE /v1/chat/completions/{id}             chat.completion.deleted
    GET    /v1/chat/completions/{id}/messages    the request's messages: after, limit, order
    POST   /v1/chat/completions/{id}/feedback    {"rating": 1 | -1 | 0, "correction": "..."}

The official client's ``chat.completions.list / retrieve / update / delete`` and
``chat.completions.messages.list`` call these unchanged. Another tenant's completion is not
found, in lists too (jobs/models/completions.py keeps them).
"""

from __future__ import annotations

from datetime import UTC, datetime

from django.db.models import Q
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from jobs.api.serializers import StrictSerializer
from jobs.models import StoredCompletion
from jobs.models.completions import (
    CORRECTION_LENGTH,
    METADATA_KEY_LENGTH,
    METADATA_PAIRS,
    METADATA_VALUE_LENGTH,
)
from loft.api.base import AfterLimitPagination, is_id_like
from loft.api.errors import LoftAPIError
from loft.tenancy import current_org

# The filters a list and a delete by filter take, beside metadata[key]=value.
FILTERS = ("model", "alias", "rated", "corrected", "created_after", "created_before")


class MetadataField(serializers.Field):
    """OpenAI's ``metadata``: up to 16 string pairs, keys of 64 characters, values of 512."""

    def to_internal_value(self, value):
        if not isinstance(value, dict):
            raise serializers.ValidationError("metadata is an object of strings.")
        if len(value) > METADATA_PAIRS:
            raise serializers.ValidationError(f"metadata holds at most {METADATA_PAIRS} pairs.")
        for key, item in value.items():
            if not isinstance(item, str):
                raise serializers.ValidationError(f"metadata[{key!r}] must be a string.")
            if not key or len(key) > METADATA_KEY_LENGTH:
                raise serializers.ValidationError(
                    f"metadata keys are 1 to {METADATA_KEY_LENGTH} characters."
                )
            if len(item) > METADATA_VALUE_LENGTH:
                raise serializers.ValidationError(
                    f"metadata[{key!r}] is longer than {METADATA_VALUE_LENGTH} characters."
                )
        return value

    def to_representation(self, value):
        return value


class MetadataUpdateSerializer(StrictSerializer):
    metadata = MetadataField(allow_null=True)


class FeedbackSerializer(StrictSerializer):
    rating = serializers.ChoiceField(choices=[1, -1, 0], required=False, allow_null=True)
    correction = serializers.CharField(
        required=False, allow_null=True, allow_blank=True, max_length=CORRECTION_LENGTH
    )

    def validate(self, attrs):
        if attrs.get("rating") is None and attrs.get("correction") is None:
            raise serializers.ValidationError(
                "Give a rating (1, -1, or 0 to clear it), a correction, or both."
            )
        return attrs


class CompletionPagination(AfterLimitPagination):
    """OpenAI pages stored completions and their messages oldest first unless told ``desc``."""

    default_order = "asc"
    orderable = True


def filtered(params) -> Q:
    """The stored completions ``params`` (a query string) select, as a condition."""
    condition = Q()
    if params.get("model"):
        condition &= Q(model=params["model"]) | Q(alias=params["model"])
    if params.get("alias"):
        condition &= Q(alias=params["alias"])
    rated = params.get("rated")
    if rated:
        ratings = {"up": 1, "down": -1}
        if rated not in ratings:
            raise LoftAPIError("rated is 'up' or 'down'.", param="rated")
        condition &= Q(rating=ratings[rated])
    corrected = params.get("corrected")
    if corrected:
        if corrected not in ("true", "false"):
            raise LoftAPIError("corrected is 'true' or 'false'.", param="corrected")
        condition &= ~Q(correction="") if corrected == "true" else Q(correction="")
    for name, lookup in (("created_after", "gte"), ("created_before", "lt")):
        if params.get(name):
            condition &= Q(**{f"created_at__{lookup}": _timestamp(params[name], name)})
    for key, value in params.items():
        if key.startswith("metadata[") and key.endswith("]"):
            condition &= Q(metadata__contains={key[len("metadata[") : -1]: value})
    return condition


def _timestamp(raw: str, name: str) -> datetime:
    try:
        return datetime.fromtimestamp(int(raw), tz=UTC)
    except (ValueError, OverflowError, OSError):
        raise LoftAPIError(
            f"{name} is a time in seconds since 1970, not {raw!r}.", param=name
        ) from None


class StoredCompletionListMixin:
    """``GET`` and ``DELETE`` on /v1/chat/completions (whose ``POST`` is jobs/api/chat.py's)."""

    @extend_schema(operation_id="chat_completions_list", responses={200: serializers.DictField()})
    def get(self, request):
        org = current_org(request)
        rows = StoredCompletion.objects.for_org(org).filter(filtered(request.query_params))
        pages = CompletionPagination()
        page = pages.paginate_queryset(rows, request)
        return pages.get_paginated_response([row.as_chat_completion() for row in page])

    @extend_schema(
        operation_id="chat_completions_delete_matching", responses={200: serializers.DictField()}
    )
    def delete(self, request):
        params = request.query_params
        given = [name for name in params if name in FILTERS or name.startswith("metadata[")]
        if not given and params.get("all") != "true":
            raise LoftAPIError(
                "Name what to delete (model, alias, metadata[key], rated, corrected, "
                "created_after, created_before), or all=true for every stored completion.",
                param="all",
            )
        org = current_org(request)
        rows = StoredCompletion.objects.for_org(org).filter(filtered(params))
        deleted, _ = rows.delete()
        return Response({"object": "chat.completion.deleted_list", "deleted": deleted})


def _stored(request, completion_id: str) -> StoredCompletion:
    row = (
        StoredCompletion.objects.for_org(current_org(request)).filter(pk=completion_id).first()
        if is_id_like(completion_id)
        else None
    )
    if row is None:
        raise LoftAPIError(
            f"No chat completion found with id '{completion_id}'.",
            status_code=status.HTTP_404_NOT_FOUND,
            param="completion_id",
            code="not_found",
        )
    return row


class StoredCompletionView(APIView):
    @extend_schema(
        operation_id="chat_completions_retrieve", responses={200: serializers.DictField()}
    )
    def get(self, request, completion_id: str):
        return Response(_stored(request, completion_id).as_chat_completion())

    @extend_schema(
        operation_id="chat_completions_update",
        request=MetadataUpdateSerializer,
        responses={200: serializers.DictField()},
    )
    def post(self, request, completion_id: str):
        row = _stored(request, completion_id)
        body = MetadataUpdateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        row.metadata = body.validated_data["metadata"] or {}
        row.size_bytes = row.measure()
        row.save(update_fields=["metadata", "size_bytes"])
        return Response(row.as_chat_completion())

    @extend_schema(
        operation_id="chat_completions_destroy", responses={200: serializers.DictField()}
    )
    def delete(self, request, completion_id: str):
        row = _stored(request, completion_id)
        deleted = row.id  # delete() clears it
        row.delete()
        return Response({"object": "chat.completion.deleted", "id": deleted, "deleted": True})


class StoredCompletionMessagesView(APIView):
    @extend_schema(
        operation_id="chat_completions_messages_list", responses={200: serializers.DictField()}
    )
    def get(self, request, completion_id: str):
        messages = _stored(request, completion_id).message_objects()
        pages = CompletionPagination()
        limit = pages._limit(request)
        order = request.query_params.get("order", "asc")
        if order not in ("asc", "desc"):
            raise LoftAPIError(f"order must be 'asc' or 'desc', not {order!r}.", param="order")
        if order == "desc":
            messages.reverse()
        after = request.query_params.get("after")
        if after:
            ids = [m["id"] for m in messages]
            if after not in ids:
                raise LoftAPIError(f"No such message to page after: {after}", param="after")
            messages = messages[ids.index(after) + 1 :]
        pages.has_more = len(messages) > limit
        return pages.get_paginated_response(messages[:limit])


class StoredCompletionFeedbackView(APIView):
    @extend_schema(
        operation_id="chat_completions_feedback",
        request=FeedbackSerializer,
        responses={200: serializers.DictField()},
    )
    def post(self, request, completion_id: str):
        row = _stored(request, completion_id)
        body = FeedbackSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        row.give_feedback(body.validated_data.get("rating"), body.validated_data.get("correction"))
        return Response(row.as_chat_completion())
