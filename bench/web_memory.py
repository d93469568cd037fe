"""Memory of the web tier: resident size of each gunicorn worker of a real ``make run``, idle and
after an upload that is validated inside the request, and whether torch is loaded there.

    .venv/bin/python bench/web_memory.py            # starts `python -m loft.stack` itself

Prints one line per gunicorn worker and the median; `--json FILE` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

PROJECT = Path(__file__).resolve().parent.parent
ROWS = b"".join(
    json.dumps(
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "A"}]}
    ).encode()
    + b"\n"
    for i in range(50)
)


def gunicorn_workers(master: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in master.children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        parent = child.parent()
        if "gunicorn" in cmd and parent and "gunicorn" in " ".join(parent.cmdline()):
            found.append(child)
    return found


def rss_mib(processes: list[psutil.Process]) -> list[float]:
    return [round(p.memory_info().rss / 2**20, 1) for p in processes]


def torch_loaded(process: psutil.Process) -> bool:
    return any("libtorch" in m.path for m in process.memory_maps())


def upload(base_url: str, key: str) -> int:
    boundary = "loftbench"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        + ROWS
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{base_url}/v1/files",
        data=body,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.status


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--json")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="loft-web-memory-")
    env = {**os.environ, "LOFT_HOME": home, "LOFT_PORT": str(args.port)}
    stack = subprocess.Popen(
        [sys.executable, "-m", "loft.stack"],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    key = None
    base_url = f"http://127.0.0.1:{args.port}"
    try:
        for line in stack.stdout:
            if match := re.search(r"\(shown once\): (\S+)", line):
                key = match.group(1)
            if "Loft is running" in line:
                break
        else:
            raise SystemExit("the stack did not start")
        master = psutil.Process(stack.pid)
        time.sleep(5)
        workers = gunicorn_workers(master)
        for _ in range(4):  # a few pages, so every worker has served something
            urllib.request.urlopen(f"{base_url}/healthz", timeout=30).read()
        idle = rss_mib(workers)
        statuses = [upload(base_url, key) for _ in range(len(workers) * 2)]
        after = rss_mib(workers)
        figures = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
            "python": platform.python_version(),
            "git": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
            ).stdout.strip(),
            "workers": len(workers),
            "upload_statuses": statuses,
            "rss_idle_mib": idle,
            "rss_after_upload_mib": after,
            "median_idle_mib": statistics.median(idle),
            "median_after_upload_mib": statistics.median(after),
            "torch_in_a_worker": any(torch_loaded(p) for p in workers),
        }
        print(json.dumps(figures, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        os.killpg(stack.pid, signal.SIGINT)
        try:
            stack.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
