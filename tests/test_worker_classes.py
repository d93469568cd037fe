"""Worker classes: each training worker declares its class and consumes its queue
(``train.<class>``); pre-flight plans a job on every known class and routes it to the one where
it costs least among those it fits, or to the class it names; a job whose class has no worker
online waits queued, saying so, and runs when one starts."""

import pytest

from engine import plan as planning
from engine.hyperparameters import ConfigError, TrainConfig
from engine.model_cache import BUNDLED_BASE_MODEL
from jobs import preflight
from jobs.models import FineTuneJob, WorkerHeartbeat
from jobs.tasks import class_for_work, training_queue
from tests.helpers import WorkerProcess, banana_file, finished, signed_in, submit, wait_for

GIB = 2**30
SMALL = {"name": "small", "memory_bytes": 8 * GIB, "tokens_per_second_135m": 150}
LARGE = {"name": "large", "memory_bytes": 64 * GIB, "tokens_per_second_135m": 150}
# The same throughput, the small class cheaper: a job that fits both costs less there.
CLASSES = [{**SMALL, "cost_per_hour": 0.5}, {**LARGE, "cost_per_hour": 4.0}]
# Short rows either way; the plan sizes a job by its max_seq_length: at 64 it fits 8 GiB, at
# 4096 without gradient checkpointing (~39 GiB planned) only 64 GiB.
FITS_BOTH = {"method": "lora", "max_seq_length": 64, "max_steps": 2}
FITS_ONLY_LARGE = {**FITS_BOTH, "max_seq_length": 4096, "gradient_checkpointing": False}


def bundled_shape() -> planning.ModelShape:
    arch = BUNDLED_BASE_MODEL["architecture"]
    return planning.ModelShape(parameters=BUNDLED_BASE_MODEL["parameters"], **arch)


def route(requested: dict, classes: list[dict]) -> tuple[dict, planning.Plan]:
    stats = planning.DataStats(rows=40, tokens=1600, max_row_tokens=60)

    def plan_on(given: dict, worker: planning.WorkerClass):
        config = TrainConfig(**given)
        return given, planning.estimate(
            bundled_shape(), stats, worker, config, training_examples=36
        )

    workers = [planning.WorkerClass.from_dict(spec) for spec in classes]
    return planning.route(requested, workers, plan_on)


def test_a_job_goes_to_the_cheapest_class_it_fits_or_to_the_one_it_names():
    settings, plan = route(FITS_BOTH, CLASSES)
    assert settings["worker_class"] == plan.worker_class == "small"
    assert [(c["name"], c["fits"]) for c in plan.classes_considered] == [
        ("small", True),
        ("large", True),
    ]
    small, large = plan.classes_considered
    assert small["estimated_cost"] < large["estimated_cost"]

    settings, plan = route(FITS_ONLY_LARGE, CLASSES)
    assert settings["worker_class"] == plan.worker_class == "large" and plan.fits
    assert [c["fits"] for c in plan.classes_considered] == [False, True]

    # Named: that class, even where another would be cheaper; every class is still planned.
    settings, plan = route({**FITS_BOTH, "worker_class": "large"}, CLASSES)
    assert plan.worker_class == "large" and len(plan.classes_considered) == 2
    with pytest.raises(ConfigError, match=r"known worker classes \(small, large\), got 'gpu'"):
        route({**FITS_BOTH, "worker_class": "gpu"}, CLASSES)

    # Fits none: planned on the largest, which says why.
    _, plan = route({**FITS_BOTH, "max_seq_length": 8192}, CLASSES)
    assert plan.worker_class == "large" and not plan.fits and plan.suggestion


def test_a_job_on_several_devices_needs_a_class_with_as_many():
    two_gpus = {**LARGE, "name": "pair", "devices": 2, "cost_per_hour": 8.0}
    settings, plan = route({**FITS_BOTH, "gpus": 2}, [*CLASSES, two_gpus])
    assert plan.worker_class == "pair" and plan.fits and plan.gpus == 2
    assert [c["fits"] for c in plan.classes_considered] == [False, False, True]
    _, alone = route(FITS_BOTH, [two_gpus])
    # Each device takes a share of every step's rows: half the training time.
    training = plan.estimated_seconds - planning.STARTUP_SECONDS
    assert training == pytest.approx(
        (alone.estimated_seconds - planning.STARTUP_SECONDS) / 2, abs=1
    )
    _, refused = route({**FITS_BOTH, "gpus": 2}, CLASSES)
    assert not refused.fits and "at most that many gpus" in refused.suggestion


def class_env(spec: dict, settings) -> dict:
    return {
        "LOFT_TRAINING_QUEUE": settings.LOFT_TRAINING_QUEUE,
        "LOFT_WORKER_CLASS": spec["name"],
        "LOFT_WORKER_MEMORY_BYTES": str(spec["memory_bytes"]),
        "LOFT_WORKER_COST_PER_HOUR": str(spec["cost_per_hour"]),
        "LOFT_WORKER_HEARTBEAT_SECONDS": "1",
        "LOFT_EVAL_MAX_GENERATIONS": "2",
        "LOFT_EVAL_FORGETTING_PROBES": "0",
    }


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_jobs_run_on_their_class_s_workers_and_wait_for_one_when_none_runs(
    tenant_a, api_a, staff_client, private_queue, settings, tmp_path
):
    settings.LOFT_WORKER_CLASSES = CLASSES
    small_spec, large_spec = CLASSES
    small = WorkerProcess(
        tmp_path,
        "small",
        f"default,{training_queue('small')}",
        **class_env(small_spec, settings),
    ).start()
    large = WorkerProcess(
        tmp_path, "large", training_queue("large"), **class_env(large_spec, settings)
    )
    try:
        file = wait_for(banana_file(tenant_a), lambda f: f.status == "processed", 120)
        # The small worker publishes its class with its heartbeat.
        beat = wait_for(
            lambda: WorkerHeartbeat.online().filter(class_name="small").first(),
            timeout=30,
            what="the small worker's heartbeat",
        )
        assert beat.class_spec["memory_bytes"] == 8 * GIB

        cheap = submit(tenant_a, file, **FITS_BOTH)
        assert cheap.plan["worker_class"] == "small"
        big = submit(tenant_a, file, **FITS_ONLY_LARGE)
        assert big.plan["worker_class"] == "large"
        fits = {c["name"]: c["fits"] for c in big.plan["classes_considered"]}
        assert fits["small"] is False and fits["large"] is True

        # The job that fits the small class runs there; the other waits, saying why.
        wait_for(cheap, finished, 300)
        assert cheap.status == "succeeded", cheap.error
        assert cheap.worker.startswith("small@")
        sentence = "No large worker is running: the job waits in the queue until one starts."
        big.refresh_from_db()
        assert big.status == "queued"
        assert api_a.get(f"/v1/fine_tuning/jobs/{big.id}").json()["status_details"] == sentence
        page = signed_in(tenant_a.user).get(f"/jobs/{big.id}")
        assert sentence in page.content.decode()
        assert sentence in staff_client.get("/ops/live").content.decode()

        # A worker of its class starts: the job runs there.
        large.start()
        wait_for(big, finished, 300)
        assert big.status == "succeeded", big.error
        assert big.worker.startswith("large@")
        assert api_a.get(f"/v1/fine_tuning/jobs/{big.id}").json()["status_details"] is None
    finally:
        small.stop()
        large.stop()
        # Other tests plan on the default class alone.
        WorkerHeartbeat.objects.filter(class_name__in=["small", "large"]).delete()


@pytest.mark.django_db
def test_a_job_whose_class_no_worker_declares_goes_where_a_worker_is(settings):
    """A job planned before classes on one no worker declares any more (an upgrade from the
    single "cpu" class to docker-compose's GPU classes): it runs on the cheapest class with a
    worker online rather than waiting on a queue nobody consumes."""
    settings.LOFT_WORKER_CLASSES = CLASSES
    stored = FineTuneJob(plan={"worker_class": "retired"}, status=FineTuneJob.Status.QUEUED)
    known = {worker.name for worker in preflight.known_classes()}
    assert "retired" not in known
    # The cheapest class with a worker online (the suite's own may have published "cpu"), or
    # with none online the cheapest declared: "small".
    assert stored.class_name == class_for_work() in known
    if not WorkerHeartbeat.online().exists():
        assert stored.class_name == "small"
    assert FineTuneJob(plan={"worker_class": "large"}).class_name == "large"  # known: kept


def test_a_declared_class_without_its_figures_is_refused_by_name():
    """loft/settings.py refuses LOFT_WORKER_CLASSES so as it starts (ImproperlyConfigured)."""
    with pytest.raises(ConfigError, match="each needs name, memory_bytes and tokens_per_second"):
        planning.WorkerClass.from_dict({"name": "gpu", "memory_bytes": 1})
    with pytest.raises(ConfigError, match="not a worker class"):
        planning.WorkerClass.from_dict("gpu")
