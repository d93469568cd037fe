"""Public object ids in OpenAI's style: a type prefix and random letters, e.g. ``file-3kT9...``."""

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def random_token(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def make_id(prefix: str, length: int = 24) -> str:
    return f"{prefix}-{random_token(length)}"
