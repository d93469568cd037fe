"""``/v1/aliases``: a tenant's named deployments (Loft's own; OpenAI has none).

An alias points at one adapter, and a request naming it as its model is answered by that
adapter. It moves only on evidence (``promote``: jobs/promotion.py's gate on the pinned eval
files), or by an owner's ``force``; every move is listed (``moves``) and the last promotion can
be undone (``rollback``). The behaviour is ``Alias``'s (jobs/models/aliases.py); this module
checks requests, scopes them to the tenant and shapes the answers.
"""

from __future__ import annotations

from django.db.models import Prefetch
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.decorators import action
from rest_framework.response import Response

from engine.hyperparameters import ConfigError, TrainConfig, from_request
from jobs import continual
from jobs.api.fine_tuning import NumberedCursorPagination, quota_error
from jobs.api.serializers import StrictSerializer
from jobs.models import Adapter, File, QuotaExceeded
from jobs.models.aliases import MOVE_ID_PREFIX, Alias, AliasError, Promotion
from jobs.models.policies import ContinualPolicy, PolicyRun
from loft.api.base import TenantScopedViewSet, is_id_like
from loft.api.errors import LoftAPIError, error_body
from loft.auth import ApiKeyPrincipal
from loft.models import ApiKey

ONLY_OWNERS_FORCE = (
    "Only owners of the organization, and API keys created with the manage_keys scope, can "
    "force a promotion past the gate."
)


def may_force(request, org) -> bool:
    """Forcing a promotion is the owners': a signed-in owner, or a key with the manage_keys
    scope (the keys only owners can make, as loft/auth.py's may_manage_keys)."""
    key = getattr(request, "auth", None)
    if isinstance(key, ApiKey):
        return key.can_manage_keys
    return org.is_owner(request.user)


def actor_of(request) -> tuple[str, object | None]:
    """Who acts, as a move records it: the person, or the key (its visible prefix)."""
    user = request.user
    if isinstance(user, ApiKeyPrincipal):
        name = f" ({user.key.name})" if user.key.name else ""
        return f"{user.username}{name}", None
    return user.get_username(), user


def alias_object(alias: Alias) -> dict:
    return {
        "object": "alias",
        "id": alias.id,
        "name": alias.name,
        "adapter": alias.adapter_id,
        "model": alias.adapter.name,
        "base_model": alias.adapter.base_model.name,
        "eval_files": sorted(file.id for file in alias.eval_files.all()),
        "created_at": int(alias.created_at.timestamp()),
        "updated_at": int(alias.updated_at.timestamp()),
    }


def policy_object(policy: ContinualPolicy) -> dict:
    return {
        "object": "alias.policy",
        "alias": policy.alias.name,
        "enabled": policy.enabled,
        "every_completions": policy.every_completions,
        "every_seconds": policy.every_seconds,
        "hyperparameters": policy.hyperparameters,
        "counting_since": int(policy.counting_since.timestamp()),
        "new_feedback": continual.new_feedback(policy).count(),
        "created_at": int(policy.created_at.timestamp()),
        "updated_at": int(policy.updated_at.timestamp()),
    }


def run_object(run: PolicyRun) -> dict:
    return {
        "object": "alias.policy_run",
        "id": run.id,
        "alias": run.alias.name,
        "status": run.status,
        "trigger": run.trigger,
        "parent_adapter": run.parent_adapter,
        "training_file": run.training_file_id,
        "job": run.job_id,
        "child_adapter": run.child_adapter or None,
        "move": f"{MOVE_ID_PREFIX}{run.move_id}" if run.move_id else None,
        "reason": run.reason,
        "created_at": int(run.created_at.timestamp()),
        "finished_at": int(run.finished_at.timestamp()) if run.finished_at else None,
    }


def alias_error(error: AliasError) -> LoftAPIError:
    return LoftAPIError(
        str(error),
        status_code=status.HTTP_409_CONFLICT if error.conflict else status.HTTP_400_BAD_REQUEST,
        param=error.param,
        code=error.code,
    )


def find_adapter(org, reference: str, param: str = "adapter") -> Adapter:
    """One of the organization's adapters by id or ft: name; another tenant's reads like a
    missing one (404)."""
    owned = Adapter.objects.for_org(org).select_related("base_model")
    adapter = None
    if is_id_like(reference, max_length=300):
        adapter = owned.filter(pk=reference).first() or owned.filter(name=reference).first()
    if adapter is None:
        raise LoftAPIError(
            f"The adapter '{reference}' does not exist.",
            status_code=status.HTTP_404_NOT_FOUND,
            param=param,
            code="model_not_found",
        )
    return adapter


def find_eval_files(org, ids: list[str]) -> list[File]:
    """The organization's processed files named, of purpose eval or fine-tune."""
    files = []
    for file_id in dict.fromkeys(ids):
        file = File.objects.for_org(org).filter(pk=file_id).first() if is_id_like(file_id) else None
        if file is None:
            raise LoftAPIError(
                f"No such File object: {file_id}",
                status_code=status.HTTP_404_NOT_FOUND,
                param="eval_files",
                code="invalid_file",
            )
        if file.unusable_reason:
            raise LoftAPIError(file.unusable_reason, param="eval_files", code="invalid_file")
        files.append(file)
    return files


class AliasCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=200, help_text="The name requests use as model.")
    adapter = serializers.CharField(max_length=300, help_text="An adapter id or ft: model name.")
    eval_files = serializers.ListField(
        child=serializers.CharField(max_length=100),
        min_length=1,
        max_length=10,
        help_text="Files (purpose eval or fine-tune) every candidate is measured on.",
    )


class PinSerializer(StrictSerializer):
    eval_files = serializers.ListField(
        child=serializers.CharField(max_length=100),
        min_length=1,
        max_length=10,
        help_text="The files every later candidate is measured on, replacing the pinned ones.",
    )


class PromoteSerializer(StrictSerializer):
    adapter = serializers.CharField(max_length=300, help_text="An adapter id or ft: model name.")
    force = serializers.BooleanField(
        required=False, default=False, help_text="Owners: move it whatever the gate says."
    )


class PolicySerializer(StrictSerializer):
    enabled = serializers.BooleanField(required=False, default=True)
    every_completions = serializers.IntegerField(
        min_value=1,
        max_value=10_000_000,
        required=False,
        allow_null=True,
        help_text="Train a child after this many new rated-up or corrected stored completions.",
    )
    every_seconds = serializers.IntegerField(
        min_value=60,
        max_value=366 * 24 * 3600,
        required=False,
        allow_null=True,
        help_text="Or this long after the last run, when there is at least one new one.",
    )
    hyperparameters = serializers.DictField(
        required=False,
        default=dict,
        help_text="The child job's, as POST /v1/fine_tuning/jobs takes them (auto when left out).",
    )

    def validate_hyperparameters(self, requested: dict) -> dict:
        try:
            TrainConfig(**from_request(requested))
        except ConfigError as error:
            raise serializers.ValidationError(str(error)) from None
        return requested

    def validate(self, values: dict) -> dict:
        if not values.get("every_completions") and not values.get("every_seconds"):
            raise serializers.ValidationError(
                {"every_completions": ["Say when: every_completions, every_seconds, or both."]}
            )
        return values


class MovePagination(NumberedCursorPagination):
    prefix = MOVE_ID_PREFIX


AliasObject = inline_serializer(
    "Alias",
    {
        "object": serializers.CharField(),
        "id": serializers.CharField(),
        "name": serializers.CharField(),
        "adapter": serializers.CharField(),
        "model": serializers.CharField(),
        "base_model": serializers.CharField(),
        "eval_files": serializers.ListField(child=serializers.CharField()),
        "created_at": serializers.IntegerField(),
        "updated_at": serializers.IntegerField(),
    },
)


class AliasViewSet(TenantScopedViewSet):
    """Named deployments: create, list, retrieve, delete; promote, roll back, and the moves."""

    queryset = Alias.objects.select_related("adapter__base_model").prefetch_related(
        Prefetch("eval_files", queryset=File.objects.only("id"))
    )
    object_name = "alias"
    lookup_field = "name"
    lookup_value_regex = "[^/]+"  # names may hold dots
    pagination_class = None

    def get_serializer_class(self):
        """The request body of the action (OPTIONS describes it; the actions build their own)."""
        return {
            "promote": PromoteSerializer,
            "policy": PolicySerializer,
            "eval_files": PinSerializer,
        }.get(self.action, AliasCreateSerializer)

    @extend_schema(responses={200: AliasObject})
    def list(self, request):
        aliases = self.get_queryset().order_by("name")
        return Response({"object": "list", "data": [alias_object(a) for a in aliases]})

    @extend_schema(responses={200: AliasObject})
    def retrieve(self, request, name=None):
        return Response(alias_object(self.get_object()))

    @extend_schema(request=AliasCreateSerializer, responses={201: AliasObject})
    def create(self, request):
        body = AliasCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        values = body.validated_data
        try:
            Alias.check_name(self.org, values["name"])
        except AliasError as error:
            raise alias_error(error) from None
        adapter = find_adapter(self.org, values["adapter"])
        files = find_eval_files(self.org, values["eval_files"])
        actor, user = actor_of(request)
        try:
            alias = Alias.create_for(
                self.org, values["name"], adapter, files, actor=actor, user=user
            )
        except AliasError as error:
            raise alias_error(error) from None
        return Response(alias_object(alias), status=status.HTTP_201_CREATED)

    def destroy(self, request, name=None):
        alias = self.get_object()
        alias_id = alias.id
        alias.delete()
        return Response({"id": alias_id, "object": "alias", "name": name, "deleted": True})

    @extend_schema(request=None, responses={200: dict})
    @action(detail=True, methods=["get"], pagination_class=MovePagination)
    def moves(self, request, name=None):
        alias = self.get_object()
        page = self.paginate_queryset(alias.moves.all())
        return self.get_paginated_response([move.as_object() for move in page])

    @extend_schema(
        request=PromoteSerializer,
        responses={200: AliasObject, 202: dict, 409: dict},
        description="Move the alias to a candidate adapter if it beats the current one on "
        "every pinned eval file (202 while the evaluations run: call again; 409 "
        "promotion_refused with the evidence).",
    )
    @action(detail=True, methods=["post"])
    def promote(self, request, name=None):
        alias = self.get_object()
        body = PromoteSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        candidate = find_adapter(self.org, body.validated_data["adapter"])
        force = body.validated_data["force"]
        if force and not may_force(request, self.org):
            raise LoftAPIError(
                ONLY_OWNERS_FORCE, status_code=status.HTTP_403_FORBIDDEN, param="force"
            )
        actor, user = actor_of(request)
        try:
            outcome = alias.promote(candidate, force=force, actor=actor, user=user)
        except AliasError as error:
            raise alias_error(error) from None
        except QuotaExceeded as error:
            raise quota_error(error) from None
        return promotion_response(alias, outcome)

    @extend_schema(request=None, responses={200: AliasObject, 409: dict})
    @action(detail=True, methods=["post"])
    def rollback(self, request, name=None):
        alias = self.get_object()
        StrictSerializer(data=request.data or {}).is_valid(raise_exception=True)  # no options
        actor, user = actor_of(request)
        try:
            move = alias.roll_back(actor=actor, user=user)
        except AliasError as error:
            raise alias_error(error) from None
        return Response({**alias_object(self._fresh(alias)), "move": move.as_object()})

    @extend_schema(
        request=PinSerializer,
        responses={200: AliasObject},
        description="Replace the pinned eval files, e.g. to add the file of a new task the alias "
        "serves (recorded as a move of kind pinned).",
    )
    @action(detail=True, methods=["post"])
    def eval_files(self, request, name=None):
        alias = self.get_object()
        body = PinSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        files = find_eval_files(self.org, body.validated_data["eval_files"])
        actor, user = actor_of(request)
        move = alias.pin(files, actor=actor, user=user)
        return Response({**alias_object(self._fresh(alias)), "move": move.as_object()})

    @extend_schema(
        request=PolicySerializer,
        responses={200: dict},
        description="The alias's continual policy: GET it, POST to set (or replace) it, DELETE "
        "to stop it. When due, a run builds a training file from the alias's rated-up and "
        "corrected stored completions, trains a child of the alias's adapter (with replay of "
        "its ancestors' rows) and promotes it through the alias's gate.",
    )
    @action(detail=True, methods=["get", "post", "delete"])
    def policy(self, request, name=None):
        alias = self.get_object()
        policy = ContinualPolicy.objects.filter(alias=alias).first()
        if request.method == "POST":
            body = PolicySerializer(data=request.data)
            body.is_valid(raise_exception=True)
            values = body.validated_data
            policy = ContinualPolicy.set_for(
                alias,
                every_completions=values.get("every_completions"),
                every_seconds=values.get("every_seconds"),
                enabled=values["enabled"],
                hyperparameters=values["hyperparameters"],
            )
            return Response(policy_object(policy))
        if policy is None:
            raise LoftAPIError(
                f"The alias {alias.name} has no continual policy; POST one to set it.",
                status_code=status.HTTP_404_NOT_FOUND,
                code="policy_not_found",
            )
        if request.method == "DELETE":
            policy.delete()
            return Response({"object": "alias.policy", "alias": alias.name, "deleted": True})
        return Response(policy_object(policy))

    @extend_schema(request=None, responses={200: dict})
    @action(detail=True, methods=["get"], url_path="policy/runs", url_name="policy-runs")
    def policy_runs(self, request, name=None):
        """The policy's runs, newest first: what started each, where it stands, and why it
        ended as it did."""
        alias = self.get_object()
        runs = alias.policy_runs.select_related("alias")[:100]
        return Response({"object": "list", "data": [run_object(run) for run in runs]})

    def _fresh(self, alias: Alias) -> Alias:
        return self.get_queryset().get(pk=alias.pk)


def promotion_response(alias: Alias, outcome: Promotion) -> Response:
    if outcome.status == "evaluating":
        return Response(
            {
                "object": "alias.promotion",
                "status": "evaluating",
                "alias": alias.name,
                "evaluations": [evaluation.id for evaluation in outcome.evaluations],
                "message": "The candidate and the current adapter are being evaluated on the "
                "pinned eval files; call promote again when they finish.",
            },
            status=status.HTTP_202_ACCEPTED,
        )
    if outcome.moved:
        fresh = Alias.objects.select_related("adapter__base_model").get(pk=alias.pk)
        return Response({**alias_object(fresh), "move": outcome.move.as_object()})
    reasons = " ".join(outcome.report["reasons"])
    if outcome.status == "failed":
        message = f"The promotion cannot be decided: {reasons} Promote again to evaluate anew."
        code = "evaluation_failed"
    else:
        message = f"The promotion was refused. {reasons}"
        code = "promotion_refused"
    body = error_body(message, "invalid_request_error", "adapter", code)
    return Response({**body, "evidence": outcome.report}, status=status.HTTP_409_CONFLICT)
