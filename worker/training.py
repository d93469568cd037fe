"""Running a fine-tuning job on a worker: claim it, feed the engine, store what it makes.

The Celery task (worker/tasks.py) calls ``run_job``. Everything the worker writes goes through
the job's fenced methods (jobs/models/jobs.py), so an attempt that lost its lease changes nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import random
import shutil
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import close_old_connections, transaction
from django.utils import timezone

from engine import artifacts, data, distributed, evaluate, train
from engine import plan as planning
from engine.base_models import load_base_model, training_device, warm_base_models
from engine.hyperparameters import (
    ConfigError,
    TrainConfig,
    as_stored,
    method_fits_file,
    method_type_of,
)
from jobs.models import Adapter, Evaluation, File, FineTuneJob
from loft import storage
from loft.observability import bind_log_fields
from worker import tokenized_cache
from worker.base_scores import KeptBaseScores, remember_for
from worker.tokenizer import tokenizer_for

logger = logging.getLogger(__name__)
Status = FineTuneJob.Status

# Checkpoints a job keeps in storage: the newest, and the one before it should the newest turn
# out damaged. Older ones are deleted once a newer one is recorded; a checkpoint every step
# would otherwise fill the bucket (and the tenant's storage quota) without end.
CHECKPOINTS_KEPT = 2
# A running job's progress is written at most this often (and at its checkpoints and end).
PROGRESS_EVERY_SECONDS = 1.0
# peft's names, in the evaluation, of the adapter just trained and of its parent beside it.
CHILD = "default"
PARENT = "parent"
KEPT_WORDS = {evaluate.HELD_OUT: "held-out rows", evaluate.PROBES: "probes"}


class Heartbeat(threading.Thread):
    """Renews the job's lease every few seconds while the training loop runs."""

    def __init__(self, job: FineTuneJob, attempt: int, every: float):
        super().__init__(daemon=True, name=f"heartbeat-{job.id}")
        self.job, self.attempt, self.every = job, attempt, every
        self.stopped = threading.Event()

    def run(self):
        try:
            while not self.stopped.wait(self.every):
                if not self.job.heartbeat(self.attempt):
                    return  # lease lost: the loop sees it at its next step (should_stop)
        finally:
            close_old_connections()

    def stop(self):
        self.stopped.set()
        self.join(timeout=5)


class PhaseClock:
    """Where an attempt's time goes (the job's ``timings``): a mark as it enters each phase.

        queue       submission → a worker claims the job (file validation included)
        setup       claim → the first training step starts (data, checkpoint, base model)
        training    the first step's start → the last step's end (the checkpoints between
                    steps included, not the one after the last)
        evaluation  the last step's end → base and adapter scored (engine/evaluate.py), the
                    final checkpoint included
        upload      the adapter's folder written and uploaded, the job finished
        total       submission → the end

    They are written when an attempt ends (or gives way to a storage outage). An attempt that
    ends early shows the phases it reached, the last one up to its end. A resumed job's phases
    are those of its last attempt, its queue the wait before the first; ``total`` includes the
    earlier attempts."""

    PHASES = FineTuneJob.PHASES[1:]  # the queue is measured by the database's timestamps

    def __init__(self, job: FineTuneJob, attempt: int, claimed: float):
        self.job, self.attempt, self.started = job, attempt, claimed
        self.marks = {"setup": claimed}  # phase → time.monotonic() when it began

    def enter(self, phase: str, at: float | None = None) -> None:
        self.marks[phase] = time.monotonic() if at is None else at

    def timings(self) -> dict:
        """Seconds per phase so far; the phase under way ends now."""
        now, job = time.monotonic(), self.job
        reached = [p for p in self.PHASES if p in self.marks]
        ends = [self.marks[p] for p in reached[1:]] + [now]
        spans = {p: round(end - self.marks[p], 3) for p, end in zip(reached, ends, strict=True)}
        queue = (job.started_at - job.created_at).total_seconds() if job.started_at else None
        total = (timezone.now() - job.created_at).total_seconds()
        return {
            "attempt": self.attempt,
            "queue": None if queue is None else round(queue, 3),
            **{p: spans.get(p) for p in self.PHASES},
            "total": round(total, 3),
        }


def run_job(job_id: str, worker: str) -> None:
    job = FineTuneJob.objects.select_related("org", "base_model").filter(pk=job_id).first()
    if job is None:
        return
    bind_log_fields(org_id=job.org_id)
    attempt = job.claim(worker)
    if attempt is None:
        logger.info("job not claimed: it is %s or another worker holds it", job.status)
        return  # another worker holds it, or it is finished or cancelled
    logger.info("attempt %s of the job started", attempt, extra={"attempt": attempt})
    job.add_event("info", f"Attempt {attempt} started on {worker}.", attempt=attempt)
    heartbeat = Heartbeat(job, attempt, settings.LOFT_HEARTBEAT_SECONDS)
    heartbeat.start()
    work = Path(tempfile.mkdtemp(prefix=f"loft-{job.id}-"))
    started = time.monotonic()
    clock = PhaseClock(job, attempt, started)
    try:
        run = JobRun(job, attempt, work, clock)
        run.setup()
        model, result = run.train()
        clock.enter("evaluation", result.last_step_ended)
        folder, comparison = run.evaluate(model)
        clock.enter("upload")
        run.finish(run.save(folder, comparison, result), comparison, run.results_file())
    except storage.StorageError as error:
        # Passing, most likely: the job waits and resumes rather than failing on a blip. The
        # tenant reads a sentence; the endpoint, bucket and key are for the operators' log.
        logger.warning("attempt %s of job %s met a storage error: %s", attempt, job.id, error)
        job.fenced(attempt).update(
            compute_seconds=_compute_seconds(job, started), timings=clock.timings()
        )
        if not job.give_way(
            attempt,
            "object storage was unavailable.",
            settings.LOFT_MAX_ATTEMPTS,
            retry_in=settings.LOFT_STORAGE_RETRY_SECONDS * attempt,
        ):
            _refused(job, attempt, "its giving way to storage")
    except train.TimeLimitReached as limit:
        kept = (
            f"Its checkpoint at step {limit.step} is kept: an operator can retry the job from "
            "there, or train fewer steps."
            if limit.step
            else "It stopped before its first step: train fewer or shorter rows."
        )
        _fail(
            job,
            attempt,
            "time_limit",
            f"Time limit reached: the job ran longer than "
            f"{settings.LOFT_JOB_SOFT_TIME_LIMIT_SECONDS} s, the most a worker allows. {kept}",
            clock,
        )
    except train.TrainingPaused as paused:
        if not job.pause(
            attempt,
            paused.step,
            compute_seconds=_compute_seconds(job, started),
            timings=clock.timings(),
        ):
            _refused(job, attempt, "its pause")
    except train.TrainingCancelled:  # asked to, or its lease was lost (then this is refused)
        _end(job, attempt, Status.CANCELLED, "Job cancelled.", clock)
    except (data.DatasetError, ConfigError) as error:
        _fail(
            job,
            attempt,
            getattr(error, "code", "invalid_hyperparameters"),
            str(error),
            clock,
        )
    except SoftTimeLimitExceeded:  # Celery's backstop, for a step or evaluation that overran
        _fail(
            job,
            attempt,
            "time_limit",
            "Time limit reached; the job ran longer than the worker allows.",
            clock,
        )
    except Exception as error:  # noqa: BLE001 - the job must end with a sentence, whatever broke
        if _is_out_of_memory(error):
            batch = job.hyperparameters.get("batch_size", 8)
            _fail(
                job,
                attempt,
                "out_of_memory",
                f"Out of memory at batch size {batch}; try {max(1, batch // 2)}.",
                clock,
            )
        else:
            logger.exception("job %s attempt %s failed", job.id, attempt)
            _fail(
                job,
                attempt,
                "training_failed",
                f"Training failed on the worker ({error.__class__.__name__}); the operators "
                "have the details in its log.",
                clock,
            )
    finally:
        heartbeat.stop()
        shutil.rmtree(work, ignore_errors=True)
        job.refresh_from_db(fields=["status", "attempt"])
        logger.info(
            "attempt %s of the job ended; the job is %s (attempt %s)",
            attempt,
            job.status,
            job.attempt,
        )


def _is_out_of_memory(error: Exception) -> bool:
    return isinstance(error, MemoryError | torch.OutOfMemoryError)


def _compute_seconds(job: FineTuneJob, started: float) -> float:
    """This attempt's seconds on top of what earlier attempts recorded."""
    return job.compute_seconds + (time.monotonic() - started)


def _fail(job: FineTuneJob, attempt: int, code: str, message: str, clock: PhaseClock) -> None:
    error = {"code": code, "message": message, "param": None}
    _end(job, attempt, Status.FAILED, message, clock, error=error)


def _end(
    job: FineTuneJob,
    attempt: int,
    status: str,
    message: str,
    clock: PhaseClock,
    error: dict | None = None,
) -> None:
    compute_seconds = _compute_seconds(job, clock.started)
    if not job.finish(
        attempt,
        status,
        message,
        error=error,
        compute_seconds=compute_seconds,
        timings=clock.timings(),
    ):
        _refused(job, attempt, f"its end ({status})")


def _refused(job: FineTuneJob, attempt: int, what: str) -> None:
    """Say in the log that a write of this attempt was refused: another attempt, or the
    reaper, took the job while it was away (paused, cut off, too slow to renew its lease)."""
    logger.warning("attempt %s no longer holds job %s; refused: %s", attempt, job.id, what)


def read_examples(file: File) -> tuple[list[data.Example], int]:
    """A dataset's usable rows; rows with errors are skipped and counted."""
    _, items = data.open_dataset(
        storage.iter_object(file.s3_key),
        filename=file.filename,
        forced_format=file.requested_format or None,
    )
    examples, skipped = [], 0
    for item in items:
        if isinstance(item, data.RowError):
            skipped += 1
        else:
            examples.append(item)
    return examples, skipped


def _prepare_data(job: FineTuneJob, attempt: int, config: TrainConfig, tokenizer):
    """Training rows, held-out rows, and the held-out examples as text (for generation): the
    validation file's, or a seeded share of the training file split off before truncating.
    Rendering the examples into tokens is the slow part; it is kept per file
    (worker/tokenized_cache.py) for the next job, retry or resume on the same file."""
    for file in (job.training_file, job.validation_file):
        unfit = file and method_fits_file(method_type_of(job.hyperparameters), file.format)
        if unfit:
            raise data.DatasetError("invalid_file", unfit)
    examples, skipped = read_examples(job.training_file)
    if skipped:
        job.add_event(
            "warning",
            f"Skipped {skipped} rows of the training file that have errors.",
            attempt=attempt,
        )
    rendered = tokenized_cache.rendered_rows(job.training_file, examples, tokenizer, job.base_model)
    pairs = list(zip(examples, rendered, strict=True))
    if job.validation_file is not None:
        held_examples = read_examples(job.validation_file)[0]
        held_pairs = list(
            zip(
                held_examples,
                tokenized_cache.rendered_rows(
                    job.validation_file, held_examples, tokenizer, job.base_model
                ),
                strict=True,
            )
        )
    else:
        pairs, held_pairs = train.split_validation(pairs, config.validation_fraction, config.seed)
    as_pairs = config.sides == 2  # DPO; a supervised job reads a pair's preferred answer
    tokenized, dropped = train.truncate(
        [r for _, r in pairs], config.max_seq_length, pairs=as_pairs
    )
    if dropped:
        job.add_event(
            "warning",
            f"Dropped {dropped} rows whose trained part lies past "
            f"max_seq_length {config.max_seq_length}.",
            attempt=attempt,
        )
    if not tokenized:
        raise data.DatasetError(
            "no_valid_rows", "No row of the training file has an assistant turn to learn from."
        )
    held_out, _ = train.truncate([r for _, r in held_pairs], config.max_seq_length, pairs=as_pairs)
    # A DPO child replays nothing: its ancestors' rows are not pairs, and its reference (the
    # parent) is what holds it near what they learned.
    replayed = [] if as_pairs else replay_rows(job, config, tokenizer, len(tokenized))
    if replayed:
        job.add_event(
            "info",
            f"Replaying {len(replayed)} rows of the parent's and its ancestors' training data "
            f"beside the {len(tokenized)} new ones (replay_fraction {config.replay_fraction:g}).",
            attempt=attempt,
        )
    return tokenized + replayed, held_out, [e for e, _ in held_pairs]


def replay_rows(job: FineTuneJob, config: TrainConfig, tokenizer, new_rows: int) -> list:
    """For a job with a parent adapter: a seeded sample of the rows its ancestors trained on
    (their held-out rows left out), so many that they make ``replay_fraction`` of the rows
    trained. Without it a child learns its new task and forgets the parent's
    (bench/continual.py measures both)."""
    if job.parent_adapter is None or planning.replayed_rows(new_rows, config, 1) == 0:
        return []
    pool = []
    for ancestor in job.parent_adapter.lineage():
        trained, _ = ancestor_rows(ancestor, tokenizer, job.base_model)
        pool.extend(train.truncate([r for _, r in trained], config.max_seq_length)[0])
    count = planning.replayed_rows(new_rows, config, len(pool))
    return random.Random(config.seed).sample(pool, count)


def ancestor_rows(ancestor: Adapter, tokenizer, base_model) -> tuple[list, list]:
    """An ancestor's (example, rendered) pairs, as its job split them: those it trained on, and
    those it held out (its validation file's, or the share of its training file its own
    ``validation_fraction`` and ``seed`` split off). Empty where its files are gone."""
    trained_on = ancestor.training_file()
    if trained_on is None:
        return [], []

    def pairs(file: File) -> list:
        examples, _ = read_examples(file)
        rendered = tokenized_cache.rendered_rows(file, examples, tokenizer, base_model)
        return list(zip(examples, rendered, strict=True))

    trained = pairs(trained_on)
    if ancestor.job.validation_file_id is None:
        theirs = TrainConfig(**as_stored(ancestor.job.hyperparameters))
        return train.split_validation(trained, theirs.validation_fraction, theirs.seed)
    held = File.objects.filter(
        pk=ancestor.job.validation_file_id, status=File.Status.PROCESSED
    ).first()
    return trained, pairs(held) if held is not None else []


def latest_usable_checkpoint(job: FineTuneJob, work: Path) -> tuple[Path | None, int, list[int]]:
    """The newest checkpoint whose files are all in storage and match its manifest, downloaded:
    (its folder, its step, the steps of newer ones found damaged and skipped). (None, 0, …)
    when there is none: the run starts from step 0.

    A checkpoint that storage says is incomplete (an object missing) or whose files do not
    match its manifest is skipped for an older one. Storage failing to answer is another
    matter: the StorageError goes up, and the attempt gives way and resumes later from the
    checkpoint it could not read, rather than from an older one or from the start."""
    skipped = []
    for checkpoint in job.checkpoints.all():
        folder = work / "resume" / f"step-{checkpoint.step}"
        try:
            manifest = storage.download_folder(checkpoint.s3_prefix, folder)
            artifacts.verify(folder, manifest)
        except storage.StorageError as error:
            if not storage.is_missing(error):
                raise
            logger.warning("checkpoint %s of %s incomplete: %s", checkpoint.step, job.id, error)
        except (ValueError, KeyError) as error:  # a file or the manifest itself is damaged
            logger.warning("checkpoint %s of %s damaged: %s", checkpoint.step, job.id, error)
        else:
            return folder, checkpoint.step, skipped
        skipped.append(checkpoint.step)
        shutil.rmtree(folder, ignore_errors=True)
    return None, 0, skipped


class JobRun:
    """One attempt at a claimed job, read top to bottom (torchtune's recipe shape):

        setup → train → evaluate → save → finish

    Each step is a method; what they share lives on the run. Everything written to the job
    goes through its fencing token (``attempt``)."""

    def __init__(self, job: FineTuneJob, attempt: int, work: Path, clock: PhaseClock):
        self.job, self.attempt, self.work, self.clock = job, attempt, work, clock
        self.started = clock.started
        self.config = TrainConfig(**as_stored(job.hyperparameters))
        self.device = training_device()
        self.latest: dict = {}  # the last step's figures, stored with each checkpoint
        self.unreported: train.Progress | None = None  # a step's figures not written yet
        self.reported_at = -math.inf

    def event(self, message: str, data: dict | None = None) -> None:
        self.job.add_event("info", message, data, attempt=self.attempt)

    def setup(self) -> None:
        """Tokenized rows, the checkpoint to resume from, the parent adapter, the base model."""
        job, config = self.job, self.config
        self.tokenizer = tokenizer_for(job.base_model)
        self.train_rows, self.held_out, self.held_examples = _prepare_data(
            job, self.attempt, config, self.tokenizer
        )
        self.resume_from, self.resumed_step, skipped = latest_usable_checkpoint(job, self.work)
        for step in skipped:
            self.event(f"The checkpoint at step {step} is incomplete or damaged; it is skipped.")
        if self.resume_from is not None:
            self.event(f"Resuming from the checkpoint at step {self.resumed_step}.")
        self.parent_folder = None
        if job.parent_adapter is not None:
            self.parent_folder = self.work / "parent"
            storage.download_folder(job.parent_adapter.s3_prefix, self.parent_folder)
        spec = job.base_model.spec
        warm = warm_base_models.is_warm(spec, config.quantization, self.device)
        cache = settings.LOFT_HOME / "models"
        self.base = warm_base_models.get(spec, cache, config.quantization, self.device)
        self.event(
            f"Training {len(self.train_rows)} examples ({len(self.held_out)} held out) on "
            f"{self.device}; base model {'already loaded' if warm else 'loaded'}."
        )
        # A resumed run counts its tokens from the checkpoint on; the steps before it count too.
        self.tokens_before_resume = train.scheduled_tokens(
            self.train_rows, config, self.resumed_step
        )

    def on_progress(self, progress: train.Progress) -> None:
        """The step's figures, written at most once a second (a step can take milliseconds on a
        GPU; each report is two database writes), and always for the last step and before a
        checkpoint (on_checkpoint)."""
        self.latest.update(train_loss=progress.loss, learning_rate=progress.learning_rate)
        self.unreported = progress
        due = time.monotonic() - self.reported_at >= PROGRESS_EVERY_SECONDS
        if due or progress.step == progress.total_steps:
            self.report(progress)

    def report(self, progress: train.Progress) -> None:
        self.unreported, self.reported_at = None, time.monotonic()
        trained = self.tokens_before_resume + progress.trained_tokens
        if not self.job.record_progress(
            self.attempt, {**progress.__dict__, "trained_tokens": trained}, trained
        ):
            _refused(self.job, self.attempt, f"its step {progress.step}")
            return
        self.event(
            f"Step {progress.step}/{progress.total_steps}: training loss {progress.loss:.4f}",
            {
                "step": progress.step,
                "train_loss": progress.loss,
                "learning_rate": progress.learning_rate,
            },
        )

    def on_validation(self, step: int, loss: float, best_step: int) -> None:
        """A held-out measurement during training: an event the job's chart draws."""
        self.latest["validation_loss"] = loss
        best = "the best so far" if best_step == step else f"the best is step {best_step}'s"
        self.event(
            f"Step {step}: held-out loss {loss:.4f} ({best}).",
            {"step": step, "validation_loss": loss, "best_step": best_step},
        )

    def on_checkpoint(self, folder: Path, step: int) -> None:
        """Upload the checkpoint under this attempt's own prefix, manifest last, and record it
        while this attempt still holds the job: a stale attempt's upload never lands on the
        current attempt's files, and is deleted again once refused. The checkpoints the job
        no longer keeps are deleted after the new one is recorded."""
        if self.unreported is not None:  # the checkpoint's step is on the chart
            self.report(self.unreported)
        prefix = f"{self.job.s3_prefix}checkpoints/attempt-{self.attempt}/step-{step}/"
        manifest = artifacts.build_manifest(folder)
        storage.upload_folder(folder, prefix, manifest)
        shutil.rmtree(folder, ignore_errors=True)  # in storage now; the worker's disk is small
        released = self.job.record_checkpoint(
            self.attempt, step, prefix, manifest, dict(self.latest), keep=CHECKPOINTS_KEPT
        )
        if released is None:
            _refused(self.job, self.attempt, f"its checkpoint at step {step}, deleted again")
            released = [prefix]
        for old_prefix in released:
            storage.delete_prefix(old_prefix)

    def out_of_time(self) -> bool:
        return time.monotonic() - self.started > settings.LOFT_JOB_SOFT_TIME_LIMIT_SECONDS

    def train(self) -> tuple:
        """The engine's loop (engine/train.py): the adapter model and the run's result. A job
        on ``gpus`` devices runs it as rank 0 of a data-parallel run, its other ranks started
        as processes of their own that write nothing (engine/distributed.py); this process
        keeps the callbacks, so events, checkpoints, fencing and cancel work as on one."""
        # Measured during training only with eval_every; else the held-out loss is the
        # evaluation's (the same rows, packed the same way). A DPO run measures its held-out
        # pairs against the reference it computes before its first step, so it takes them.
        held_out = self.held_out if self.config.eval_every or self.config.sides == 2 else []
        if self.config.gpus == 1:
            return self.loop(held_out)
        if self.config.gpus > settings.LOFT_WORKER_DEVICES:  # a class declared otherwise
            raise ConfigError(
                f"This job trains on {self.config.gpus} devices at once; this "
                f"{settings.LOFT_WORKER_CLASS} worker has {settings.LOFT_WORKER_DEVICES} "
                "(LOFT_WORKER_DEVICES)."
            )
        inputs = distributed.RunInputs(
            config=asdict(self.config),
            base=asdict(self.job.base_model.spec),
            cache_dir=str(settings.LOFT_HOME / "models"),
            device=self.device,
            world_size=self.config.gpus,
            work_dir=str(self.work),
            resume_from=str(self.resume_from) if self.resume_from else None,
            parent_adapter=str(self.parent_folder) if self.parent_folder else None,
            pad_id=self.pad_id,
            tokens_per_forward=self.job.plan.get("forward_tokens"),
        )
        with distributed.ranks_started(
            self.work / "ranks", inputs, self.train_rows, held_out
        ) as parallel:
            return self.loop(held_out, parallel)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def loop(self, held_out: list, parallel: distributed.DataParallel | None = None) -> tuple:
        return train.train(
            self.config,
            self.train_rows,
            held_out,
            self.base,
            device=self.device,
            work_dir=self.work,
            callbacks=train.Callbacks(
                self.on_progress,
                lambda: self.job.should_stop(self.attempt),
                self.on_checkpoint,
                out_of_time=self.out_of_time,
                should_pause=lambda: self.job.should_pause(self.attempt),
                on_loop_start=lambda: self.clock.enter("training"),
                on_validation=self.on_validation,
            ),
            resume_from=self.resume_from,
            parent_adapter=self.parent_folder,
            tokens_per_forward=self.job.plan.get("forward_tokens"),
            pad_id=self.pad_id,
            parallel=parallel,
        )

    def evaluate(self, model) -> tuple[Path, dict]:
        """The adapter saved, then the same held-out rows through the base and the adapter;
        the base goes back to the warm cache whatever happens."""
        try:
            if self.job.should_stop(self.attempt):  # a cancel that came during the last step
                raise train.TrainingCancelled("cancelled before the evaluation")
            folder = self.work / "adapter"
            train.save_adapter(model, folder)
            self.event(f"Evaluating base and adapter on {len(self.held_examples)} held-out rows.")
            remember = self.remember_base_scores()
            result = evaluate.compare(
                model,
                self.tokenizer,
                self.held_examples,
                self.held_out,
                probes=evaluate.load_probes()[: settings.LOFT_EVAL_FORGETTING_PROBES],
                remember=remember,
                reward_scale=self.config.beta if self.config.sides == 2 else None,
                **self.scoring_options,
            )
            comparison = result.as_dict()
            if self.config.sides == 2:  # what the adapter's implicit reward is measured against
                comparison["reference"] = "parent" if self.parent_folder else "base"
            kept = " and ".join(KEPT_WORDS[kind] for kind in sorted(remember.kinds_read)) or "none"
            self.event(
                f"Evaluated in {sum(result.seconds.values()):.1f} s: held-out rows "
                f"{result.seconds['held_out']:.1f} s, probes {result.seconds['probes']:.1f} s. "
                f"The base's results kept by earlier jobs: {kept}.",
                {"seconds": result.seconds, "base_results_kept": sorted(remember.kinds_read)},
            )
            if self.parent_folder is not None:
                comparison["parent"] = self.against_parent(model)
        finally:
            warm_base_models.give_back(model.unload())
        comparison["base_precision"] = evaluate.base_precision(
            self.config.quantization, comparison["adapter"], self.on_full_precision(folder)
        )
        return folder, comparison

    def against_parent(self, model) -> dict:
        """A continual job's measure against where it started: the parent's scores on this
        job's held-out rows, and, on every ancestor's held-out rows (the tasks it learned
        before), the child's and the parent's (retention). The parent is loaded beside the
        child on the same base, and deleted after."""
        job, options = self.job, self.scoring_options
        self.event("Scoring the parent adapter, and the ancestors' tasks (retention).")
        artifacts.refuse_unsafe_adapter(self.parent_folder)  # before peft reads anything in it
        model.load_adapter(str(self.parent_folder), adapter_name=PARENT)
        try:

            def scored(adapter: str, examples: list, tokenized: list) -> dict:
                model.set_adapter(adapter)
                chat = evaluate.answerable(examples, options["max_generations"])
                scores, _ = evaluate.score(
                    model,
                    self.tokenizer,
                    chat,
                    tokenized,
                    row_tokens=options["row_tokens"],
                    device=options["device"],
                    max_new_tokens=options["max_new_tokens"],
                )
                return asdict(scores)

            result = {
                "adapter": job.parent_adapter.id,
                "model": job.parent_adapter.name,
                "held_out": scored(PARENT, self.held_examples, self.held_out),
                "retention": [],
            }
            for ancestor in job.parent_adapter.lineage():
                _, held = ancestor_rows(ancestor, self.tokenizer, job.base_model)
                if not held:
                    continue
                examples = [e for e, _ in held]
                tokenized, _ = train.truncate([r for _, r in held], self.config.max_seq_length)
                result["retention"].append(
                    {
                        "adapter": ancestor.id,
                        "model": ancestor.name,
                        "rows": len(examples),
                        "child": scored(CHILD, examples, tokenized),
                        "parent": scored(PARENT, examples, tokenized),
                    }
                )
        finally:
            model.set_adapter(CHILD)
            model.delete_adapter(PARENT)
        return result

    def on_full_precision(self, folder: Path) -> evaluate.Scores | None:
        """A QLoRA adapter is served on its 4-bit base, but a user who downloads it may load
        it on the full-precision base (the standard PEFT way): score it there too, so the gap
        is measured rather than guessed. A LoRA adapter was trained on that base already."""
        if self.config.quantization != "nf4":
            return None
        self.event("Scoring the QLoRA adapter on the full-precision base as well.")
        cache = settings.LOFT_HOME / "models"
        full = load_base_model(self.job.base_model.spec, cache, "none", self.device)
        return evaluate.on_other_base(
            full,
            folder,
            self.tokenizer,
            self.held_examples,
            self.held_out,
            **self.scoring_options,
        )

    def remember_base_scores(self) -> KeptBaseScores:
        """The base's results kept for the next job on the same base and held-out rows (and
        for every job on the same base, for the probes): worker/base_scores.py."""
        held_out_file = self.job.validation_file or self.job.training_file
        return remember_for(
            self.job.base_model,
            self.config.quantization,
            self.device,
            org_id=self.job.org_id,
            file_sha256=held_out_file.sha256,
        )

    @property
    def scoring_options(self) -> dict:
        """How held-out rows are scored, the same on every base an adapter is scored on."""
        return {
            "row_tokens": self.config.max_seq_length,
            "device": self.device,
            "max_generations": settings.LOFT_EVAL_MAX_GENERATIONS,
            "max_new_tokens": settings.LOFT_EVAL_MAX_NEW_TOKENS,
        }

    def save(self, folder: Path, comparison: dict, result: train.TrainResult) -> Adapter:
        """The adapter folder (weights, tokenizer, config, eval report, model card) uploaded;
        its row is not saved yet."""
        job = self.job
        self.tokenizer.save_pretrained(folder)
        artifacts.write_json(folder / "eval_report.json", comparison)
        metrics = {
            "train_loss": result.train_loss,
            "validation_loss": comparison["adapter"]["loss"],
            "steps": result.steps,
            "resumed_from_step": result.resumed_from_step,
            "trained_tokens": result.trained_tokens,
            "seconds": round(result.seconds, 2),
            "precision": result.precision,
        }
        if result.best_step is not None:  # the adapter is that step's, not the last one's
            metrics["best_step"] = result.best_step
        if result.stopped_early_at is not None:
            metrics["stopped_early_at_step"] = result.stopped_early_at
        name = job.fine_tuned_model_name
        artifacts.write_json(folder / "training_config.json", job.hyperparameters)
        (folder / "README.md").write_text(
            artifacts.model_card(
                name=name,
                base_model=job.base_model.name,
                method=self.config.method,
                base_quantization=self.config.quantization,
                hyperparameters=job.hyperparameters,
                data_stats={
                    "training examples": len(self.train_rows),
                    "held-out examples": len(self.held_out),
                },
                metrics=metrics,
                parent=job.parent_adapter.name if job.parent_adapter else None,
                evaluation=comparison,
            )
        )
        adapter = Adapter(
            org=job.org, name=name, job=job, base_model=job.base_model, parent=job.parent_adapter
        )
        adapter.s3_prefix = f"orgs/{job.org_id}/adapters/{adapter.id}/"
        adapter.manifest = artifacts.build_manifest(
            folder,
            base=artifacts.base_record(
                job.base_model.name, job.base_model.revision, self.config.quantization
            ),
        )
        adapter.size_bytes, adapter.metrics = adapter.manifest["total_bytes"], metrics
        storage.upload_folder(folder, adapter.s3_prefix, adapter.manifest)
        return adapter

    def results_file(self) -> File:
        """The job's metrics by step as a CSV in the tenant's files (OpenAI's result_files),
        uploaded; its row is not saved yet."""
        job = self.job
        content = step_metrics_csv(job)
        file = File(
            org=job.org,
            filename=f"{job.id}-step_metrics.csv",
            purpose=File.Purpose.RESULTS,
            bytes=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            status=File.Status.PROCESSED,
            file_type="csv",
            rows=content.count(b"\n") - 1,
        )
        file.s3_key = File.object_key(job.org_id, file.id)
        storage.put_bytes(file.s3_key, content, "text/csv")
        return file

    def finish(self, adapter: Adapter, comparison: dict, results: File) -> None:
        """The adapter row, the results file and the job's success commit together, and only
        while this attempt still holds the job (its row locked, so the reaper cannot take it
        in between)."""
        job = self.job
        with transaction.atomic():
            if job.fenced(self.attempt).select_for_update().exists():
                adapter.save()
                results.save()
                Evaluation.record_for_job(job, adapter, comparison)
                job.finish(
                    self.attempt,
                    Status.SUCCEEDED,
                    f"Job succeeded: {adapter.name}.",
                    metrics=adapter.metrics,
                    result_file=results,
                    trained_tokens=train.scheduled_tokens(self.train_rows, self.config),
                    compute_seconds=_compute_seconds(job, self.started),
                    timings=self.clock.timings(),
                )
                return
        _refused(job, self.attempt, f"its adapter {adapter.id}, deleted again")
        storage.delete_prefix(adapter.s3_prefix)
        storage.delete_object(results.s3_key)


# The result file's columns: OpenAI's (step, train_loss, valid_loss) and the learning rate.
RESULT_COLUMNS = ("step", "train_loss", "valid_loss", "learning_rate")


def step_metrics_csv(job: FineTuneJob) -> bytes:
    """The job's metrics by step from its events, every attempt's; where a resumed attempt ran
    a step again, its figures. A step whose progress was not written (at most one report a
    second: on fast hardware, not every step) has no row."""
    by_step: dict[int, dict] = {}
    events = job.events.filter(data__has_key="step").order_by("pk")
    for figures in events.values_list("data", flat=True):
        row = by_step.setdefault(figures["step"], {})
        if "train_loss" in figures:
            row.update(train_loss=figures["train_loss"], learning_rate=figures["learning_rate"])
        if "validation_loss" in figures:
            row["valid_loss"] = figures["validation_loss"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for step, row in sorted(by_step.items()):
        writer.writerow([step, *("" if row.get(c) is None else row[c] for c in RESULT_COLUMNS[1:])])
    return out.getvalue().encode()
