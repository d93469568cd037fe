"""Upload throughput and web-process memory: a 200 MB chat JSONL through POST /v1/files.

    .venv/bin/python bench/upload.py                 # starts its own stack (make run's supervisor)
    .venv/bin/python bench/upload.py --url http://127.0.0.1:8000 --key sk-loft-…   # a running one

Prints MB/s through Loft's API, the web worker's peak RSS growth during the upload, and, as the
baseline from the same run, MB/s of the same bytes written straight to the same S3 with boto3.
Targets: >= 50 MB/s and < 64 MB RSS growth.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from loft.embedded import free_port  # noqa: E402

MB = 2**20
TARGET_MB_PER_S = 50
TARGET_RSS_GROWTH_MB = 64


def write_chat_jsonl(path: Path, size_bytes: int) -> int:
    """Valid chat rows of varied length until the file reaches ``size_bytes``."""
    rng = random.Random(0)  # noqa: S311 - repeatable test data, not a secret
    words = ["the", "a", "model", "adapter", "data", "train", "loss", "token", "learn", "rate"]
    written = 0
    with open(path, "w") as out:
        while written < size_bytes:
            question = " ".join(rng.choices(words, k=rng.randint(5, 40)))
            answer = " ".join(rng.choices(words, k=rng.randint(5, 80)))
            row = {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
            line = json.dumps(row) + "\n"
            out.write(line)
            written += len(line)
    return path.stat().st_size


def stream_upload(url: str, key: str, path: Path) -> tuple[int, dict, float]:
    """POST the file as multipart without reading it into memory; returns status, body, seconds."""
    boundary = "loftbench" + os.urandom(8).hex()
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)
    started = time.perf_counter()
    connection.putrequest("POST", "/v1/files")
    connection.putheader("Authorization", f"Bearer {key}")
    connection.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    connection.putheader("Content-Length", str(len(head) + path.stat().st_size + len(tail)))
    connection.endheaders()
    connection.send(head)
    with open(path, "rb") as source:
        while chunk := source.read(MB):
            connection.send(chunk)
    connection.send(tail)
    response = connection.getresponse()
    body = json.loads(response.read())
    return response.status, body, time.perf_counter() - started


class PeakRss:
    """Samples the RSS of the web server's processes every 10 ms; reports the largest growth."""

    def __init__(self, pids: list[int]):
        self.processes = [psutil.Process(pid) for pid in pids]
        self.baseline = {p.pid: p.memory_info().rss for p in self.processes}
        self.peak = dict(self.baseline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for process in self.processes:
                try:
                    rss = process.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                self.peak[process.pid] = max(self.peak[process.pid], rss)
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def growth_mb(self) -> float:
        return max(self.peak[pid] - self.baseline[pid] for pid in self.baseline) / MB


def web_pids(port: int) -> list[int]:
    """The processes that serve the port: gunicorn's master and its workers all hold the socket."""
    pids = {
        connection.pid
        for connection in psutil.net_connections("tcp")
        if connection.laddr
        and connection.laddr.port == port
        and connection.status == psutil.CONN_LISTEN
    }
    if not pids:
        raise SystemExit(f"no process listens on port {port}")
    return sorted(pids)


def direct_s3_baseline(env_file: Path, path: Path) -> float:
    """MB/s of the same file written straight to the same S3 with boto3 and Loft's client
    settings (the baseline): what the object store itself allows on this machine."""
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    import boto3

    from loft.storage import client_config

    client = boto3.client(
        "s3",
        endpoint_url=values["S3_ENDPOINT_URL"],
        aws_access_key_id=values["S3_ACCESS_KEY_ID"],
        aws_secret_access_key=values["S3_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        config=client_config(connect_timeout=3, read_timeout=60, attempts=3),
    )
    started = time.perf_counter()
    client.upload_file(str(path), values.get("S3_BUCKET", "loft"), "bench/direct-upload")
    seconds = time.perf_counter() - started
    client.delete_object(Bucket=values.get("S3_BUCKET", "loft"), Key="bench/direct-upload")
    return path.stat().st_size / MB / seconds


def start_stack(home: Path, port: int) -> subprocess.Popen:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_URL", "CELERY_", "REDIS_", "S3_"))
    }
    # /healthz counts the workers for operators only: the bench is one, by the metrics token.
    token = secrets.token_urlsafe(24)
    env.update(LOFT_HOME=str(home), LOFT_PORT=str(port), LOFT_METRICS_TOKEN=token)
    log = open(home.parent / "stack.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "loft.stack"], cwd=PROJECT_DIR, env=env, stdout=log, stderr=log
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/healthz", headers={"Authorization": f"Bearer {token}"}
            )
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                if json.load(response)["workers"] >= 1:
                    return process
        except OSError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"the stack did not start; see {home.parent / 'stack.log'}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running Loft, e.g. http://127.0.0.1:8000")
    parser.add_argument("--key", help="an API key of that Loft")
    parser.add_argument("--loft-home", help="that Loft's LOFT_HOME, for the direct S3 baseline")
    parser.add_argument("--megabytes", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="loft-bench-"))
    stack = None
    try:
        if args.url:
            url, key, home = (
                args.url.rstrip("/"),
                args.key,
                Path(args.loft_home or os.environ.get("LOFT_HOME", ".loft")),
            )
        else:
            home, port = work / "home", free_port()
            home.mkdir()
            stack = start_stack(home, port)
            url = f"http://127.0.0.1:{port}"
            key = subprocess.run(
                [sys.executable, "manage.py", "create_api_key", "--org", "bench"],
                cwd=PROJECT_DIR, env={"PATH": os.environ["PATH"], "LOFT_HOME": str(home)},
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]  # fmt: skip

        data = work / "bench-chat.jsonl"
        size = write_chat_jsonl(data, args.megabytes * MB)
        # One small upload first, so imports and the tokenizer are loaded before measuring.
        warmup = work / "warmup.jsonl"
        write_chat_jsonl(warmup, 1024)
        stream_upload(url, key, warmup)

        with PeakRss(web_pids(urllib.parse.urlsplit(url).port)) as rss:
            status, body, seconds = stream_upload(url, key, data)
        if status != 200:
            print(f"upload failed: {status} {body}")
            return 1
        through_loft = size / MB / seconds
        direct = direct_s3_baseline(home / "env", data)
        growth = rss.growth_mb()
        print(f"file:                 {size / MB:.0f} MB of chat JSONL ({body['status']})")
        print(f"upload through Loft:  {through_loft:.1f} MB/s ({seconds:.2f} s)", end="")
        print(f"  target >= {TARGET_MB_PER_S}")
        print(f"direct boto3 to S3:   {direct:.1f} MB/s (baseline, same run)")
        print(f"Loft / direct:        {through_loft / direct:.2f}")
        print(f"web peak RSS growth:  {growth:.1f} MB  target < {TARGET_RSS_GROWTH_MB}")
        ok = through_loft >= TARGET_MB_PER_S and growth < TARGET_RSS_GROWTH_MB
        print("targets met" if ok else "targets NOT met")
        return 0 if ok else 1
    finally:
        if stack is not None:
            stack.send_signal(signal.SIGTERM)
            stack.wait(120)
        for leftover in work.glob("*.jsonl"):
            leftover.unlink()


if __name__ == "__main__":
    sys.exit(main())
