"""Adapters (what a job produces) and evaluations (models scored on the same rows)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import models, transaction
from django.db.models import F, Func, Subquery, Value
from django.db.models.fields.json import KeyTransform
from django.db.models.functions import JSONObject
from django.utils import timezone

from jobs import tasks
from jobs.models.catalogue import BaseModel
from jobs.models.files import File
from jobs.models.usage import Quota
from loft import storage
from loft.ids import make_id
from loft.models import Organization
from loft.tenancy import TenantOwnedModel

if TYPE_CHECKING:
    from jobs.models.jobs import FineTuneJob


def new_adapter_id() -> str:
    return make_id("adapter")


class Adapter(TenantOwnedModel):
    """A trained LoRA adapter: a PEFT folder in S3 whose manifest lists every file's sha256.

    On request, its merged weights: the base model with the adapter folded in, a plain
    safetensors model folder under ``merged_prefix`` for tools that load no LoRA adapters
    (worker/merging.py makes it on a worker)."""

    class MergedStatus(models.TextChoices):
        NONE = "none"
        QUEUED = "queued"
        RUNNING = "running"
        READY = "ready"
        FAILED = "failed"

    id = models.CharField(primary_key=True, max_length=40, default=new_adapter_id, editable=False)
    name = models.CharField(
        max_length=300, help_text="The fine_tuned_model name, ft:<base>:<org>:…"
    )
    job = models.OneToOneField(
        "FineTuneJob", null=True, on_delete=models.SET_NULL, related_name="adapter"
    )
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    s3_prefix = models.CharField(max_length=500)
    manifest = models.JSONField(default=dict)
    size_bytes = models.BigIntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True)
    merged_status = models.CharField(
        max_length=10, choices=MergedStatus.choices, default=MergedStatus.NONE
    )
    merged_error = models.TextField(blank=True, help_text="Why merging failed, in a sentence.")
    merged_manifest = models.JSONField(default=dict, blank=True)
    merged_size_bytes = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name

    @property
    def base_quantization(self) -> str:
        """The precision of the base the adapter is served on: the one it was trained on, as
        its manifest records (``engine.artifacts.base_record``). Adapters made before that was
        recorded were always served on the full-precision base, and still are."""
        return ((self.manifest or {}).get("base") or {}).get("quantization", "none")

    def lineage(self) -> list[Adapter]:
        """This adapter, its parent, the parent's parent, ...: the chain it was trained along,
        each with its job."""
        chain, seen, adapter = [], set(), self
        while adapter is not None and adapter.pk not in seen:
            seen.add(adapter.pk)
            chain.append(adapter)
            parent = adapter.parent_id
            adapter = Adapter.objects.select_related("job").filter(pk=parent).first()
        return chain

    def training_file(self) -> File | None:
        """The file its job trained on, while that file is there and usable."""
        if self.job is None:
            return None
        return File.objects.filter(
            pk=self.job.training_file_id, status=File.Status.PROCESSED
        ).first()

    @property
    def merged_prefix(self) -> str:
        return f"{self.s3_prefix}merged/"

    def request_merge(self) -> bool:
        """Queue the making of merged weights; True if this call queued it. Asking again while
        they are queued, being made or ready changes nothing; after a failure it tries anew.
        A merge holds a worker as a job does: it counts toward the concurrent_jobs quota
        (raises QuotaExceeded)."""
        waiting = (self.MergedStatus.NONE, self.MergedStatus.FAILED)
        with transaction.atomic():
            Organization.lock(self.org_id)
            mergeable = Adapter.objects.filter(pk=self.pk, merged_status__in=waiting)
            if mergeable.exists():
                Quota.for_org(self.org).check_concurrent_work()
            queued = mergeable.update(merged_status=self.MergedStatus.QUEUED, merged_error="")
            if queued:
                tasks.merge_adapter(self.pk)
        self.refresh_from_db(fields=["merged_status", "merged_error"])
        return bool(queued)

    def delete_with_content(self) -> None:
        """Delete the row, then its folder and merged weights in object storage. Refused
        (AdapterInUse) while an alias points at it, while a job continues from it, or while
        its merged weights are being made. Under the organization's lock, so that no alias
        moves to it and no job starts from it in between."""
        with transaction.atomic():
            Organization.lock(self.org_id)
            alias = self.aliases.order_by("name").first()
            if alias is not None:
                raise AdapterInUse(
                    f"The alias {alias.name} points at the adapter {self.id}; promote another "
                    "adapter to it, or delete the alias, before deleting the adapter."
                )
            child = self.children_jobs.order_by("created_at").first()
            if child is not None:
                raise AdapterInUse(
                    f"The job {child.id} was trained from the adapter {self.id} and keeps it as "
                    "its parent (the lineage); it cannot be deleted."
                )
            if self.merged_status in (self.MergedStatus.QUEUED, self.MergedStatus.RUNNING):
                raise AdapterInUse(
                    f"The merged weights of the adapter {self.id} are being made; wait for "
                    "them before deleting it."
                )
            prefix = self.s3_prefix
            self.delete()
        # After the row: an adapter is never listed without its files.
        storage.delete_prefix(prefix)


class AdapterInUse(Exception):
    pass


def new_evaluation_id() -> str:
    return make_id("eval")


class Evaluation(TenantOwnedModel):
    """Models scored on the same rows (engine/evaluate.py). Two kinds:

    - ``job``: made at the end of every job, base against the new adapter on the held-out rows,
      with side-by-side samples, the forgetting probes and the promotion gate's verdict;
    - ``custom``: asked for through ``POST /v1/evaluations``: the base and any of the tenant's
      adapters of it on an eval file, run in the background (worker/evaluations.py). The
      leaderboard of an eval file ranks every model ever evaluated on it.
    """

    class Kind(models.TextChoices):
        JOB = "job"
        CUSTOM = "custom"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    id = models.CharField(
        primary_key=True, max_length=40, default=new_evaluation_id, editable=False
    )
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.JOB)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.SUCCEEDED)
    job = models.ForeignKey(
        "FineTuneJob", null=True, blank=True, on_delete=models.SET_NULL, related_name="evaluations"
    )
    adapter = models.ForeignKey(
        Adapter, null=True, blank=True, on_delete=models.CASCADE, related_name="evaluations"
    )
    file = models.ForeignKey(
        File, null=True, blank=True, on_delete=models.SET_NULL, related_name="evaluations"
    )
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT)
    candidates = models.JSONField(
        default=list, blank=True, help_text='Custom: [{"model": name, "adapter": id or null}]'
    )
    options = models.JSONField(default=dict, blank=True, help_text="max_generations, …")
    results = models.JSONField(default=dict, help_text="Per model scores and samples")
    verdict = models.JSONField(default=dict, help_text="better, worse_on, generation_metric")
    error = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    FINISHED = (Status.SUCCEEDED, Status.FAILED)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.id} ({self.kind})"

    @classmethod
    def record_for_job(cls, job: FineTuneJob, adapter: Adapter, comparison: dict) -> Evaluation:
        """The evaluation a job makes of its adapter at the end of training; the adapter's
        metrics carry the verdict, so a worse adapter is flagged wherever it is listed."""
        adapter.metrics = {**adapter.metrics, "verdict": comparison["verdict"]}
        adapter.save(update_fields=["metrics"])
        return cls.objects.create(
            org_id=job.org_id,
            job=job,
            adapter=adapter,
            file=job.validation_file,
            base_model=job.base_model,
            candidates=[
                {"model": job.base_model.name, "adapter": None},
                {"model": adapter.name, "adapter": adapter.id},
            ],
            results={k: v for k, v in comparison.items() if k != "verdict"},
            verdict=comparison["verdict"],
            finished_at=timezone.now(),
        )

    @classmethod
    def submit(
        cls, *, org, file: File, base_model: BaseModel, adapters: list[Adapter], options: dict
    ) -> Evaluation:
        """A custom evaluation of the base and ``adapters`` on ``file``, queued for a worker.
        It holds a worker as a job does: it counts toward the concurrent_jobs quota (raises
        QuotaExceeded)."""
        with transaction.atomic():
            Organization.lock(org.pk)
            Quota.for_org(org).check_concurrent_work()
            evaluation = cls.objects.create(
                org=org,
                kind=cls.Kind.CUSTOM,
                status=cls.Status.QUEUED,
                file=file,
                base_model=base_model,
                candidates=[{"model": base_model.name, "adapter": None}]
                + [{"model": a.name, "adapter": a.id} for a in adapters],
                options=options,
            )
            tasks.run_evaluation(evaluation.id)
        return evaluation

    def claim(self) -> bool:
        """queued → running. A running one may be claimed again: its worker died and the
        message came back (acks_late); scoring again has no side effect but the result."""
        return bool(
            Evaluation.objects.filter(
                pk=self.pk, status__in=(self.Status.QUEUED, self.Status.RUNNING)
            ).update(status=self.Status.RUNNING)
        )

    def succeed(self, results: dict) -> None:
        self._finish(self.Status.SUCCEEDED, results=results)

    def fail(self, code: str, message: str) -> None:
        self._finish(self.Status.FAILED, error={"code": code, "message": message, "param": None})

    def _finish(self, status: str, **fields) -> None:
        fields.update(status=status, finished_at=timezone.now())
        Evaluation.objects.filter(pk=self.pk, status=self.Status.RUNNING).update(**fields)
        self.refresh_from_db()

    def scores_by_model(self) -> list[dict]:
        """Each model's scores, the base first: one shape for both kinds."""
        candidates = self.candidates
        if self.kind == self.Kind.JOB:
            stored = [self.results.get("base"), self.results.get("adapter")]
            if not candidates:  # recorded before evaluations named their models
                candidates = [
                    {"model": self.base_model.name, "adapter": None},
                    {"model": getattr(self.adapter, "name", "adapter"), "adapter": self.adapter_id},
                ]
        else:  # nothing yet while queued or running
            stored = self.results.get("models") or [None] * len(candidates)
        models = [
            {**candidate, **(scores or {})}
            for candidate, scores in zip(candidates, stored, strict=True)
        ]
        parent = self.results.get("parent") if self.kind == self.Kind.JOB else None
        if parent:  # a continual job's parent, on the same held-out rows
            models.append(
                {"model": parent["model"], "adapter": parent["adapter"], **parent["held_out"]}
            )
        return models

    def retention(self) -> list[dict]:
        """A continual job's scores on its ancestors' held-out rows: per ancestor, the child's
        and the parent's (empty for any other evaluation)."""
        return (self.results.get("parent") or {}).get("retention", [])

    def summary(self) -> dict:
        """What the job and adapter objects show; the samples are in the full evaluation."""
        return evaluation_summary(self.id, self.results, self.verdict)

    @staticmethod
    def latest_summary_parts(job_id) -> Subquery:
        """For an annotation: the parts of the job's latest evaluation its summary is made of
        (``evaluation_summary``), read by PostgreSQL in the job's own query."""
        latest = Evaluation.objects.filter(job=job_id).order_by("-created_at")
        results = {
            part: KeyTransform(part, "results")
            for part in ("base", "adapter", "forgetting", "base_precision", "reference")
        }
        first_samples = Func(
            F("results"), Value("$.samples[0 to 2]"), function="jsonb_path_query_array"
        )
        parts = JSONObject(
            evaluation_id=F("id"),
            verdict=F("verdict"),
            results=JSONObject(**results, samples=first_samples),
        )
        return Subquery(latest.values(parts=parts)[:1], output_field=models.JSONField())

    @staticmethod
    def leaderboard(evaluations) -> list[dict]:
        """Every model evaluated on one eval file, its latest succeeded result, best first: by
        normalized exact match, then ROUGE-L, then the lowest loss."""
        latest: dict[str, dict] = {}
        for evaluation in sorted(evaluations, key=lambda e: e.created_at):
            for entry in evaluation.scores_by_model():
                if "error" not in entry:
                    latest[entry["model"]] = {**entry, "evaluation": evaluation.id}

        def rank(entry: dict) -> tuple:
            loss = entry.get("loss")
            return (
                -(entry.get("normalized_exact_match") or 0),
                -(entry.get("rouge_l") or 0),
                loss if loss is not None else float("inf"),
            )

        return sorted(latest.values(), key=rank)


def evaluation_summary(evaluation_id: str, results: dict, verdict: dict) -> dict:
    """An evaluation as the job and adapter objects show it: its headline figures, verdict and
    first three samples."""
    return {
        "id": evaluation_id,
        "base": results.get("base"),
        "adapter": results.get("adapter"),
        "verdict": verdict,
        "forgetting": _forgetting_headline(results.get("forgetting")),
        "base_precision": results.get("base_precision"),
        # A DPO adapter's: what its implicit reward is measured against (base or parent).
        "reference": results.get("reference"),
        "samples": (results.get("samples") or [])[:3],
    }


def _forgetting_headline(forgetting: dict | None) -> dict | None:
    if not forgetting:
        return None
    return {
        "probes": forgetting["probes"],
        "base_answered": forgetting["base"]["answered"],
        "adapter_answered": forgetting["adapter"]["answered"],
        "lost": len(forgetting["lost"]),
        "gained": len(forgetting["gained"]),
    }
