"""The ``loft`` command-line client: files, fine-tuning jobs, adapters, aliases and chat from a
terminal.

It speaks Loft's OpenAI-compatible REST API with the standard library only, so it needs nothing
beyond Python on the machine that runs it. The key and the URL come from the environment
(``LOFT_API_KEY``, ``LOFT_BASE_URL``, falling back to ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``) or
from ``--api-key`` / ``--base-url``.

Exit status: 0 done; 1 Loft refused or could not be reached, or a followed job failed or was
cancelled; 2 a usage or configuration mistake; 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
TIMEOUT_SECONDS = 60
CHUNK_BYTES = 1024 * 1024
FINISHED = ("succeeded", "failed", "cancelled")
SHOWN_LINE_ERRORS = 5
# A followed job survives this many failed polls in a row (a restarting server) before giving up.
FOLLOW_RETRIES = 5
# A streamed answer may wait this long for its next event (a first request loads the model; the
# server gives up on a request itself after LOFT_INFERENCE_TIMEOUT_SECONDS).
STREAM_TIMEOUT_SECONDS = 300
# ``aliases promote`` asks again this often while the candidate is being evaluated, this long.
PROMOTE_INTERVAL_SECONDS = 5.0
PROMOTE_TIMEOUT_SECONDS = 3600.0
SHOWN_EVIDENCE_ITEMS = 5


class CLIError(Exception):
    """An expected failure: printed as ``loft: <message>`` (and ``lines``), never a traceback."""

    def __init__(self, message: str, exit_code: int = 1, lines: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.lines = lines or []


class Unreachable(CLIError):
    """No HTTP answer at all: refused, timed out, reset."""


class APIError(CLIError):
    """Loft answered with an error, normally in OpenAI's shape ``{"error": {...}}``."""

    def __init__(
        self, status: int, message: str, *, param=None, code=None, details=None, body=None
    ):
        extra = ", ".join(
            f"{name}: {value}" for name, value in (("param", param), ("code", code)) if value
        )
        # Line errors the message already quotes are not repeated below it.
        lines = [line for line in _detail_lines(details) if line.strip() not in message]
        super().__init__(f"{message} ({extra})" if extra else message, lines=lines)
        self.status = status
        self.param = param
        self.code = code
        self.body = body or {}  # the whole answer: some errors carry more than ``error``


def _detail_lines(details) -> list[str]:
    """The first few per-line errors of a rejected file, whichever shape they come in."""
    if not isinstance(details, dict) or not details.get("errors"):
        return []
    errors = details["errors"]
    lines = []
    for error in errors[:SHOWN_LINE_ERRORS]:
        if isinstance(error, dict):
            where = f"line {error['line']}: " if error.get("line") is not None else ""
            lines.append(f"  {where}{error.get('message', error)}")
        else:
            lines.append(f"  {error}")
    total = details.get("error_count") or len(errors)
    if total > SHOWN_LINE_ERRORS:
        lines.append(f"  … and {total - SHOWN_LINE_ERRORS} more")
    return lines


# --- HTTP ----------------------------------------------------------------------------------


class _KeylessRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects (Loft streams downloads itself, but a proxy in front of it may send a
    client elsewhere) without the API key.

    The key is an unredirected header, which urllib already leaves behind; removing it here too
    keeps that true whatever urllib does, and refuses a redirect to anything but http(s).
    """

    def __init__(self):
        super().__init__()
        self.target: str | None = None  # where the last request was redirected to

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise CLIError(f"Loft redirected to a URL that is not http(s): {newurl}")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.remove_header("Authorization")
            self.target = newurl
        return new


class Client:
    """Loft's API at ``base_url`` with one key; every failure becomes a CLIError."""

    def __init__(self, base_url: str, api_key: str, timeout: float = TIMEOUT_SECONDS):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.redirects = _KeylessRedirects()
        self.opener = urllib.request.build_opener(self.redirects)

    def url(self, path: str, query: dict | None = None) -> str:
        url = f"{self.base_url}/{urllib.parse.quote(path, safe='/:')}"
        query = {name: value for name, value in (query or {}).items() if value is not None}
        return f"{url}?{urllib.parse.urlencode(query)}" if query else url

    def open(self, method: str, path: str, *, query=None, body=None, headers=None, timeout=None):
        """The response, open; the caller reads and closes it."""
        # The scheme of base_url was checked to be http(s) in _client().
        request = urllib.request.Request(  # noqa: S310
            self.url(path, query), data=body, method=method, headers=headers or {}
        )
        request.add_unredirected_header("Authorization", f"Bearer {self.api_key}")
        request.add_header("User-Agent", "loft-cli")
        timeout = timeout or self.timeout
        self.redirects.target = None
        try:
            return self.opener.open(request, timeout=timeout)  # noqa: S310 (see above)
        except urllib.error.HTTPError as error:
            raise self._error_of(error) from None
        except (OSError, http.client.HTTPException) as error:  # URLError is an OSError
            reason = error.reason if isinstance(error, urllib.error.URLError) else error
            if self.redirects.target:
                # A redirect's URL may hold a signature, so only its host is named.
                host = urllib.parse.urlsplit(self.redirects.target).netloc
                raise Unreachable(f"cannot reach the storage at {host}: {reason}") from None
            if isinstance(reason, TimeoutError):
                raise Unreachable(
                    f"Loft at {self.base_url} did not answer within {timeout:g} s"
                ) from None
            raise Unreachable(f"cannot reach Loft at {self.base_url}: {reason}") from None

    def call(self, method: str, path: str, *, query=None, json_body=None, headers=None) -> dict:
        """A JSON request and its JSON answer."""
        body = None
        headers = {"Accept": "application/json", **(headers or {})}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        with self.open(method, path, query=query, body=body, headers=headers) as response:
            return self.json_of(response)

    def json_of(self, response) -> dict:
        raw = self._read(response)
        if not raw.strip():  # 204 No Content, e.g. a deletion
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            raise CLIError(f"Loft answered {response.url} with something not JSON") from None

    def pages(self, path: str, *, limit: int, after: str | None, every: bool, **query) -> dict:
        """A list object; with ``every``, all pages merged into one."""
        page = self.call("GET", path, query={**query, "limit": limit, "after": after})
        merged = dict(page, data=list(page.get("data", [])))
        while every and page.get("has_more") and page.get("data"):
            after = page["data"][-1]["id"]
            page = self.call("GET", path, query={**query, "limit": limit, "after": after})
            merged["data"].extend(page.get("data", []))
            merged["has_more"] = page.get("has_more", False)
        if merged["data"]:
            merged["last_id"] = merged["data"][-1]["id"]
        return merged

    def _read(self, response) -> bytes:
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as error:
            raise Unreachable(f"the connection to Loft at {self.base_url} broke: {error}") from None

    def _error_of(self, error: urllib.error.HTTPError) -> CLIError:
        try:
            raw = error.read(64 * 1024)
        except OSError:
            raw = b""
        if self.redirects.target:
            host = urllib.parse.urlsplit(self.redirects.target).netloc
            return CLIError(f"the storage at {host} answered HTTP {error.code} {error.reason}")
        try:
            body = json.loads(raw)
            info = body["error"]
            message = str(info["message"])
        except (ValueError, KeyError, TypeError):
            return APIError(error.code, f"Loft answered HTTP {error.code} {error.reason}")
        return APIError(
            error.code,
            message,
            param=info.get("param"),
            code=info.get("code"),
            details=body.get("details"),
            body=body,
        )


class MultipartBody:
    """A multipart/form-data body whose file part is read from disk while it is sent.

    http.client sends an iterable chunk by chunk; the length is known up front, so the request
    carries a Content-Length (the server refuses an oversized upload before reading it).
    """

    def __init__(self, fields: dict[str, str], file_field: str, path: Path):
        self.boundary = f"loft-{uuid.uuid4().hex}"
        self.path = path
        parts = [
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
            for name, value in fields.items()
        ]
        filename = path.name.replace('"', "%22").replace("\r", "").replace("\n", "")
        parts.append(
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        self.head = b"".join(parts)
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.file_bytes = path.stat().st_size
        self.length = len(self.head) + self.file_bytes + len(self.tail)

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        with self.path.open("rb") as file:
            while chunk := file.read(CHUNK_BYTES):
                yield chunk
        yield self.tail


# --- output --------------------------------------------------------------------------------


def _print_json(value) -> None:
    print(json.dumps(value, indent=2))


def _when(timestamp) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def _size(count) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _number(value) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _value(name: str, value) -> str:
    """A field for people: sizes, durations and times readable, structures compact."""
    if value is None or value == "" or value == {} or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if name.endswith("bytes") and isinstance(value, int | float):
        return _size(value)
    if name.endswith("seconds") and isinstance(value, int | float):
        return _duration(value)
    if name.endswith(("_at", "_finish")) and isinstance(value, int | float):
        return _when(value)
    if isinstance(value, dict):
        return ", ".join(f"{key}={_value(key, inner)}" for key, inner in value.items())
    if isinstance(value, list):
        return ", ".join(_value(name, inner) for inner in value)
    return _number(value)


def _table(rows: list[dict], columns: list[tuple[str, Callable[[dict], str]]], empty: str) -> None:
    if not rows:
        print(empty)
        return
    cells = [[str(cell(row)) for _, cell in columns] for row in rows]
    headers = [header for header, _ in columns]
    widths = [max(len(text) for text in column) for column in zip(headers, *cells, strict=True)]
    for line in [headers, *cells]:
        print(
            "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        )


def _fields(obj: dict, names: list[str]) -> None:
    width = max(len(name) for name in names)
    for name in names:
        if name in obj:
            print(f"{name.ljust(width)}  {_value(name, obj[name])}")


def _more_note(listing: dict, command: str) -> None:
    if listing.get("has_more") and listing.get("last_id"):
        print(f"(more: {command} --after {listing['last_id']}, or --all)", file=sys.stderr)


def _list_command(client: Client, args, path: str, columns, empty: str, command: str, **query):
    """What every ``… list`` does: a page (or all pages), as a table or as JSON."""
    listing = client.pages(path, limit=args.limit, after=args.after, every=args.all, **query)
    if args.json:
        _print_json(listing)
        return 0
    _table(listing["data"], columns, empty)
    _more_note(listing, command)
    return 0


def progress_text(job: dict) -> str:
    """``[#####.....] step 3/10  loss 1.234  12.3 tok/s  ETA 0:01:05``, or the bare status."""
    progress = job.get("progress") or {}
    step, total = progress.get("step"), progress.get("total_steps")
    if step is None:
        return f"{job.get('status', '?')}…"
    width = 20
    filled = min(width, int(width * step / total)) if total else 0
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{total or '?'}"]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.3f}")
    if progress.get("tokens_per_second") is not None:
        parts.append(f"{progress['tokens_per_second']:.1f} tok/s")
    if progress.get("eta_seconds") is not None:
        parts.append(f"ETA {_duration(progress['eta_seconds'])}")
    return "  ".join(parts)


class StatusLine:
    """A line redrawn in place with ``\\r`` on a terminal; elsewhere, a new line per change."""

    def __init__(self, stream):
        self.stream = stream
        self.tty = stream.isatty()
        self.shown = ""
        self.last = None

    def update(self, text: str) -> None:
        if not self.tty:
            if text != self.last:
                self._write(text + "\n")
                self.last = text
            return
        text = text[: max(10, shutil.get_terminal_size().columns - 1)]
        self._write("\r" + text.ljust(len(self.shown)))
        self.shown = text

    def line(self, text: str) -> None:
        """A lasting line above the status line."""
        if self.tty and self.shown:
            self._write("\r" + " " * len(self.shown) + "\r" + text + "\n" + self.shown)
        else:
            self._write(text + "\n")

    def close(self) -> None:
        if self.tty and self.shown:
            self._write("\n")
        self.shown = ""

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _event_text(event: dict) -> str:
    when = datetime.fromtimestamp(event["created_at"]).strftime("%H:%M:%S")
    level = event.get("level", "info")
    return f"{when}  {'' if level == 'info' else level + ': '}{event.get('message', '')}"


# --- files ---------------------------------------------------------------------------------

FILE_COLUMNS = [
    ("ID", lambda f: f["id"]),
    ("FILENAME", lambda f: f.get("filename", "")),
    ("PURPOSE", lambda f: f.get("purpose", "")),
    ("STATUS", lambda f: f.get("status", "")),
    ("FORMAT", lambda f: f.get("format") or "-"),
    ("ROWS", lambda f: _number(f.get("rows"))),
    ("TOKENS", lambda f: _number(f.get("tokens"))),
    ("SIZE", lambda f: _size(f.get("bytes"))),
    ("CREATED", lambda f: _when(f.get("created_at"))),
]


def upload_file(client: Client, path: str, purpose: str, fmt: str | None, model: str | None):
    source = Path(path)
    if not source.is_file():
        raise CLIError(f"no such file: {path}")
    fields = {"purpose": purpose}
    if fmt:
        fields["format"] = fmt
    if model:
        fields["model"] = model
    body = MultipartBody(fields, "file", source)
    headers = {
        "Content-Type": body.content_type,
        "Content-Length": str(body.length),
        "Accept": "application/json",
    }
    if sys.stderr.isatty():
        print(f"uploading {source.name} ({_size(body.file_bytes)})…", file=sys.stderr)
    # Validating a small file happens before the answer: allow the server time for it.
    with client.open("POST", "files", body=body, headers=headers, timeout=600) as response:
        return client.json_of(response)


def _print_upload(file: dict) -> None:
    print(f"Uploaded {file.get('filename')} as {file['id']} ({file.get('status')}).")
    if file.get("status") == "processed":
        print(
            f"{_number(file.get('rows'))} rows, {_number(file.get('tokens'))} tokens, "
            f"format {file.get('format') or '-'}."
        )
        report = file.get("validation") or {}
        if report.get("error_count"):
            print(f"{report['error_count']} rows have errors and will be skipped:")
            for line in _detail_lines(report):
                print(line)
        if report.get("duplicate_rows"):
            print(f"{report['duplicate_rows']} rows are duplicates of earlier rows.")
        if report.get("rows_over_context"):
            print(f"{report['rows_over_context']} rows are longer than the model's context.")
    elif file.get("status") == "uploaded":
        print(f"Loft validates it in the background; see `loft files get {file['id']}`.")
    elif file.get("status_details"):
        print(file["status_details"])


def cmd_files_upload(client: Client, args) -> int:
    file = upload_file(client, args.path, args.purpose, args.format, args.model)
    _print_json(file) if args.json else _print_upload(file)
    return 0


def cmd_files_list(client: Client, args) -> int:
    return _list_command(
        client, args, "files", FILE_COLUMNS, "No files.", "loft files list", purpose=args.purpose
    )


def cmd_files_get(client: Client, args) -> int:
    file = client.call("GET", f"files/{args.id}")
    if args.json:
        _print_json(file)
        return 0
    _fields(
        file,
        ["id", "filename", "purpose", "status", "status_details", "format", "file_type"]
        + ["rows", "tokens", "bytes", "sha256", "created_at"],
    )
    for line in _detail_lines(file.get("validation")):
        print(line)
    return 0


# --- jobs ----------------------------------------------------------------------------------

JOB_COLUMNS = [
    ("ID", lambda j: j["id"]),
    ("STATUS", lambda j: j.get("status", "")),
    ("MODEL", lambda j: j.get("model") or "-"),
    ("FINE-TUNED MODEL", lambda j: j.get("fine_tuned_model") or "-"),
    ("PROGRESS", lambda j: _step_of(j)),
    ("CREATED", lambda j: _when(j.get("created_at"))),
]

# OpenAI's hyperparameters have flags of their own (beta is DPO's); every other one (Loft's LoRA
# rank, quantization, sequence length, ...) is ``--hyperparameter NAME=VALUE``. The server knows
# the names, types and ranges, and which method each belongs to, and refuses a wrong one by name;
# the client knows none of them.
HYPERPARAMETER_FLAGS = ("n_epochs", "batch_size", "learning_rate_multiplier", "beta")
# OpenAI's method.type: supervised (learn the answers) or dpo (learn, from a preference file's
# pairs, to prefer the preferred answer over the other).
METHOD_TYPES = ("supervised", "dpo")


def _refuse_constant(name: str):
    raise ValueError(f"not a JSON value: {name}")  # NaN and Infinity stay text


def json_or_text(text: str):
    """A value as JSON when it parses (``8``, ``0.1``, ``false``, ``null``, ``"auto"``), else the
    text as given (``auto``, ``nf4``, an adapter id)."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError:
        return text


def hyperparameter(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` from the command line: the name, and the value read by ``json_or_text``."""
    name, equals, value = text.partition("=")
    name = name.strip()
    if not equals or not name or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. lora_rank=8, not {text!r}")
    return name, json_or_text(value)


def _hyperparameters(args) -> dict:
    """The flags' values and the ``--hyperparameter`` pairs as one object; a name given twice
    with two different values is a usage mistake, not a guess."""
    given = {
        name: getattr(args, name)
        for name in HYPERPARAMETER_FLAGS
        if getattr(args, name) is not None
    }
    for name, value in args.hyperparameters or []:
        if name in given and given[name] != value:
            raise CLIError(
                f"hyperparameter {name} is given twice:"
                f" {json.dumps(given[name])} and {json.dumps(value)}",
                exit_code=2,
            )
        given[name] = value
    return given


def _step_of(job: dict) -> str:
    progress = job.get("progress") or {}
    if progress.get("step") is None:
        return "-"
    return f"{progress['step']}/{progress.get('total_steps') or '?'}"


def _file_id(client: Client, value: str | None, args) -> str | None:
    """A file id as given, or a local path uploaded first."""
    if value is None or not Path(value).is_file():
        return value
    # Tokens are counted with the base model's tokenizer; a fine-tuned name is not one.
    model = None if args.model.startswith("ft:") else args.model
    file = upload_file(client, value, "fine-tune", None, model)
    print(f"Uploaded {value} as {file['id']} ({file.get('status')}).", file=sys.stderr)
    return file["id"]


def _print_job(job: dict) -> None:
    _fields(
        job,
        ["id", "status", "model", "fine_tuned_model", "adapter", "training_file"]
        + ["validation_file", "suffix", "seed", "created_at", "finished_at", "estimated_finish"]
        + ["trained_tokens"],
    )
    width = len("fine_tuned_model")
    if (job.get("method") or {}).get("type"):
        print(f"{'method'.ljust(width)}  {job['method']['type']}")
    if job.get("status") in ("running", *FINISHED) and (job.get("progress") or {}):
        print(f"{'progress'.ljust(width)}  {progress_text(job)}")
    if job.get("error"):
        error = job["error"]
        print(f"{'error'.ljust(width)}  {error.get('message')} ({error.get('code')})")
    for name in ("hyperparameters", "metrics"):
        if job.get(name):
            print(f"{name.ljust(width)}  {_value(name, job[name])}")
    if job.get("plan"):
        print(f"{'plan'.ljust(width)}  {_plan_summary(job['plan'])}")


def _plan_summary(plan: dict) -> str:
    """``6 steps, about 0:00:31, peak 825.0 MiB of 12.0 GiB on a cpu worker``."""
    parts = []
    if plan.get("steps") is not None:
        parts.append(f"{_number(plan['steps'])} steps")
    if plan.get("estimated_seconds") is not None:
        parts.append(f"about {_duration(plan['estimated_seconds'])}")
    if plan.get("estimated_peak_memory_bytes") is not None:
        peak = f"peak {_size(plan['estimated_peak_memory_bytes'])}"
        if plan.get("worker_memory_bytes"):
            peak += f" of {_size(plan['worker_memory_bytes'])}"
        if plan.get("worker_class"):
            peak += f" on a {plan['worker_class']} worker"
        parts.append(peak)
    return ", ".join(parts) or "-"


def _print_plan(plan: dict) -> None:
    print("The job fits." if plan.get("fits", True) else "The job does NOT fit.")
    shown = {name: value for name, value in plan.items() if value is not None}
    breakdown = shown.pop("memory_breakdown", None) or {}
    _fields(shown, [name for name in shown if name not in ("object", "fits")])
    if breakdown:
        parts = ", ".join(f"{part} {_size(size)}" for part, size in breakdown.items())
        print(f"{'memory_breakdown'.ljust(max(map(len, shown)))}  {parts}")


def cmd_jobs_create(client: Client, args) -> int:
    hyperparameters = _hyperparameters(args)  # before uploading anything
    body: dict = {"model": args.model, "training_file": _file_id(client, args.training_file, args)}
    if args.validation_file:
        body["validation_file"] = _file_id(client, args.validation_file, args)
    if args.suffix is not None:
        body["suffix"] = args.suffix
    if args.seed is not None:
        body["seed"] = args.seed
    if args.method:  # OpenAI's method object, which carries the hyperparameters
        body["method"] = {"type": args.method, args.method: {"hyperparameters": hyperparameters}}
    elif hyperparameters:
        body["hyperparameters"] = hyperparameters
    if args.dry_run:
        body["dry_run"] = True
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    result = client.call("POST", "fine_tuning/jobs", json_body=body, headers=headers)

    if args.dry_run:
        _print_json(result) if args.json else _print_plan(result)
        return 0 if result.get("fits", True) else 1
    if args.follow:
        if not args.json:
            print(f"Created {result['id']} ({result.get('status')}).")
        return follow(client, result["id"], args.interval, as_json=args.json)
    if args.json:
        _print_json(result)
    else:
        print(f"Created {result['id']} ({result.get('status')}).")
        print(f"Follow it with: loft jobs follow {result['id']}")
    return 0


def cmd_jobs_list(client: Client, args) -> int:
    return _list_command(
        client, args, "fine_tuning/jobs", JOB_COLUMNS, "No fine-tuning jobs.", "loft jobs list"
    )


def cmd_jobs_get(client: Client, args) -> int:
    job = client.call("GET", f"fine_tuning/jobs/{args.id}")
    _print_json(job) if args.json else _print_job(job)
    return 0


def cmd_jobs_cancel(client: Client, args) -> int:
    job = client.call("POST", f"fine_tuning/jobs/{args.id}/cancel")
    if args.json:
        _print_json(job)
    elif job.get("status") == "cancelled":
        print(f"Cancelled {job['id']}.")
    else:
        print(f"Cancel requested for {job['id']} ({job.get('status')}); it stops at its next step.")
    return 0


def cmd_jobs_events(client: Client, args) -> int:
    listing = client.pages(
        f"fine_tuning/jobs/{args.id}/events", limit=args.limit, after=args.after, every=args.all
    )
    if args.json:
        _print_json(listing)
        return 0
    if not listing["data"]:
        print("No events.")
    for event in reversed(listing["data"]):
        print(_event_text(event))
    _more_note(listing, f"loft jobs events {args.id}")
    return 0


def cmd_jobs_checkpoints(client: Client, args) -> int:
    listing = client.pages(
        f"fine_tuning/jobs/{args.id}/checkpoints",
        limit=args.limit,
        after=args.after,
        every=args.all,
    )
    if args.json:
        _print_json(listing)
        return 0
    columns = [
        ("ID", lambda c: c["id"]),
        ("STEP", lambda c: _number(c.get("step_number", c.get("step")))),
        ("METRICS", lambda c: _value("metrics", c.get("metrics"))),
        ("CREATED", lambda c: _when(c.get("created_at"))),
    ]
    _table(listing["data"], columns, "No checkpoints.")
    return 0


def _new_events(client: Client, job_id: str, seen: set, first: bool) -> list[dict]:
    """Events not printed yet, oldest first. The API lists newest first, so page back until
    a known one; on the first look, one page of history is enough."""
    fresh: list[dict] = []
    after = None
    while True:
        page = client.call(
            "GET", f"fine_tuning/jobs/{job_id}/events", query={"limit": 100, "after": after}
        )
        data = page.get("data", [])
        new = [event for event in data if event["id"] not in seen]
        fresh.extend(new)
        if first or len(new) < len(data) or not data or not page.get("has_more"):
            break
        after = data[-1]["id"]
    seen.update(event["id"] for event in fresh)
    return fresh[::-1]


def pause(seconds: float) -> None:
    """The wait between polls (Ctrl-C arrives here, most of the time)."""
    time.sleep(seconds)


def follow(client: Client, job_id: str, interval: float, as_json: bool = False) -> int:
    """Print the job's events and progress until it ends; the exit status says how it ended."""
    seen: set = set()
    status = StatusLine(sys.stdout)
    first, failures = True, 0
    try:
        while True:
            try:
                job = client.call("GET", f"fine_tuning/jobs/{job_id}")
                events = _new_events(client, job_id, seen, first)
                failures = 0
            except (Unreachable, APIError) as error:
                if isinstance(error, APIError) and error.status < 500:
                    raise
                failures += 1
                if failures > FOLLOW_RETRIES:
                    raise
                status.line(f"({error.message}; trying again)")
                pause(interval)
                continue
            first = False
            for event in events:
                status.line(json.dumps(event) if as_json else _event_text(event))
            if job.get("status") in FINISHED:
                status.close()
                return _ended(job, as_json)
            if not as_json:
                status.update(progress_text(job))
            pause(interval)
    except KeyboardInterrupt:
        status.close()
        print(
            f"Stopped following {job_id}; the job goes on. To stop it: loft jobs cancel {job_id}",
            file=sys.stderr,
        )
        return 130


def _ended(job: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(job))
    if job["status"] == "succeeded":
        if not as_json:
            print(f"{job['id']} succeeded: {job.get('fine_tuned_model')}")
        return 0
    if job["status"] == "failed":
        error = job.get("error") or {}
        print(
            f"loft: {job['id']} failed: {error.get('message') or 'no reason given'}",
            file=sys.stderr,
        )
        return 1
    print(f"loft: {job['id']} was cancelled.", file=sys.stderr)
    return 1


# --- adapters ------------------------------------------------------------------------------

ADAPTER_COLUMNS = [
    ("ID", lambda a: a["id"]),
    ("NAME", lambda a: a.get("name", "")),
    ("BASE MODEL", lambda a: a.get("base_model") or "-"),
    ("JOB", lambda a: a.get("job") or "-"),
    ("SIZE", lambda a: _size(a.get("size_bytes"))),
    ("CREATED", lambda a: _when(a.get("created_at"))),
]


def cmd_adapters_list(client: Client, args) -> int:
    return _list_command(
        client, args, "adapters", ADAPTER_COLUMNS, "No adapters.", "loft adapters list"
    )


def cmd_adapters_get(client: Client, args) -> int:
    adapter = client.call("GET", f"adapters/{args.id}")
    if args.json:
        _print_json(adapter)
    else:
        _fields(
            adapter,
            ["id", "name", "base_model", "job", "parent", "size_bytes", "created_at", "metrics"],
        )
    return 0


def _check_against_manifest(archive: zipfile.ZipFile) -> int:
    """Compare every member with the sha256 its manifest.json records; the number checked."""
    names = set(archive.namelist())
    manifests = sorted((n for n in names if n.rsplit("/", 1)[-1] == "manifest.json"), key=len)
    if not manifests:
        return 0
    root = manifests[0][: -len("manifest.json")]
    listed = json.loads(archive.read(manifests[0])).get("files", {})
    for name, expected in listed.items():
        member = root + name
        if member not in names:
            raise CLIError(f"the download lacks {name}, which its manifest lists")
        digest = hashlib.sha256()
        with archive.open(member) as data:
            while chunk := data.read(CHUNK_BYTES):
                digest.update(chunk)
        if isinstance(expected, dict) and expected.get("sha256") not in (None, digest.hexdigest()):
            raise CLIError(f"{name} in the download does not match its manifest")
    return len(listed)


def cmd_adapters_download(client: Client, args) -> int:
    target = Path(args.output or f"{args.id}.zip")
    partial = target.with_name(target.name + ".part")
    received = 0
    with client.open("GET", f"adapters/{args.id}/download") as response:
        try:
            with partial.open("wb") as out:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    received += len(chunk)
        except (OSError, http.client.HTTPException) as error:
            partial.unlink(missing_ok=True)
            raise CLIError(f"the download broke off after {_size(received)}: {error}") from None
    if not zipfile.is_zipfile(partial):
        partial.unlink()
        raise CLIError(f"the download of {args.id} is incomplete or not a zip archive")
    partial.replace(target)
    with zipfile.ZipFile(target) as archive:
        broken = archive.testzip()
        if broken is not None:
            raise CLIError(f"{broken} in {target} is corrupt; download it again")
        checked = _check_against_manifest(archive)
        if args.extract:
            archive.extractall(args.extract)  # zipfile drops ".." and absolute paths
    result = {"id": args.id, "path": str(target), "bytes": received, "verified_files": checked}
    if args.extract:
        result["extracted_to"] = str(args.extract)
    if args.json:
        _print_json(result)
        return 0
    print(f"Saved {target} ({_size(received)}).")
    if checked:
        print(f"All {checked} files match manifest.json.")
    if args.extract:
        print(f"Extracted to {args.extract}.")
    return 0


# --- chat ----------------------------------------------------------------------------------


def _prompt_of(args) -> str:
    """The message: the argument, else standard input (a pipe, or typed up to Ctrl-D)."""
    if args.prompt is not None:
        prompt = args.prompt
    else:
        if sys.stdin.isatty():
            print("Type the message, then Ctrl-D.", file=sys.stderr)
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise CLIError("no message: give it as an argument or on standard input.", exit_code=2)
    return prompt


def chat_request(args, prompt: str) -> dict:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    body: dict = {
        "model": args.model,
        "messages": [*messages, {"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for name in ("max_tokens", "temperature", "seed"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    return body


def sse_events(client: Client, response) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream, up to ``data: [DONE]``; an error event
    (``{"error": {...}}``, OpenAI's shape) becomes an APIError."""
    while True:
        try:
            line = response.readline()
        except (OSError, http.client.HTTPException) as error:
            raise Unreachable(
                f"the answer from Loft at {client.base_url} broke off: {error}"
            ) from None
        if not line:
            return  # the server closed the stream without [DONE]: what came is all there is
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        if not text.startswith("data:"):
            continue  # blank separators, comments (keep-alives), event names
        data = text[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise CLIError("Loft sent an event that is not JSON in the answer's stream") from None
        if isinstance(event, dict) and isinstance(event.get("error"), dict):
            info = event["error"]
            raise APIError(
                response.status,
                str(info.get("message") or "the answer failed"),
                param=info.get("param"),
                code=info.get("code"),
            )
        yield event


def _usage_text(usage: dict | None, finish_reason: str | None, seconds: float) -> str:
    parts = []
    if usage:
        parts.append(
            f"{_number(usage.get('prompt_tokens'))} prompt + "
            f"{_number(usage.get('completion_tokens'))} completion tokens"
        )
    if finish_reason:
        parts.append(f"finish_reason {finish_reason}")
    parts.append(f"{seconds:.1f} s")
    return "usage: " + ", ".join(parts)


def cmd_chat(client: Client, args) -> int:
    body = chat_request(args, _prompt_of(args))
    started = time.monotonic()
    usage, finish_reason, ends_with_newline = None, None, True
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    with client.open(
        "POST",
        "chat/completions",
        body=json.dumps(body).encode(),
        headers=headers,
        timeout=STREAM_TIMEOUT_SECONDS,
    ) as response:
        try:
            for event in sse_events(client, response):
                if args.json:
                    print(json.dumps(event), flush=True)
                for choice in event.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content and not args.json:
                        sys.stdout.write(content)
                        sys.stdout.flush()
                        ends_with_newline = content.endswith("\n")
                    finish_reason = choice.get("finish_reason") or finish_reason
                usage = event.get("usage") or usage
        finally:
            if not ends_with_newline:
                print(flush=True)  # an error or Ctrl-C starts on a line of its own
    print(_usage_text(usage, finish_reason, time.monotonic() - started), file=sys.stderr)
    return 0


# --- aliases -------------------------------------------------------------------------------

ALIAS_COLUMNS = [
    ("NAME", lambda a: a.get("name", "")),
    ("ADAPTER", lambda a: _adapter_id(a.get("adapter")) or "-"),
    ("EVAL FILES", lambda a: ", ".join(a.get("eval_files") or []) or "-"),
    ("UPDATED", lambda a: _when(a.get("updated_at") or a.get("created_at"))),
]
MOVE_COLUMNS = [
    ("WHEN", lambda m: _when(m.get("created_at"))),
    ("KIND", lambda m: m.get("kind", "")),
    ("FROM", lambda m: m.get("from_adapter") or "-"),
    ("TO", lambda m: m.get("to_adapter") or "-"),
    ("BY", lambda m: m.get("actor") or "-"),
]


def _adapter_id(value) -> str | None:
    """An alias's adapter, whether the API gives its id or the adapter object."""
    return value.get("id") if isinstance(value, dict) else value


def _alias_path(name: str, action: str = "") -> str:
    path = f"aliases/{urllib.parse.quote(name, safe='')}"
    return f"{path}/{action}" if action else path


def cmd_aliases_list(client: Client, args) -> int:
    listing = client.call("GET", "aliases")
    if args.json:
        _print_json(listing)
    else:
        _table(listing.get("data", []), ALIAS_COLUMNS, "No aliases.")
    return 0


def cmd_aliases_create(client: Client, args) -> int:
    eval_files = []
    for value in args.eval_files:
        if Path(value).is_file():  # a local file: uploaded first, as an eval set
            file = upload_file(client, value, "eval", None, None)
            print(f"Uploaded {value} as {file['id']} ({file.get('status')}).", file=sys.stderr)
            value = file["id"]
        eval_files.append(value)
    alias = client.call(
        "POST",
        "aliases",
        json_body={"name": args.name, "adapter": args.adapter, "eval_files": eval_files},
    )
    if args.json:
        _print_json(alias)
    else:
        print(
            f"Created alias {alias.get('name', args.name)} → {_adapter_id(alias.get('adapter'))}."
        )
    return 0


def cmd_aliases_delete(client: Client, args) -> int:
    client.call("DELETE", _alias_path(args.name))
    if args.json:
        _print_json({"name": args.name, "deleted": True})
    else:
        print(f"Deleted alias {args.name}.")
    return 0


def cmd_aliases_rollback(client: Client, args) -> int:
    alias = client.call("POST", _alias_path(args.name, "rollback"))
    if args.json:
        _print_json(alias)
    else:
        print(f"Rolled {args.name} back to {_adapter_id(alias.get('adapter'))}.")
    return 0


def cmd_aliases_moves(client: Client, args) -> int:
    listing = client.call("GET", _alias_path(args.name, "moves"))
    if args.json:
        _print_json(listing)
    else:
        _table(listing.get("data", []), MOVE_COLUMNS, "No moves.")
    return 0


def _compact(value) -> str:
    """An evidence value on one line: numbers to 4 significant digits, structures flattened."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {_compact(inner)}" for key, inner in value.items())
    if isinstance(value, list):
        if len(value) == 2 and all(isinstance(v, int | float) for v in value):
            return f"[{_compact(value[0])}, {_compact(value[1])}]"  # an interval
        return "; ".join(_compact(inner) for inner in value)
    return "-" if value is None else str(value)


def _file_evidence(entry: dict) -> str:
    """``eval.jsonl: rouge_l 0.42 → 0.38, gain -0.04, 95% interval [-0.08, 0.01], 50 rows``."""
    if entry.get("current") is None:
        return f"{entry.get('file', '?')}: no rows scored"
    text = (
        f"{entry.get('file', '?')}: {entry.get('metric', 'score')} "
        f"{_compact(entry['current'])} → {_compact(entry.get('candidate'))}, "
        f"gain {_compact(entry.get('gain'))}"
    )
    if entry.get("interval"):
        text += f", 95% interval {_compact(entry['interval'])}"
    if entry.get("rows") is not None:
        text += f", {entry['rows']} rows"
    if entry.get("dropped"):
        text += " (drops more than allowed)"
    return text


def evidence_lines(evidence, message: str = "") -> list[str]:
    """The gate's evidence in a few lines: the reasons the message does not already give, each
    eval file's means, gain and interval, the forgetting probes; any other part compactly."""
    if not isinstance(evidence, dict):
        return [f"  {_compact(evidence)}"] if evidence else []
    lines = [f"  {reason}" for reason in evidence.get("reasons") or [] if reason not in message]
    for entry in (evidence.get("files") or [])[:SHOWN_EVIDENCE_ITEMS]:
        lines.append(f"  {_file_evidence(entry) if isinstance(entry, dict) else entry}")
    probes = evidence.get("probes")
    if isinstance(probes, dict) and probes.get("count"):
        lines.append(
            f"  probes: the current adapter answers {probes.get('current_answered', 0):.0%}, "
            f"the candidate {probes.get('candidate_answered', 0):.0%}; "
            f"{probes.get('lost', 0)} of {probes['count']} lost"
        )
    known = ("passed", "reasons", "files", "probes", "limits")
    for key, value in evidence.items():
        if key not in known and value not in (None, "", [], {}):
            lines.append(f"  {key}: {_compact(value)}")
    return lines


def cmd_aliases_promote(client: Client, args) -> int:
    """Ask to move the alias; while the candidate is being evaluated (202), ask again every few
    seconds, unless --no-wait. Moved: 0. Refused by the gate: 1, with its evidence."""
    body = {"adapter": args.adapter, "force": args.force}
    deadline = time.monotonic() + args.timeout
    status = StatusLine(sys.stderr)
    try:
        while True:
            try:
                answer = client.call("POST", _alias_path(args.name, "promote"), json_body=body)
            except APIError as error:
                status.close()
                if error.code != "promotion_refused":
                    raise
                if args.json:
                    _print_json(error.body)
                evidence = evidence_lines(error.body.get("evidence"), error.message)
                raise CLIError(error.message, lines=evidence) from None
            if answer.get("status") != "evaluating":
                break
            if args.no_wait:
                break
            if time.monotonic() > deadline:
                status.close()
                raise CLIError(
                    f"the promotion of {args.adapter} is still being evaluated after "
                    f"{args.timeout:g} s; ask again later: "
                    f"loft aliases promote {args.name} {args.adapter}"
                )
            status.update(answer.get("message") or f"evaluating {args.adapter}…")
            pause(args.interval)
    except KeyboardInterrupt:
        status.close()
        print(
            f"Stopped waiting; the evaluation goes on. Ask again with: "
            f"loft aliases promote {args.name} {args.adapter}",
            file=sys.stderr,
        )
        return 130
    status.close()
    if args.json:
        _print_json(answer)
    elif answer.get("status") == "evaluating":  # --no-wait
        print(answer.get("message") or f"{args.adapter} is being evaluated.")
        print(f"Ask again later: loft aliases promote {args.name} {args.adapter}")
    else:
        print(f"Moved {args.name} to {_adapter_id(answer.get('adapter')) or args.adapter}.")
    return 0


# --- the command line -----------------------------------------------------------------------


def _options(suppress: bool) -> argparse.ArgumentParser:
    """The global options, accepted before and after the subcommand."""
    parser = argparse.ArgumentParser(add_help=False)
    default = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument(
        "--api-key", help="API key (default: $LOFT_API_KEY, else $OPENAI_API_KEY)", **default
    )
    parser.add_argument(
        "--base-url",
        help=f"API root (default: $LOFT_BASE_URL, else $OPENAI_BASE_URL, else {DEFAULT_BASE_URL})",
        **default,
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON objects", **default)
    return parser


def _listing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=20, help="objects per page (max 100)")
    parser.add_argument("--after", help="the page after this id (older objects)")
    parser.add_argument("--all", action="store_true", help="every page")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loft",
        description="Loft's command-line client: datasets, fine-tuning jobs, adapters, aliases "
        "and chat.",
        parents=[_options(suppress=False)],
    )
    common = _options(suppress=True)
    groups = parser.add_subparsers(dest="group", metavar="{files,jobs,adapters,aliases,chat}")

    def command(sub, name: str, handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(handler=handler)
        return p

    files = groups.add_parser("files", help="upload and list datasets").add_subparsers(
        dest="command", required=True
    )
    upload = command(files, "upload", cmd_files_upload, "upload a JSONL or CSV dataset")
    upload.add_argument("path")
    upload.add_argument("--purpose", choices=["fine-tune", "eval"], default="fine-tune")
    upload.add_argument("--format", help="the dataset's format, when Loft should not detect it")
    upload.add_argument("--model", help="base model whose tokenizer counts the tokens")
    listing = command(files, "list", cmd_files_list, "list uploaded files, newest first")
    listing.add_argument("--purpose", choices=["fine-tune", "eval"])
    _listing_options(listing)
    command(files, "get", cmd_files_get, "one file and its validation report").add_argument("id")

    jobs = groups.add_parser("jobs", help="create, watch and cancel fine-tuning jobs")
    jobs_sub = jobs.add_subparsers(dest="command", required=True)
    create = command(jobs_sub, "create", cmd_jobs_create, "create a fine-tuning job")
    create.epilog = (
        "Example: loft jobs create --model HuggingFaceTB/SmolLM2-135M-Instruct"
        " --training-file train.jsonl --n-epochs 3 --hyperparameter lora_rank=8"
        " -H quantization=nf4 --dry-run. DPO on a preference file:"
        " loft jobs create --model ft:... --training-file pairs.jsonl --method dpo --beta auto"
    )
    create.add_argument(
        "--model", required=True, help="a base model, or a fine-tuned model to continue training"
    )
    create.add_argument(
        "--training-file", required=True, help="a file id, or a local path to upload first"
    )
    create.add_argument("--validation-file", help="a file id, or a local path to upload first")
    create.add_argument("--suffix", help="added to the fine-tuned model's name")
    create.add_argument("--seed", type=int)
    create.add_argument("--n-epochs", type=json_or_text, metavar="N", help='an integer or "auto"')
    create.add_argument("--batch-size", type=json_or_text, metavar="N", help='an integer or "auto"')
    create.add_argument(
        "--learning-rate-multiplier",
        type=json_or_text,
        metavar="X",
        help='a number or "auto"; 1.0 is the default learning rate',
    )
    create.add_argument(
        "--method",
        choices=METHOD_TYPES,
        help="supervised (learn the answers; the default) or dpo (learn from a preference file's"
        " pairs to prefer the preferred answer), sent as OpenAI's method object",
    )
    create.add_argument(
        "--beta",
        type=json_or_text,
        metavar="X",
        help='DPO only: a number or "auto" (0.1); how close the adapter stays to its reference',
    )
    create.add_argument(
        "-H",
        "--hyperparameter",
        dest="hyperparameters",
        type=hyperparameter,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other hyperparameter, repeatable: --hyperparameter lora_rank=8 -H packing=false."
        " VALUE is read as JSON when it parses (8, 0.1, false), else as text (auto, nf4)."
        " Loft checks names and values and names the one it refuses;"
        " -H parent_adapter=ID continues training an adapter",
    )
    create.add_argument(
        "--dry-run",
        action="store_true",
        help="only check the job and estimate it (exit 1 when it would not fit)",
    )
    create.add_argument("--idempotency-key", help="a retried create with the same key is one job")
    create.add_argument("--follow", action="store_true", help="then follow it until it ends")
    create.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    _listing = command(jobs_sub, "list", cmd_jobs_list, "list fine-tuning jobs, newest first")
    _listing_options(_listing)
    command(jobs_sub, "get", cmd_jobs_get, "one job: status, progress, error").add_argument("id")
    command(jobs_sub, "cancel", cmd_jobs_cancel, "cancel a job").add_argument("id")
    follow_parser = command(
        jobs_sub, "follow", cmd_jobs_follow, "show a job's events and progress until it ends"
    )
    follow_parser.add_argument("id")
    follow_parser.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    events = command(jobs_sub, "events", cmd_jobs_events, "a job's events, oldest first")
    events.add_argument("id")
    _listing_options(events)
    checkpoints = command(jobs_sub, "checkpoints", cmd_jobs_checkpoints, "a job's checkpoints")
    checkpoints.add_argument("id")
    _listing_options(checkpoints)

    adapters = groups.add_parser("adapters", help="list and download trained adapters")
    adapters_sub = adapters.add_subparsers(dest="command", required=True)
    _listing = command(adapters_sub, "list", cmd_adapters_list, "list adapters, newest first")
    _listing_options(_listing)
    command(adapters_sub, "get", cmd_adapters_get, "one adapter").add_argument("id")
    download = command(
        adapters_sub, "download", cmd_adapters_download, "download an adapter as a zip"
    )
    download.add_argument("id")
    download.add_argument("-o", "--output", help="the zip's path (default: <id>.zip)")
    download.add_argument("--extract", metavar="DIR", help="also unzip it into DIR")

    aliases = groups.add_parser("aliases", help="name adapters, promote and roll back")
    aliases_sub = aliases.add_subparsers(dest="command", required=True)
    command(aliases_sub, "list", cmd_aliases_list, "list the organization's aliases")
    alias_create = command(
        aliases_sub, "create", cmd_aliases_create, "name an adapter; requests use the name"
    )
    alias_create.add_argument("name")
    alias_create.add_argument("adapter", help="an adapter id or fine-tuned model name")
    alias_create.add_argument(
        "--eval-file",
        dest="eval_files",
        action="append",
        default=[],
        metavar="FILE",
        help="an eval file id, or a local path to upload first, on which every promotion is "
        "measured; repeatable (one per task the alias serves)",
    )
    promote = command(
        aliases_sub,
        "promote",
        cmd_aliases_promote,
        "move an alias to another adapter, if it does no worse on the alias's eval files",
    )
    promote.add_argument("name")
    promote.add_argument("adapter", help="the candidate: an adapter id or fine-tuned model name")
    promote.add_argument(
        "--force", action="store_true", help="move it even if the gate refuses (owners only)"
    )
    promote.add_argument(
        "--no-wait", action="store_true", help="do not wait while the candidate is evaluated"
    )
    promote.add_argument(
        "--interval", type=float, default=PROMOTE_INTERVAL_SECONDS, help="seconds between asks"
    )
    promote.add_argument(
        "--timeout",
        type=float,
        default=PROMOTE_TIMEOUT_SECONDS,
        help="give up waiting after this many seconds",
    )
    command(
        aliases_sub, "rollback", cmd_aliases_rollback, "move an alias back to its previous adapter"
    ).add_argument("name")
    command(aliases_sub, "delete", cmd_aliases_delete, "delete an alias").add_argument("name")
    command(aliases_sub, "moves", cmd_aliases_moves, "an alias's moves, newest first").add_argument(
        "name"
    )

    chat = command(
        groups,
        "chat",
        cmd_chat,
        "ask a model (a base model, a fine-tuned model, an adapter id or an alias) and print its "
        "answer as it is written",
    )
    chat.epilog = 'Example: echo "Summarise: ..." | loft chat support-bot --max-tokens 200'
    chat.add_argument("model")
    chat.add_argument(
        "prompt", nargs="?", metavar="message", help="the message (default: standard input)"
    )
    chat.add_argument("--system", help="a system message before it")
    chat.add_argument("--max-tokens", type=int, help="the longest answer, in tokens")
    chat.add_argument("--temperature", type=float, help="0 answers greedily")
    chat.add_argument("--seed", type=int, help="the same seed, the same sampled answer")
    return parser


def cmd_jobs_follow(client: Client, args) -> int:
    return follow(client, args.id, args.interval, as_json=args.json)


def _client(args) -> Client:
    key = args.api_key or os.environ.get("LOFT_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if not key:
        raise CLIError(
            "no API key: set LOFT_API_KEY (or OPENAI_API_KEY), or pass --api-key.", exit_code=2
        )
    base_url = (
        args.base_url
        or os.environ.get("LOFT_BASE_URL")
        or os.environ.get("OPENAI_BASE_URL")
        or DEFAULT_BASE_URL
    )
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise CLIError(f"the base URL must start with http:// or https://: {base_url}", 2)
    return Client(base_url, key)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error argparse already explained
        return exit.code if isinstance(exit.code, int) else 2
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(_client(args), args)
    except CLIError as error:
        print(f"loft: {error.message}", file=sys.stderr)
        for line in error.lines:
            print(line, file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("loft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
