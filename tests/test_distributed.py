"""Data-parallel training (engine/distributed.py): two ranks on the CPU with gloo train as one
device does, each on its own share of every step, and a killed run resumes from its checkpoint.

The ranks are processes of their own, started the way a worker starts them
(``python -m engine.distributed``); a rank that records what it trained on runs the same entry
point behind a few lines that wrap the loss and the gradient sum (RECORDING_RANK)."""

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import distributed
from engine import train as T
from engine.hyperparameters import ConfigError, TrainConfig
from jobs.models import BaseModel, FineTuneJob
from tests.helpers import SMOLLM2, banana_file, counting_examples
from worker import training

# Four steps of four short rows, fp32 and no dropout: the ranks' sums differ from one device's
# only in the order of their additions.
CONFIG = TrainConfig(
    method="lora",
    lora_rank=4,
    lora_dropout=0.0,
    mixed_precision="fp32",
    max_steps=4,
    batch_size=4,
    checkpoint_every=2,
    learning_rate=1e-3,
    max_seq_length=256,
)
# A launched run that has not ended by then has hung.
DEADLINE_SECONDS = 240

# A rank that writes, per step, the examples of each row it computed a loss on
# (``rows-<rank>.json`` in the run's folder): each step ends at the gradient sum, which every
# rank joins, rows or none.
RECORDING_RANK = """
import json, sys
from pathlib import Path
from engine import distributed, train

folder, rank = Path(sys.argv[1]), int(sys.argv[2])
steps, rows = [], []
loss_sum, sum_gradients = train.loss_sum, distributed.DataParallel.sum_gradients

def recording_loss_sum(model, row):
    rows.append([row.input_ids[0].tolist(), row.position_ids[0].tolist()])
    return loss_sum(model, row)

def step_ended(self, parameters):
    steps.append(list(rows))
    rows.clear()
    sum_gradients(self, parameters)

train.loss_sum = recording_loss_sum
distributed.DataParallel.sum_gradients = step_ended
try:
    distributed.run_rank(folder, rank)
finally:
    (folder / f"rows-{rank}.json").write_text(json.dumps(steps))
"""


def examples_of(rows: list) -> list[tuple[int, ...]]:
    """The examples packed in rows (as [input_ids, position_ids]): each starts at position 0."""
    found = []
    for ids, positions in rows:
        for token, position in zip(ids, positions, strict=True):
            if position == 0:
                found.append([])
            found[-1].append(token)
    return [tuple(example) for example in found]


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[T.Tokenized]:
    return counting_examples(tokenizer, CONFIG.max_seq_length)


@pytest.fixture(scope="module")
def one_device(base, examples, tmp_path_factory) -> dict:
    """The run on one device, as every job without gpus ran: its losses, the examples of each
    step, its adapter."""
    losses, steps, rows = [], [], []

    def recording_loss_sum(model, row):
        rows.append([row.input_ids[0].tolist(), row.position_ids[0].tolist()])
        return loss_sum(model, row)

    def step_done(progress: T.Progress) -> None:
        losses.append(progress.loss)
        steps.append(examples_of(rows))
        rows.clear()

    loss_sum = T.loss_sum
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(T, "loss_sum", recording_loss_sum)
        model, _ = T.train(
            CONFIG,
            examples,
            [],
            base,
            device="cpu",
            work_dir=tmp_path_factory.mktemp("one-device"),
            callbacks=T.Callbacks(on_progress=step_done),
        )
    weights = {key: value.clone() for key, value in T.adapter_weights(model).items()}
    model.unload()
    return {"losses": losses, "steps": steps, "weights": weights}


def inputs_for(work: Path, cache: Path, resume_from: Path | None = None) -> distributed.RunInputs:
    return distributed.RunInputs(
        config=asdict(CONFIG),
        base=asdict(SMOLLM2),
        cache_dir=str(cache),
        device="cpu",
        world_size=2,
        work_dir=str(work),
        resume_from=str(resume_from) if resume_from else None,
    )


def reported(rank0: subprocess.Popen, until=lambda line: False) -> list[dict]:
    """Rank 0's JSON lines (progress, checkpoints, result) until ``until`` says so or it ends."""
    lines = []
    for text in rank0.stdout:
        if text.startswith("{"):
            lines.append(json.loads(text))
            if until(lines[-1]):
                break
    return lines


def losses_in(lines: list[dict]) -> list[float]:
    return [line["progress"]["loss"] for line in lines if "progress" in line]


def killed_after_deadline(processes: list[subprocess.Popen]) -> threading.Timer:
    """A watchdog: a run that hangs fails its test rather than the whole suite."""
    timer = threading.Timer(DEADLINE_SECONDS, lambda: [p.kill() for p in processes])
    timer.start()
    return timer


@pytest.fixture(scope="module")
def two_ranks(base, examples, cache, tmp_path_factory) -> dict:
    """The same run on two ranks: rank 0's losses, each rank's examples per step, the adapter."""
    work = tmp_path_factory.mktemp("two-ranks")
    folder = work / "run"
    with distributed.rendezvous(folder, inputs_for(work, cache), examples, []):
        ranks = [
            subprocess.Popen(
                [sys.executable, "-c", RECORDING_RANK, str(folder), str(rank)],
                cwd=distributed.PROJECT_ROOT,
                stdout=subprocess.PIPE if rank == 0 else None,
                text=True,
            )
            for rank in range(2)
        ]
        watchdog = killed_after_deadline(ranks)
        lines = reported(ranks[0])
        distributed.stop_ranks(ranks, grace=DEADLINE_SECONDS)
        watchdog.cancel()
    assert [rank.returncode for rank in ranks] == [0, 0]
    per_rank = [json.loads((folder / f"rows-{rank}.json").read_text()) for rank in range(2)]
    return {
        "losses": losses_in(lines),
        "steps": [[examples_of(step) for step in steps] for steps in per_rank],
        "weights": load_file(work / "adapter" / "adapter_model.safetensors"),
    }


# --- the share of each rank: pure -----------------------------------------------------------


def test_each_rank_takes_a_disjoint_share_of_a_step_and_together_they_cover_it():
    batch = [T.Tokenized(list(range(length)), list(range(length))) for length in (9, 3, 7, 5, 2)]
    shares = [distributed.share_of_step(batch, rank, 2) for rank in range(2)]
    assert sorted(id(e) for share in shares for e in share) == sorted(id(e) for e in batch)
    # Longest first, each to the lighter rank: 9 | 7, 5 | 3, 2 … 14 tokens against 12.
    assert [[len(e.input_ids) for e in share] for share in shares] == [[9, 3, 2], [7, 5]]
    # More ranks than examples: the last ones train on nothing this step.
    assert [len(distributed.share_of_step(batch[:2], rank, 4)) for rank in range(4)] == [1, 1, 0, 0]


def test_a_rank_computes_on_its_own_gpu_after_the_launchers_or_on_the_cpu():
    assert [distributed.rank_device("cuda:0", rank) for rank in range(3)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
    ]
    assert distributed.rank_device("cuda:2", 1) == "cuda:3"
    assert distributed.rank_device("cpu", 1) == "cpu"


def test_the_examples_a_launcher_writes_read_back_as_they_were(tmp_path):
    examples = [T.Tokenized([1, 2, 3], [T.IGNORE, 2, 3]), T.Tokenized([4], [4])]
    distributed.write_examples(tmp_path / "rows.safetensors", examples)
    assert distributed.read_examples(tmp_path / "rows.safetensors") == examples
    distributed.write_examples(tmp_path / "none.safetensors", [])
    assert distributed.read_examples(tmp_path / "none.safetensors") == []


# --- two ranks against one device ------------------------------------------------------------


@pytest.mark.slow  # ~20 s: one run in this process, two rank processes that load the model
def test_each_rank_trains_on_a_disjoint_share_of_every_step_and_together_on_all_of_it(
    one_device, two_ranks
):
    rank0, rank1 = two_ranks["steps"]
    assert len(rank0) == len(rank1) == len(one_device["steps"]) == CONFIG.max_steps
    for step, (whole, mine, theirs) in enumerate(
        zip(one_device["steps"], rank0, rank1, strict=True)
    ):
        assert mine and theirs, f"step {step + 1}: a rank idled"
        assert not set(mine) & set(theirs), f"step {step + 1}: an example trained twice"
        assert sorted(mine + theirs) == sorted(whole), f"step {step + 1}: not the step's examples"


@pytest.mark.slow
def test_two_ranks_give_the_losses_and_the_adapter_of_one_device(one_device, two_ranks):
    assert len(two_ranks["losses"]) == CONFIG.max_steps
    assert two_ranks["losses"] == pytest.approx(one_device["losses"], abs=1e-4)
    assert two_ranks["weights"].keys() == one_device["weights"].keys()
    # Close as a whole, not element by element: Adam divides each gradient by its own running
    # size, so an element whose gradient is all but zero steps by up to the learning rate in
    # whichever direction the order of the additions rounds it to (measured: a few elements
    # up to 7e-4 apart, the whole adapter 5e-5 of its norm).
    keys = sorted(one_device["weights"])
    one = torch.cat([one_device["weights"][key].flatten() for key in keys])
    two = torch.cat([two_ranks["weights"][key].flatten() for key in keys])
    assert float((two - one).norm()) <= 1e-3 * float(one.norm())


@pytest.mark.slow  # ~20 s: two launches of two ranks
def test_a_killed_two_rank_run_resumes_from_its_checkpoint_to_the_same_losses(
    examples, cache, two_ranks, tmp_path
):
    first = tmp_path / "first"
    with distributed.rendezvous(first / "run", inputs_for(first, cache), examples, []):
        ranks = distributed.start_ranks(first / "run", range(2), stdout=subprocess.PIPE, text=True)
        watchdog = killed_after_deadline(ranks)
        lines = reported(ranks[0], until=lambda line: line.get("step") == 2)
        assert lines[-1] == {"checkpoint": str(first / "checkpoints" / "step-2"), "step": 2}
        ranks[1].send_signal(signal.SIGKILL)
        # Rank 0, waiting for it at the next step, gives up at once rather than hanging.
        assert ranks[0].wait(timeout=60) != 0
        watchdog.cancel()
    assert losses_in(lines) == pytest.approx(two_ranks["losses"][:2], abs=1e-4)

    again = tmp_path / "again"
    resumed = inputs_for(again, cache, resume_from=first / "checkpoints" / "step-2")
    with distributed.rendezvous(again / "run", resumed, examples, []):
        ranks = distributed.start_ranks(again / "run", range(2), stdout=subprocess.PIPE, text=True)
        watchdog = killed_after_deadline(ranks)
        lines = reported(ranks[0])
        distributed.stop_ranks(ranks, grace=DEADLINE_SECONDS)
        watchdog.cancel()
    assert [rank.returncode for rank in ranks] == [0, 0]
    assert lines[-1]["result"]["resumed_from_step"] == 2
    assert losses_in(lines) == pytest.approx(two_ranks["losses"][2:], abs=1e-4)


# --- a job on two devices: the worker is rank 0 ------------------------------------------------


@pytest.mark.slow  # ~30 s: the second rank loads the model, two steps
def test_a_job_on_two_gpus_writes_through_rank_0_alone_and_a_cancel_stops_both_ranks(
    tenant_a, tmp_path, monkeypatch, settings
):
    settings.LOFT_WORKER_DEVICES = 2  # a worker of a two-device class (its ranks share the CPU)
    job = FineTuneJob.objects.create(
        org=tenant_a.org,
        base_model=BaseModel.default(),
        training_file=banana_file(tenant_a),
        hyperparameters={
            **asdict(CONFIG),
            "max_steps": 3,
            "checkpoint_every": 1,
            "max_seq_length": 128,
            "gpus": 2,
        },
    )
    assert job.claim("worker-1") == 1
    started = []
    start_ranks = distributed.start_ranks
    monkeypatch.setattr(
        distributed,
        "start_ranks",
        lambda *a, **kw: started.extend(start_ranks(*a, **kw)) or started,
    )
    run = training.JobRun(job, 1, tmp_path, training.PhaseClock(job, 1, time.monotonic()))
    run.setup()
    report = run.on_progress

    def cancelled_after_step_2(progress):
        report(progress)
        if progress.step == 2:
            job.request_cancel()

    run.on_progress = cancelled_after_step_2
    with pytest.raises(T.TrainingCancelled):
        run.train()
    assert [process.poll() is not None for process in started] == [True]  # rank 1, ended
    steps = [e.data["step"] for e in job.events.filter(data__has_key="train_loss").order_by("pk")]
    assert steps == [1, 2]
    assert sorted(job.checkpoints.values_list("step", flat=True)) == [1, 2]
    # The other rank wrote nothing: its folder holds what the worker gave it.
    assert {p.name for p in (tmp_path / "ranks").iterdir()} == {
        distributed.RUN_FILE,
        "train.safetensors",
        "validation.safetensors",
    }


def test_a_job_on_more_devices_than_its_worker_has_fails_with_a_sentence():
    """A class declared with more devices than its workers have: the job ends with that
    sentence (worker/training.py fails a job on a ConfigError) rather than waiting on ranks
    that cannot start."""
    run = training.JobRun.__new__(training.JobRun)  # only what train() reads first
    run.config, run.held_out = TrainConfig(gpus=2), []
    with pytest.raises(ConfigError, match="trains on 2 devices at once; this cpu worker has 1"):
        run.train()


def test_a_rank_that_dies_before_it_joins_fails_the_run_at_once(tmp_path):
    """Rank 0 does not wait out the rendezvous's timeout for a rank that could not start."""
    inputs = distributed.RunInputs(
        config={}, base={}, cache_dir="", device="cpu", world_size=2, work_dir=str(tmp_path)
    )
    with distributed.rendezvous(tmp_path, inputs, [], []) as (run, store):
        dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"rank 1 of the run exited \(code 3\)"):
            distributed.wait_for_ranks(store, [dead], range(1, 2))
        assert time.monotonic() - started < 10
        distributed.say_ready(run, 1)  # a rank that started says so, and is waited for no more
        distributed.wait_for_ranks(store, [dead], range(1, 2))
