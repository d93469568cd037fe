"""Data-parallel training: one run on several devices at once, each rank a process of its own.

Every rank runs the same loop (engine/train.py ``train`` with a ``DataParallel``) from the same
seed, so the adapter starts from the same weights and the steps take the same examples on every
rank. Each step a rank trains on its own share of the step's examples (``share_of_step``),
packed into rows as on one device; the step's labelled tokens are counted over all ranks, so
each token's loss is divided by the same count as on one device, and the adapter's gradients
are summed over the ranks before the step: every rank then clips and steps on the gradient a
single device would have had, and the ranks' adapters stay equal. Rank 0 alone calls the
callbacks (progress, checkpoints, cancel, pause, time limit, held-out loss) and writes; the
decisions it takes at a step boundary are broadcast, so every rank stops at the same step.

Not torch's DistributedDataParallel wrapper: the loop does not call the model's forward (it runs
the decoder, then the head only where a label is, engine/train.py ``labelled_hidden``), and a
rank whose share of a step is empty runs no forward at all, which would leave the wrapper's
reducer waiting. The gradients are summed once per step instead, in one buffer.

A run's ranks are processes started with ``subprocess`` (``python -m engine.distributed``), not
``multiprocessing``: a Celery prefork child is daemonic and may not have multiprocessing
children. The process that starts them hosts the rendezvous (a TCPStore on the loopback) and
may itself be rank 0 (``ranks_started``: the worker, which keeps its callbacks); a rank that
outlives its launcher is killed by the kernel (PR_SET_PDEATHSIG), and one that waits on a dead
peer gives up after COLLECTIVE_TIMEOUT (gloo notices a closed peer at once).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from engine.model_cache import BaseModelSpec

LOOPBACK = "127.0.0.1"
# The longest a rank waits for the others at a collective: rank 0 uploads checkpoints and
# measures held-out loss between steps while the others wait at the next step's first one.
COLLECTIVE_TIMEOUT = timedelta(minutes=20)
READY_POLL_SECONDS = 0.5
# How long the ranks a launcher started may take to exit once its own run has ended well: they
# end with the last step, so this is only the time to leave the process group and exit.
EXIT_GRACE_SECONDS = 60
RUN_FILE = "run.json"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run; the default is a run on one device, where
    every method leaves its argument as it is (the single-device loop is unchanged)."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # where the collectives' tensors live (nccl takes CUDA tensors only)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that calls the callbacks and writes."""
        return self.rank == 0

    def share(self, batch: list) -> list:
        return batch if self.world_size == 1 else share_of_step(batch, self.rank, self.world_size)

    def summed(self, *values: float) -> tuple[float, ...]:
        """The values summed over the ranks (in fp64: counts stay exact, losses add as on one
        device)."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tuple(tensor.tolist())

    def from_main(self, value: int) -> int:
        """Rank 0's value, on every rank."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Each parameter's gradient summed over the ranks, in one collective. A rank that ran
        no row this step has none and adds zeros: every rank joins every collective."""
        if self.world_size == 1:
            return
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in parameters
            ]
        ).to(self.device)
        dist.all_reduce(flat)
        offset = 0
        for parameter in parameters:
            size = parameter.numel()
            parameter.grad = flat[offset : offset + size].view_as(parameter).to(parameter.dtype)
            offset += size


def share_of_step(batch: list, rank: int, world_size: int) -> list:
    """The rank's share of a step's examples: longest first, each to the rank with the fewest
    tokens so far (the lowest rank on a tie), so the shares are disjoint, cover the step and
    weigh about the same. Examples are dealt rather than packed rows, so that a step whose
    examples fit one row, or a padded batch (one row), still spreads over the ranks; each rank
    packs its own share. A pure function of the batch: every rank computes the same split."""
    loads = [0] * world_size
    mine = []
    order = sorted(range(len(batch)), key=lambda i: -len(batch[i].input_ids))
    for index in order:
        owner = loads.index(min(loads))
        loads[owner] += len(batch[index].input_ids)
        if owner == rank:
            mine.append(index)
    return [batch[i] for i in sorted(mine)]


def rank_device(device: str, rank: int) -> str:
    """Where a rank computes: the CPU for every rank, or the GPU ``rank`` places after the
    launching worker's own (``cuda:0`` → rank 1 on ``cuda:1``)."""
    if not device.startswith("cuda"):
        return device
    first = int(device.partition(":")[2] or 0)
    return f"cuda:{first + rank}"


@contextlib.contextmanager
def joined(rank: int, world_size: int, device: str, port: int) -> Iterator[DataParallel]:
    """This process as ``rank`` of the run whose rendezvous listens on ``port``."""
    threads = torch.get_num_threads()
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    else:
        # CPU ranks share the host's cores: each takes its part of them. With every rank on
        # every core, two ranks on 2 cores took 6-28 s a step instead of about 2.
        torch.set_num_threads(max(1, threads // world_size))
    store = dist.TCPStore(LOOPBACK, port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(
        "nccl" if device.startswith("cuda") else "gloo",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        yield DataParallel(rank, world_size, device)
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


# --- launching: the run's inputs in a folder, the ranks as processes ------------------------


@dataclass
class RunInputs:
    """What every rank of a run needs besides its rank, written by the launcher to
    ``folder/run.json`` (and the examples beside it, as safetensors)."""

    config: dict  # the TrainConfig, as asdict gives it
    base: dict  # the BaseModelSpec, as asdict gives it
    cache_dir: str  # where the base model's converted weights are (engine/model_cache.py)
    device: str  # rank 0's; the others' follow it (rank_device)
    world_size: int
    work_dir: str  # rank 0 writes checkpoints (and, launched alone, the adapter) under it
    resume_from: str | None = None
    parent_adapter: str | None = None
    pad_id: int = 0
    tokens_per_forward: int | None = None
    port: int = 0  # the rendezvous's, set by the launcher
    launcher_pid: int = 0


def write_examples(path: Path, examples: list) -> None:
    """Tokenized examples as three flat tensors: every example's ids, then labels, end to
    end, and their lengths."""
    lengths = [len(e.input_ids) for e in examples]
    flat = lambda key: torch.tensor(  # noqa: E731
        [t for e in examples for t in getattr(e, key)], dtype=torch.int64
    )
    save_file(
        {
            "input_ids": flat("input_ids"),
            "labels": flat("labels"),
            "lengths": torch.tensor(lengths, dtype=torch.int64),
        },
        path,
    )


def read_examples(path: Path) -> list:
    from engine.train import Tokenized

    tensors = load_file(path)
    lengths = tensors["lengths"].tolist()
    ids = tensors["input_ids"].split(lengths) if lengths else []
    labels = tensors["labels"].split(lengths) if lengths else []
    return [Tokenized(i.tolist(), label.tolist()) for i, label in zip(ids, labels, strict=True)]


def start_ranks(folder: Path, ranks: range, **popen) -> list[subprocess.Popen]:
    """The ranks as processes of this interpreter (``python -m engine.distributed``)."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", "engine.distributed", str(folder), str(rank)],
            cwd=PROJECT_ROOT,
            **popen,
        )
        for rank in ranks
    ]


def stop_ranks(processes: list[subprocess.Popen], *, grace: float) -> None:
    """Wait up to ``grace`` seconds for the ranks to exit, then kill those left."""
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        if process.poll() is None:
            process.kill()
            process.wait()


@contextlib.contextmanager
def rendezvous(
    folder: Path, inputs: RunInputs, train_examples: list, validation_examples: list
) -> Iterator[tuple[RunInputs, dist.TCPStore]]:
    """The run's inputs written to ``folder`` with the port of a rendezvous this process hosts
    for as long as the block runs; gives the inputs and the rendezvous's store (on which the
    ranks say they are ready: ``wait_for_ranks``)."""
    folder.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore(
        LOOPBACK,
        0,
        inputs.world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=COLLECTIVE_TIMEOUT,
    )
    inputs.port, inputs.launcher_pid = store.port, os.getpid()
    write_examples(folder / "train.safetensors", train_examples)
    write_examples(folder / "validation.safetensors", validation_examples)
    (folder / RUN_FILE).write_text(json.dumps(asdict(inputs)))
    yield inputs, store


def say_ready(run: RunInputs, rank: int) -> None:
    """Tell the launcher this rank has loaded its model and is about to join."""
    client = dist.TCPStore(LOOPBACK, run.port, run.world_size, is_master=False)
    client.set(f"ready/{rank}", "1")


def wait_for_ranks(store, others: list[subprocess.Popen], ranks: range) -> None:
    """Until every other rank said it is ready; a rank that exits first (no such device, out of
    memory loading the base) fails the run now, naming it, rather than leaving rank 0 waiting
    at the rendezvous for COLLECTIVE_TIMEOUT."""
    keys = [f"ready/{rank}" for rank in ranks]
    deadline = time.monotonic() + COLLECTIVE_TIMEOUT.total_seconds()
    while not store.check(keys):
        for rank, process in zip(ranks, others, strict=True):
            if process.poll() is not None:
                raise RuntimeError(
                    f"rank {rank} of the run exited (code {process.returncode}) before it "
                    "joined; see the worker's log for its error"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(f"the ranks did not start within {COLLECTIVE_TIMEOUT}")
        time.sleep(READY_POLL_SECONDS)


@contextlib.contextmanager
def ranks_started(
    folder: Path, inputs: RunInputs, train_examples: list, validation_examples: list
) -> Iterator[DataParallel]:
    """This process as rank 0, ranks 1… as processes it starts; pass the DataParallel it gives
    to engine.train.train. The others are killed if the block fails (else they would wait out
    COLLECTIVE_TIMEOUT), and given EXIT_GRACE_SECONDS to end if it succeeds."""
    with rendezvous(folder, inputs, train_examples, validation_examples) as (run, store):
        ranks = range(1, run.world_size)
        others = start_ranks(folder, ranks)
        succeeded = False
        try:
            wait_for_ranks(store, others, ranks)
            with joined(0, run.world_size, run.device, run.port) as parallel:
                yield parallel
            succeeded = True
        finally:
            stop_ranks(others, grace=EXIT_GRACE_SECONDS if succeeded else 0)


def die_with_launcher(launcher_pid: int) -> None:
    """Have the kernel kill this rank when its launcher dies (Linux), so that no rank of a lost
    worker trains on alone; and exit now if it is gone already."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    if os.getppid() != launcher_pid:
        sys.exit("the launcher of this rank is gone")


def run_rank(folder: Path, rank: int) -> None:
    """One rank of a launched run. Rank 0 (launched rather than run by its launcher) reports
    each step, each checkpoint and the end as a JSON line on stdout and saves the adapter
    under the work folder."""
    from engine import train
    from engine.base_models import load_base_model
    from engine.hyperparameters import TrainConfig

    run = RunInputs(**json.loads((folder / RUN_FILE).read_text()))
    die_with_launcher(run.launcher_pid)
    config = TrainConfig(**run.config)
    device = rank_device(run.device, rank)
    base = load_base_model(
        BaseModelSpec(**run.base), Path(run.cache_dir), config.quantization, device
    )
    say_ready(run, rank)
    say = lambda **line: print(json.dumps(line), flush=True)  # noqa: E731
    callbacks = train.Callbacks(
        on_progress=lambda progress: say(progress=asdict(progress)),
        on_checkpoint=lambda checkpoint, step: say(checkpoint=str(checkpoint), step=step),
    )
    work_dir = Path(run.work_dir)
    with joined(rank, run.world_size, device, run.port) as parallel:
        model, result = train.train(
            config,
            read_examples(folder / "train.safetensors"),
            read_examples(folder / "validation.safetensors"),
            base,
            device=device,
            work_dir=work_dir,
            callbacks=callbacks if parallel.is_main else None,
            resume_from=Path(run.resume_from) if run.resume_from else None,
            parent_adapter=Path(run.parent_adapter) if run.parent_adapter else None,
            pad_id=run.pad_id,
            tokens_per_forward=run.tokens_per_forward,
            parallel=parallel,
        )
    if parallel.is_main:
        train.save_adapter(model, work_dir / "adapter")
        say(result=asdict(result))


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]), int(sys.argv[2]))
