"""Configuration from the environment: typed helpers that fail loudly, and the stack's env file.

Settings read a value from the process environment first, then from ``$LOFT_HOME/env``, which
the embedded stack writes with the URLs it chose. A second terminal therefore talks to the
same stack as the first without exporting anything.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

ENV_FILE_NAME = "env"


def loft_home() -> Path:
    """Where Loft keeps local state: database files, broker data, objects, models."""
    return Path(os.environ.get("LOFT_HOME", "./.loft")).resolve()


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a ``KEY=value`` file; blank lines and ``#`` comments are skipped."""
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ImproperlyConfigured(f"{path} line {number}: expected KEY=value, got {line!r}")
        values[key.strip()] = value.strip()
    return values


def write_env_file(path: Path, values: dict[str, str]) -> None:
    """Write the file atomically and readable by its owner only: it holds secrets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    lines = ["# Written by Loft's embedded stack; environment variables take precedence."]
    lines += [f"{key}={value}" for key, value in values.items()]
    tmp.write_text("\n".join(lines) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


class Env:
    """Typed access to configuration: process environment first, then the stack's env file."""

    def __init__(
        self, environ: dict[str, str] | None = None, file_values: dict[str, str] | None = None
    ):
        self.environ = os.environ if environ is None else environ
        if file_values is None:
            file_values = read_env_file(loft_home() / ENV_FILE_NAME)
        self.file_values = file_values

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self.environ.get(name)
        if value in (None, ""):
            value = self.file_values.get(name)
        return default if value in (None, "") else value

    def string(self, name: str, default: str | None = None) -> str:
        value = self.get(name, default)
        if value is None:
            raise ImproperlyConfigured(f"Set the {name} environment variable.")
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.get(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use true or false).")

    def integer(self, name: str, default: int) -> int:
        value = self.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ImproperlyConfigured(f"{name}={value!r} is not an integer.") from None

    def number(self, name: str, default: float) -> float:
        value = self.get(name)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise ImproperlyConfigured(f"{name}={value!r} is not a number.") from None

    def csv(self, name: str, default: list[str]) -> list[str]:
        value = self.get(name)
        if value is None:
            return default
        return [item.strip() for item in value.split(",") if item.strip()]

    def json(self, name: str, default):
        """A JSON value, e.g. ``[{"name": "gpu-small", "memory_bytes": 25769803776}]``."""
        value = self.get(name)
        if value is None:
            return default
        try:
            return json.loads(value)
        except ValueError as error:
            raise ImproperlyConfigured(f"{name} is not valid JSON: {error}") from None

    def integers(self, name: str, default: list[int]) -> list[int]:
        """A comma-separated list of whole numbers, e.g. ``10,60,300``."""
        items = self.csv(name, [str(number) for number in default])
        try:
            return [int(item) for item in items]
        except ValueError:
            raise ImproperlyConfigured(
                f"{name}={self.get(name)!r} is not a comma-separated list of integers."
            ) from None

    def networks(self, name: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """A comma-separated list of addresses or CIDR ranges, e.g. ``10.0.0.0/8,::1``."""
        networks = []
        for item in self.csv(name, []):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ImproperlyConfigured(
                    f"{name}: {item!r} is not an IP address or a CIDR range such as 10.0.0.0/8."
                ) from None
        return networks

    def https_header(self, name: str) -> tuple[str, str] | None:
        """An HTTP header's name, e.g. ``X-Forwarded-Proto``, as Django's
        ``SECURE_PROXY_SSL_HEADER``: the request came by HTTPS when that header says ``https``."""
        header = self.get(name)
        if header is None:
            return None
        if not header.replace("-", "").isalnum():
            raise ImproperlyConfigured(
                f"{name}={header!r} is not a header name such as X-Forwarded-Proto."
            )
        return "HTTP_" + header.upper().replace("-", "_"), "https"
