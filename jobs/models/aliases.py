"""Aliases: a tenant's named deployments, each pointing at one adapter, and the record of every
move (jobs/promotion.py decides whether a move is allowed; jobs/api/aliases.py and the
Deployments page, jobs/views/deployments.py, call the methods here).

A request for ``model="<alias name>"`` is answered by the adapter the alias points at when the
request arrives, so a promotion takes effect on the very next request, with no restart.

Promoting is a conversation, so that no web thread waits for a model: the first ``promote``
queues what is missing — for each pinned eval file, a custom evaluation holding both the
current adapter and the candidate, row by row (worker/evaluations.py) — and says so; a later
``promote`` finds them finished and runs the gate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from django.conf import settings
from django.db import IntegrityError, models, transaction

from jobs import promotion
from jobs.models.adapters import Adapter, Evaluation
from jobs.models.catalogue import BaseModel
from jobs.models.files import File
from loft import webhooks
from loft.ids import make_id
from loft.models import Organization
from loft.tenancy import TenantOwnedModel

# An alias move's id in the API: its row number behind a prefix.
MOVE_ID_PREFIX = "aliasmove-"
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")
# Names an alias cannot take: they already mean a model (adapter ids; ft: names and base
# models' names are checked apart).
RESERVED_PREFIXES = ("adapter-",)


def new_alias_id() -> str:
    return make_id("alias")


class Alias(TenantOwnedModel):
    """A named pointer to one of the organization's adapters, with the eval files (one per task
    the alias serves) on which every candidate is measured against the current adapter."""

    id = models.CharField(primary_key=True, max_length=40, default=new_alias_id, editable=False)
    name = models.CharField(max_length=64, help_text="The name requests use as their model.")
    adapter = models.ForeignKey("Adapter", on_delete=models.PROTECT, related_name="aliases")
    eval_files = models.ManyToManyField("File", related_name="pinned_by_aliases", blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["org", "name"], name="one_alias_name_per_org")
        ]

    def __str__(self) -> str:
        return self.name

    # --- creating ---------------------------------------------------------------------------

    @staticmethod
    def check_name(org, name: str) -> None:
        """Raises AliasError when ``name`` cannot be this organization's new alias."""
        if not NAME_PATTERN.match(name):
            raise AliasError(
                "An alias name is 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                f"letter or digit; {name[:80]!r} is not.",
                "invalid_alias_name",
                param="name",
            )
        if name.startswith(RESERVED_PREFIXES) or BaseModel.objects.filter(name=name).exists():
            raise AliasError(
                f"The name {name!r} already means a model; choose another alias name.",
                "invalid_alias_name",
                param="name",
            )
        if Alias.objects.for_org(org).filter(name=name).exists():
            raise AliasError(
                f"The alias {name!r} already exists; promote it, or delete it first.",
                "alias_exists",
                param="name",
                conflict=True,
            )

    @classmethod
    def create_for(
        cls, org, name: str, adapter: Adapter, eval_files: list[File], *, actor: str, user=None
    ) -> Alias:
        """A new alias on ``adapter`` with its pinned eval files, and its ``created`` move."""
        cls.check_name(org, name)
        try:
            with transaction.atomic():
                alias = cls.objects.create(org=org, name=name, adapter=adapter)
                alias.eval_files.set(eval_files)
                alias._record(AliasMove.Kind.CREATED, "", adapter.id, actor, user)
        except IntegrityError:  # created by a parallel request in between
            raise AliasError(
                f"The alias {name!r} already exists; promote it, or delete it first.",
                "alias_exists",
                param="name",
                conflict=True,
            ) from None
        return alias

    # --- moving -----------------------------------------------------------------------------

    def promote(
        self, candidate: Adapter, *, force: bool = False, actor: str, user=None
    ) -> Promotion:
        """Move the alias to ``candidate`` if the gate (jobs/promotion.py) passes on the pinned
        eval files; a forced promotion (for owners: the caller checks) moves it regardless.

        Returns what happened: ``evaluating`` (evaluations queued or still running: promote
        again when they finish), ``promoted``, ``forced``, ``refused`` (recorded, with the
        gate's report), or ``failed`` (an evaluation failed on the worker; promoting again
        runs it anew). Raises AliasError for a candidate that cannot be compared at all, and
        QuotaExceeded when the evaluations it needs do not fit the quota."""
        with transaction.atomic():
            Organization.lock(self.org_id)
            alias = Alias.objects.select_for_update().select_related("adapter").get(pk=self.pk)
            current = alias.adapter
            alias._check_candidate(current, candidate)
            files = list(alias.eval_files.order_by("id"))
            if not files and not force:
                raise AliasError(
                    f"The alias {alias.name} has no pinned eval file left to measure a "
                    "candidate on; create the alias again with one.",
                    "no_eval_files",
                    conflict=True,
                )
            found = [
                alias._evaluation_on(file, current, candidate, with_probes=index == 0)
                for index, file in enumerate(files)
            ]
            ready = [evaluation for state, evaluation in found if state == "ready"]
            report = (
                alias._report(files, ready, current, candidate)
                if len(ready) == len(files)
                else None
            )
            if force and not (report and report["passed"]):
                move = alias._move(AliasMove.Kind.FORCED, candidate, actor, user, report or {})
                alias._announce(move)
                return Promotion("forced", move=move, report=report)
            failed = [evaluation for state, evaluation in found if state == "failed"]
            if failed:
                reasons = [
                    f"The evaluation {e.id} on {e.file_id} failed: "
                    f"{(e.error or {}).get('message', 'no reason given')}"
                    for e in failed
                ]
                evidence = {
                    "passed": False,
                    "reasons": reasons,
                    "failed_evaluations": [e.id for e in failed],
                }
                alias._record(
                    AliasMove.Kind.REFUSED, current.id, candidate.id, actor, user, evidence
                )
                return Promotion("failed", report=evidence, evaluations=failed)
            if report is None:
                waiting = [evaluation for state, evaluation in found if state == "pending"]
                for index, (file, (state, _)) in enumerate(zip(files, found, strict=True)):
                    if state == "missing":
                        waiting.append(alias._evaluate(file, current, candidate, index == 0))
                return Promotion("evaluating", evaluations=waiting)
            if report["passed"]:
                move = alias._move(AliasMove.Kind.PROMOTED, candidate, actor, user, report)
                alias._announce(move)
                return Promotion("promoted", move=move, report=report, evaluations=ready)
            move = alias._record(
                AliasMove.Kind.REFUSED, current.id, candidate.id, actor, user, report
            )
            alias._announce(move)
            return Promotion("refused", move=move, report=report, evaluations=ready)

    def roll_back(self, *, actor: str, user=None) -> AliasMove:
        """Back to the adapter the alias pointed at before its last promotion (forced or not)
        that no earlier rollback undid. Raises AliasError when there is none, or when that
        adapter was deleted since."""
        with transaction.atomic():
            Organization.lock(self.org_id)
            alias = Alias.objects.select_for_update().get(pk=self.pk)
            undone, target = 0, None
            for move in alias.moves.order_by("-created_at", "-id"):
                if move.kind == AliasMove.Kind.ROLLED_BACK:
                    undone += 1
                elif move.kind in (AliasMove.Kind.PROMOTED, AliasMove.Kind.FORCED):
                    if not undone:
                        target = move
                        break
                    undone -= 1
            if target is None:
                raise AliasError(
                    f"The alias {alias.name} has no promotion to roll back: it points at the "
                    "adapter it was created with.",
                    "nothing_to_roll_back",
                    conflict=True,
                )
            previous = Adapter.objects.for_org(alias.org_id).filter(pk=target.from_adapter).first()
            if previous is None:
                raise AliasError(
                    f"The adapter {target.from_adapter} that {alias.name} pointed at before was "
                    "deleted; there is nothing to roll back to.",
                    "nothing_to_roll_back",
                    conflict=True,
                )
            return alias._move(
                AliasMove.Kind.ROLLED_BACK, previous, actor, user, {"undoes": target.id}
            )

    def pin(self, eval_files: list[File], *, actor: str, user=None) -> AliasMove:
        """Replace the pinned eval files (a task the alias now serves gets its own), recorded
        as a move: the gate measures every later candidate on these."""
        with transaction.atomic():
            alias = Alias.objects.select_for_update().get(pk=self.pk)
            before = sorted(alias.eval_files.values_list("id", flat=True))
            alias.eval_files.set(eval_files)
            evidence = {"eval_files": sorted(f.id for f in eval_files), "before": before}
            return alias._record(
                AliasMove.Kind.PINNED, alias.adapter_id, alias.adapter_id, actor, user, evidence
            )

    # --- helpers ----------------------------------------------------------------------------

    def _check_candidate(self, current: Adapter, candidate: Adapter) -> None:
        if candidate.pk == current.pk:
            raise AliasError(
                f"The alias {self.name} already points at {candidate.name}.",
                "already_current",
                param="adapter",
            )
        if candidate.base_model_id != current.base_model_id:
            raise AliasError(
                f"The alias {self.name} serves adapters of {current.base_model.name}; "
                f"{candidate.name} was trained on {candidate.base_model.name}.",
                "base_model_mismatch",
                param="adapter",
            )

    def _move(self, kind: str, to: Adapter, actor: str, user, evidence: dict) -> AliasMove:
        move = self._record(kind, self.adapter_id, to.id, actor, user, evidence)
        self.adapter = to
        self.save(update_fields=["adapter", "updated_at"])
        return move

    def _record(
        self, kind: str, from_id: str, to_id: str, actor: str, user, evidence: dict | None = None
    ) -> AliasMove:
        return AliasMove.objects.create(
            org_id=self.org_id,
            alias=self,
            kind=kind,
            from_adapter=from_id,
            to_adapter=to_id,
            actor=actor[:200],
            user=user if getattr(user, "pk", None) else None,
            evidence=evidence or {},
        )

    def _announce(self, move: AliasMove) -> None:
        """The organization's webhooks hear of a promotion (forced or not) or a refusal once
        the move commits: ``alias.promoted`` / ``alias.promotion_refused``, with the move."""
        refused = move.kind == AliasMove.Kind.REFUSED
        event = "alias.promotion_refused" if refused else "alias.promoted"
        webhooks.announce(self.org_id, event, {**move.as_object(), "alias_name": self.name})

    def _evaluation_on(
        self, file: File, current: Adapter, candidate: Adapter, *, with_probes: bool
    ) -> tuple[str, Evaluation | None]:
        """The evaluation of both adapters on ``file`` that the gate can use, as (state,
        evaluation): ``ready`` (the newest succeeded one with per-row results, and with the
        probes where asked for), ``pending`` (one is queued or running: wait for it),
        ``failed`` (the newest failed and that failure not yet told), or ``missing``."""
        with_probes = with_probes and settings.LOFT_EVAL_FORGETTING_PROBES > 0
        both = (
            Evaluation.objects.for_org(self.org_id)
            .filter(kind=Evaluation.Kind.CUSTOM, file=file)
            .filter(candidates__contains=[{"adapter": current.id}])
            .filter(candidates__contains=[{"adapter": candidate.id}])
            .order_by("-created_at")
        )
        for evaluation in both.filter(status=Evaluation.Status.SUCCEEDED):
            if _usable(evaluation, current.id, candidate.id, with_probes):
                return "ready", evaluation
        wanted = both.filter(options__probes=True) if with_probes else both
        running = (Evaluation.Status.QUEUED, Evaluation.Status.RUNNING)
        pending = wanted.filter(status__in=running).first()
        if pending is not None:
            return "pending", pending
        failed = wanted.filter(status=Evaluation.Status.FAILED).first()
        told = failed and self.moves.filter(evidence__failed_evaluations__contains=[failed.id])
        if failed is not None and not told.exists():
            return "failed", failed
        return "missing", None

    def _evaluate(
        self, file: File, current: Adapter, candidate: Adapter, with_probes: bool
    ) -> Evaluation:
        return Evaluation.submit(
            org=self.org,
            file=file,
            base_model=current.base_model,
            adapters=[current, candidate],
            options={
                "max_generations": settings.LOFT_EVAL_MAX_GENERATIONS,
                "max_new_tokens": settings.LOFT_EVAL_MAX_NEW_TOKENS,
                "probes": with_probes and settings.LOFT_EVAL_FORGETTING_PROBES > 0,
                "alias": self.name,
            },
        )

    def _report(
        self, files: list[File], evaluations: list[Evaluation], current: Adapter, candidate: Adapter
    ) -> dict:
        """The gate's report on the finished evaluations, one per file in ``files``' order."""
        scores, probes = [], None
        for file, evaluation in zip(files, evaluations, strict=True):
            was, now = _entry(evaluation, current.id), _entry(evaluation, candidate.id)
            scores.append(
                promotion.FileScores(
                    file=file.filename or file.id,
                    current=was["per_row"],
                    candidate=now["per_row"],
                    evaluation=evaluation.id,
                )
            )
            if probes is None and "probes" in was and "probes" in now:
                prompts = [p["prompt"] for p in evaluation.results.get("probes") or []]
                probes = promotion.ProbeHits(was["probes"]["hits"], now["probes"]["hits"], prompts)
        report = promotion.gate(scores, probes)
        for entry, file in zip(report["files"], files, strict=True):
            entry["file_id"] = file.id
        report["current_adapter"], report["candidate_adapter"] = current.id, candidate.id
        return report


@dataclass
class Promotion:
    """What ``Alias.promote`` did: ``status`` is evaluating, promoted, forced, refused or
    failed; ``report`` the gate's (or the failure's) evidence."""

    status: str
    move: AliasMove | None = None
    report: dict | None = None
    evaluations: list[Evaluation] = field(default_factory=list)

    @property
    def moved(self) -> bool:
        return self.status in ("promoted", "forced")


class AliasError(Exception):
    """A request about an alias that cannot be done: ``code`` and ``param`` for the API's error,
    the message a sentence; ``conflict``: refused because of how things stand (409), not
    because the request is malformed (400)."""

    def __init__(self, message: str, code: str, *, param: str | None = None, conflict=False):
        super().__init__(message)
        self.code, self.param, self.conflict = code, param, conflict


def _entry(evaluation: Evaluation, adapter_id: str) -> dict:
    """The results of one adapter in a custom evaluation (``results["models"]`` follows the
    order of ``candidates``)."""
    models = evaluation.results.get("models") or []
    for candidate, entry in zip(evaluation.candidates, models, strict=False):
        if candidate.get("adapter") == adapter_id:
            return entry or {}
    return {}


def _usable(evaluation: Evaluation, current_id: str, candidate_id: str, with_probes: bool) -> bool:
    """Does the evaluation hold what the gate needs of both adapters? (Those made before
    evaluations kept per-row results do not.)"""
    for adapter_id in (current_id, candidate_id):
        entry = _entry(evaluation, adapter_id)
        if "error" in entry or "per_row" not in entry:
            return False
        if with_probes and not (entry.get("probes") or {}).get("hits"):
            return False
    return True


class AliasMove(TenantOwnedModel):
    """One move of an alias: who, when, from which adapter to which, and the evidence. Adapter
    ids are kept as text, so the history outlives an adapter deleted after it left the alias."""

    class Kind(models.TextChoices):
        CREATED = "created"
        PROMOTED = "promoted"
        FORCED = "forced"  # promoted by an owner over the gate's refusal
        REFUSED = "refused"  # a promotion the gate refused: the alias did not move
        ROLLED_BACK = "rolled_back"
        PINNED = "pinned"  # the eval files changed; the alias did not move

    alias = models.ForeignKey(Alias, on_delete=models.CASCADE, related_name="moves")
    kind = models.CharField(max_length=12, choices=Kind.choices)
    from_adapter = models.CharField(max_length=40, blank=True)
    to_adapter = models.CharField(max_length=40, blank=True)
    actor = models.CharField(max_length=200, help_text="Who moved it: a person, a key, a policy.")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    evidence = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.alias_id} {self.kind} {self.from_adapter} → {self.to_adapter}"

    def as_object(self) -> dict:
        """The move as the API and the webhook events show it."""
        return {
            "object": "alias.move",
            "id": f"{MOVE_ID_PREFIX}{self.pk}",
            "alias": self.alias_id,
            "kind": self.kind,
            "from_adapter": self.from_adapter or None,
            "to_adapter": self.to_adapter or None,
            "actor": self.actor,
            "created_at": int(self.created_at.timestamp()),
            "evidence": self.evidence,
        }
