"""Each training worker process owns one device: never every process on the first GPU."""

from engine.base_models import training_device
from loft import stack


def test_a_host_starts_one_training_worker_per_gpu_each_pinned_to_its_own(monkeypatch):
    workers = stack.training_workers({"LOFT_HOME": "/tmp/x"}, gpus=3)
    devices = [worker.env["LOFT_DEVICE"] for worker in workers]
    assert devices == ["cuda:0", "cuda:1", "cuda:2"]
    hostnames = [worker.argv[worker.argv.index("--hostname") + 1] for worker in workers]
    assert len(set(hostnames)) == len(set(devices)) == 3

    [cpu_worker] = stack.training_workers({"LOFT_HOME": "/tmp/x"}, gpus=0)
    assert "LOFT_DEVICE" not in cpu_worker.env and stack.worker_devices(0) == ["cpu"]


def test_a_worker_trains_on_the_device_it_was_given(monkeypatch):
    monkeypatch.setenv("LOFT_DEVICE", "cuda:1")
    assert training_device() == "cuda:1"
    monkeypatch.delenv("LOFT_DEVICE")
    assert training_device() == "cpu"  # this machine has no GPU


def test_training_workers_consume_the_queue_of_their_class():
    [cpu_worker] = stack.training_workers({"LOFT_WORKER_CLASS": "big-cpu"}, gpus=0)
    queues = cpu_worker.argv[cpu_worker.argv.index("--queues") + 1].split(",")
    assert queues == ["default", "train.big-cpu"]
    # A class of two-device workers: one worker for both, its jobs' ranks take one each.
    pair = {"LOFT_WORKER_CLASS": "pair", "LOFT_WORKER_DEVICES": "2"}
    [worker] = stack.training_workers(pair, gpus=2)
    assert "LOFT_DEVICE" not in worker.env
    assert "train.pair" in worker.argv[worker.argv.index("--queues") + 1].split(",")
