"""The fine-tuning domain's models, one module per aggregate:

- catalogue: BaseModel, the base models on offer;
- files: File, an uploaded dataset;
- jobs: FineTuneJob with its whole lifecycle, JobEvent, JobAttempt, Checkpoint;
- adapters: Adapter and Evaluation;
- base_scores: BaseScores, a base model's evaluation results kept for the next job;
- usage: Quota and the usage ledger;
- aliases: Alias, a named deployment, and AliasMove, the record of its moves;
- completions: StoredCompletion, a chat completion kept with its feedback;
- policies: ContinualPolicy, an alias's rule for training on its traffic, and PolicyRun;
- workers: WorkerHeartbeat.
"""

from jobs.models.adapters import (
    Adapter,
    Evaluation,
    evaluation_summary,
    new_adapter_id,
    new_evaluation_id,
)
from jobs.models.aliases import Alias, AliasMove, new_alias_id
from jobs.models.base_scores import BaseScores
from jobs.models.catalogue import BaseModel
from jobs.models.completions import StoredCompletion
from jobs.models.files import File, FileInUse, new_file_id
from jobs.models.jobs import (
    Checkpoint,
    FineTuneJob,
    IdempotencyKeyReused,
    JobAttempt,
    JobEvent,
    new_job_id,
)
from jobs.models.policies import ContinualPolicy, PolicyRun
from jobs.models.usage import (
    InferenceUsage,
    MonthlyUsage,
    Quota,
    QuotaExceeded,
    UsageRecord,
    concurrent_work,
    month_start,
    storage_bytes,
    trained_tokens_this_month,
)
from jobs.models.workers import WorkerHeartbeat

__all__ = [
    "Adapter",
    "Alias",
    "AliasMove",
    "BaseModel",
    "BaseScores",
    "Checkpoint",
    "ContinualPolicy",
    "Evaluation",
    "File",
    "FileInUse",
    "FineTuneJob",
    "IdempotencyKeyReused",
    "InferenceUsage",
    "JobAttempt",
    "JobEvent",
    "MonthlyUsage",
    "PolicyRun",
    "Quota",
    "QuotaExceeded",
    "StoredCompletion",
    "UsageRecord",
    "WorkerHeartbeat",
    "concurrent_work",
    "evaluation_summary",
    "month_start",
    "new_alias_id",
    "new_adapter_id",
    "new_evaluation_id",
    "new_file_id",
    "new_job_id",
    "storage_bytes",
    "trained_tokens_this_month",
]
