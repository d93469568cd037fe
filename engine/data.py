"""Training data: read uploads into one conversation form, check them line by line, render them.

No Django here: the functions take bytes and a tokenizer, so training, validation and a notebook
all read data the same way. Formats (one per file):

- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": …}, …]}``
- ``prompt_completion``: ``{"prompt": …, "completion": …}``
- ``alpaca``: ``{"instruction": …, "input": …(optional), "output": …}``
- ``text``: ``{"text": …}`` — trained on every token, no chat template
- ``preference``: OpenAI's preference (DPO) pairs, ``{"input": {"messages": […]},
  "preferred_output": [{"role": "assistant", …}], "non_preferred_output": […]}``

as JSONL, or as CSV with those column names (chat and preference are JSONL only).
"""

from __future__ import annotations

import bisect
import codecs
import csv
import hashlib
import io
import json
import re
import statistics
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from jinja2.exceptions import TemplateError

FORMATS = ("chat", "prompt_completion", "alpaca", "text", "preference")
FORMAT_NAMES = {
    "chat": "chat messages",
    "prompt_completion": "prompt/completion",
    "alpaca": "Alpaca instruction/input/output",
    "text": "plain text",
    "preference": "preference pairs",
}
# A CSV cell holds no list of messages.
JSONL_ONLY = ("chat", "preference")
PREFERENCE_SIDES = ("preferred_output", "non_preferred_output")
ROLES = ("system", "user", "assistant", "tool")
MAX_LISTED_ERRORS = 100
# 2 MB of text is ~500k tokens, far past any base model's context: such a line is a mistake.
MAX_LINE_BYTES = 2 * 1024 * 1024
MAX_JSON_DEPTH = 16
# Each turn adds at least 4-5 tokens of template markup, so 2048 turns are past 8k tokens before
# any content, more than the bundled model's whole context; longer rows are a mistake (or a
# flood of tiny messages, each of which costs rendering and validation time).
MAX_MESSAGES_PER_ROW = 2048
# Row errors quote at most this much of what the row holds, so a 2 MB value cannot become a
# 2 MB error message in a report.
MAX_QUOTED_CHARS = 80
PREVIEW_ROWS = 3


class DatasetError(Exception):
    """The whole file is unusable; ``code`` names the reason, the message says it in a sentence."""

    def __init__(
        self, code: str, message: str, errors: list[RowError] | None = None, error_count: int = 0
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.errors = errors or []
        self.error_count = error_count or len(self.errors)


class OutOfTime(Exception):
    """``validate`` passed its deadline; the caller can validate the file elsewhere."""


@dataclass(frozen=True)
class RowError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class Message:
    role: str
    content: str
    trained: bool = False  # only assistant turns are trained, unless their weight is 0


@dataclass
class Example:
    """One row in the one conversation form: a chat, or (format ``text``) a plain text.

    A preference pair (format ``preference``) is two chats that share their input: ``messages``
    ends with the preferred answer, ``rejected`` with the non-preferred one; in each, only that
    answer is marked trained (the tokens whose likelihood DPO raises, or lowers). Supervised
    training reads ``messages`` alone.
    """

    line: int
    format: str
    messages: list[Message] = field(default_factory=list)
    text: str | None = None
    rejected: list[Message] | None = None

    def sides(self) -> list[Example]:
        """The conversations to render: this example, or a pair's preferred and non-preferred."""
        if self.rejected is None:
            return [self]
        return [
            Example(self.line, self.format, self.messages),
            Example(self.line, self.format, self.rejected),
        ]

    def fingerprint(self) -> bytes:
        if self.text is not None:
            payload = self.text
        else:
            sides = [self.messages] + ([self.rejected] if self.rejected is not None else [])
            turns = [[[m.role, m.content] for m in side] for side in sides]
            # A supervised row keeps the fingerprint it had before pairs existed.
            payload = json.dumps(turns if self.rejected is not None else turns[0])
        return hashlib.blake2b(payload.encode(), digest_size=16).digest()


class RowProblem(ValueError):
    """Raised inside row parsing; becomes a RowError with the row's line number."""


# --- reading bytes into lines ------------------------------------------------------------------


def sniff_binary(head: bytes) -> str | None:
    """A sentence naming what binary thing this is, or None for text."""
    if head.startswith(b"\x80") and len(head) > 1 and head[1] in range(2, 6):
        return "a Python pickle"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive"
    if head.startswith(b"GGUF"):
        return "a GGUF model file"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "a safetensors file"
    if b"\x00" in head[:8192]:
        return "binary data (it contains NUL bytes)"
    return None


def iter_lines(
    chunks: Iterable[bytes],
    max_line_bytes: int = MAX_LINE_BYTES,
    *,
    truncated: bool = False,
    first_line: int = 1,
) -> Iterator[tuple[int, bytes | None]]:
    """Split a byte stream into (line number, line) without ever holding more than one line.

    A line longer than ``max_line_bytes`` is yielded as ``None`` (and its bytes skipped) so the
    caller reports it instead of holding 50 MB in memory. When the stream is only the head of a
    file (``truncated``), its cut-off last line is dropped rather than reported.
    """
    pending = bytearray()
    number = first_line
    overlong = False
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end == -1:
                if not overlong:
                    pending += chunk[start:]
                    if len(pending) > max_line_bytes:
                        overlong = True
                        pending.clear()
                break
            if overlong:
                yield number, None
            else:
                pending += chunk[start:end]
                yield number, bytes(pending) if len(pending) <= max_line_bytes else None
            pending.clear()
            overlong = False
            number += 1
            start = end + 1
    if overlong:
        yield number, None
    elif pending and not truncated:
        yield number, bytes(pending)


def decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RowProblem(
            f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
            "save the file as UTF-8"
        ) from None


# --- rows into examples --------------------------------------------------------------------------


def detect_format(row: dict) -> str | None:
    # Either side alone names the format, so a row missing the other hears which one it lacks.
    if any(side in row for side in PREFERENCE_SIDES):
        return "preference"
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return None


def _string(row: dict, key: str, *, required: bool = True, non_empty: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowProblem(f'missing "{key}"')
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowProblem(f'"{key}" must be a string, got {_json_type(value)}')
    if non_empty and required and not value.strip():
        raise RowProblem(f'"{key}" is empty')
    return value


def _cut(text: str) -> str:
    """Text from a row, cut to ``MAX_QUOTED_CHARS`` for an error message."""
    return text if len(text) <= MAX_QUOTED_CHARS else f"{text[: MAX_QUOTED_CHARS - 1]}…"


def _quoted(value) -> str:
    return _cut(json.dumps(value))


def _json_type(value) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), "a number")


def _content_text(message: dict, where: str) -> str:
    content = message.get("content")
    if content is None and message.get("tool_calls"):
        # Tool calls are kept as text: the adapter learns to write them as the template shows.
        return json.dumps(message["tool_calls"], ensure_ascii=False)
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for index, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise RowProblem(
                    f'{where}.content[{index}] must be a text part {{"type": "text", "text": …}}'
                )
            parts.append(part["text"])
        return "".join(parts)
    raise RowProblem(f"{where}.content must be a string, got {_json_type(content)}")


def _message_list(messages, name: str) -> list:
    """A row's list of messages, checked for its shape; ``name`` is how errors call it."""
    if not isinstance(messages, list):
        raise RowProblem(f"{name} must be a list, got {_json_type(messages)}")
    if not messages:
        raise RowProblem(f"{name} is empty")
    if len(messages) > MAX_MESSAGES_PER_ROW:
        raise RowProblem(
            f"{name} has {len(messages)} messages; a row holds at most "
            f"{MAX_MESSAGES_PER_ROW}, so split the conversation"
        )
    return messages


def _role_and_content(message, where: str) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise RowProblem(f"{where} must be an object, got {_json_type(message)}")
    role = message.get("role")
    if role not in ROLES:
        shown = _quoted(role) if role is not None else "missing"
        raise RowProblem(f"{where}.role {shown} is not one of {', '.join(ROLES)}")
    return role, _content_text(message, where)


def chat_from_row(row: dict) -> list[Message]:
    messages = _message_list(row.get("messages"), '"messages"')
    result = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role, content = _role_and_content(message, where)
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise RowProblem(f"{where}.weight must be 0 or 1, got {_quoted(weight)}")
        trained = role == "assistant" and weight == 1
        if trained and not content.strip():
            raise RowProblem(
                f"{where}.content is empty; an assistant turn needs text to learn from"
            )
        result.append(Message(role, content, trained))
    if not any(m.role == "assistant" for m in result):
        raise RowProblem("conversation has no assistant turn")
    if result[0].role == "assistant":
        # Training learns each answer from what came before it; the first turn has nothing.
        raise RowProblem(
            "conversation starts with an assistant turn; put a system or user turn first"
        )
    if not any(m.trained for m in result):
        raise RowProblem("every assistant turn has weight 0, so nothing would be trained")
    return result


def preference_from_row(row: dict) -> tuple[list[Message], list[Message]]:
    """A preference pair as (input + preferred answer, input + non-preferred answer); only the
    answers are trained. Keys beyond OpenAI's (``input.tools``, ``metadata``…) are ignored, as
    the chat format ignores them."""
    if row.get("input") is None:
        raise RowProblem('missing "input"')
    if not isinstance(row["input"], dict):
        raise RowProblem(f'"input" must be an object, got {_json_type(row["input"])}')
    messages = _message_list(row["input"].get("messages"), "input.messages")
    prompt = [
        Message(*_role_and_content(message, f"input.messages[{index}]"))
        for index, message in enumerate(messages)
    ]
    last = len(prompt) - 1
    if prompt[last].role != "user":
        raise RowProblem(f"input.messages must end with a user message, got {prompt[last].role}")
    if not prompt[last].content.strip():
        raise RowProblem(f"input.messages[{last}].content is empty; the answers need a prompt")
    preferred, non_preferred = (_answer(row, side) for side in PREFERENCE_SIDES)
    if preferred.content.strip() == non_preferred.content.strip():
        raise RowProblem(
            "preferred_output and non_preferred_output are identical, so neither is preferred"
        )
    return prompt + [preferred], prompt + [non_preferred]


def _answer(row: dict, side: str) -> Message:
    """One side of a pair: a list of exactly one assistant message with text."""
    if row.get(side) is None:
        raise RowProblem(f'missing "{side}"')
    value = row[side]
    if not isinstance(value, list):
        raise RowProblem(
            f'"{side}" must be a list of one assistant message, got {_json_type(value)}'
        )
    if len(value) != 1:
        raise RowProblem(f"{side} must hold exactly one message, got {len(value)}")
    where = f"{side}[0]"
    if not isinstance(value[0], dict):
        raise RowProblem(f"{where} must be an object, got {_json_type(value[0])}")
    role = value[0].get("role")
    if role != "assistant":
        shown = _quoted(role) if role is not None else "missing"
        raise RowProblem(f"{where}.role must be assistant, got {shown}")
    content = _content_text(value[0], where)
    if not content.strip():
        raise RowProblem(f"{where}.content is empty; an answer needs text")
    return Message("assistant", content, True)


def example_from_row(row: dict, line: int, forced_format: str | None) -> Example:
    fmt = forced_format or detect_format(row)
    if fmt is None:
        keys = ", ".join(_cut(key) for key in sorted(row)[:8]) or "none"
        raise RowProblem(
            "no known format: expected messages, prompt + completion, instruction + output, "
            f"text, or a preference pair; got keys {keys}"
        )
    if fmt == "chat":
        return Example(line, fmt, chat_from_row(row))
    if fmt == "preference":
        preferred, rejected = preference_from_row(row)
        return Example(line, fmt, preferred, rejected=rejected)
    if fmt == "prompt_completion":
        prompt = _string(row, "prompt")
        completion = _string(row, "completion")
        return Example(line, fmt, [Message("user", prompt), Message("assistant", completion, True)])
    if fmt == "alpaca":
        instruction = _string(row, "instruction")
        extra = _string(row, "input", required=False)
        output = _string(row, "output")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example(line, fmt, [Message("user", prompt), Message("assistant", output, True)])
    return Example(line, fmt, text=_string(row, "text"))


def _depth(value) -> int:
    depth, frontier = 0, [value]
    while frontier:
        depth += 1
        frontier = [
            child
            for item in frontier
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, dict | list)
        ]
    return depth


def parse_json_row(text: str) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise RowProblem(f"not valid JSON ({error.msg}, column {error.colno})") from None
    except RecursionError:
        raise RowProblem(
            f"JSON is nested too deeply; rows nest at most {MAX_JSON_DEPTH} levels"
        ) from None
    if not isinstance(row, dict):
        raise RowProblem(f"expected a JSON object, got {_json_type(row)}")
    if _depth(row) > MAX_JSON_DEPTH:
        raise RowProblem(f"JSON is nested too deeply; rows nest at most {MAX_JSON_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(text) and not _encodes(row):
        # Valid UTF-8 holds no surrogates; only an escape like "\ud800" without its pair makes
        # one, and such a string cannot be stored, hashed or tokenized.
        raise RowProblem(
            'contains a lone UTF-16 surrogate escape (such as "\\ud800"), which is not a character'
        )
    return row


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _encodes(value) -> bool:
    """Whether every string in a parsed row, keys included, can be written as UTF-8."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                return False
    return True


CSV_COLUMNS = {
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


def _csv_rows(lines: Iterator[tuple[int, bytes | None]], forced_format: str | None):
    """Yield (line, dict | RowProblem) from CSV lines; the header decides the format."""
    # The physical line a record starts on: the first line the reader takes after the previous
    # record, not counting lines that were reported as problems instead.
    record_start: list[int | None] = [None]
    problems: list[tuple[int, RowProblem]] = []

    def text_lines():
        for number, raw in lines:
            if raw is None:
                problems.append((number, RowProblem(f"longer than {MAX_LINE_BYTES // 2**20} MB")))
                continue
            try:
                text = decode_line(raw.rstrip(b"\r")) + "\n"
            except RowProblem as problem:
                problems.append((number, problem))
                continue
            if record_start[0] is None:
                record_start[0] = number
            yield text

    reader = csv.reader(text_lines())
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError("empty_file", "The file has no rows.") from None
    except csv.Error as error:
        raise DatasetError("invalid_csv", f"line 1: not valid CSV ({error})") from None
    header = [name.strip().lstrip("\ufeff").lower() for name in header]
    fmt = forced_format or next(
        (name for name, needed in CSV_COLUMNS.items() if all(col in header for col in needed)), None
    )
    if fmt in JSONL_ONLY:
        raise DatasetError(
            "missing_columns",
            f"{FORMAT_NAMES[fmt].capitalize()} are read from JSONL only, not CSV.",
        )
    needed = CSV_COLUMNS.get(fmt or "", ())
    if fmt is None or not all(col in header for col in needed):
        options = "; ".join(" + ".join(cols) for cols in CSV_COLUMNS.values())
        got = _cut(", ".join(header)) or "none"
        raise DatasetError(
            "missing_columns",
            f"The CSV header has the columns {got}; it needs one of: {options}.",
        )
    yield "format", fmt
    while True:
        record_start[0] = None
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            yield record_start[0] or 0, RowProblem(f"not valid CSV ({error})")
            continue
        start_line = record_start[0] or 0
        while problems:
            yield problems.pop(0)
        if not any(value.strip() for value in values):
            continue
        if len(values) != len(header):
            yield start_line, RowProblem(f"has {len(values)} fields, the header has {len(header)}")
            continue
        yield start_line, dict(zip(header, values, strict=True))
    while problems:
        yield problems.pop(0)


def open_dataset(
    chunks: Iterable[bytes],
    *,
    filename: str = "",
    forced_format: str | None = None,
    truncated: bool = False,
) -> tuple[str, Iterator[Example | RowError]]:
    """Read an upload: its file type ("jsonl" or "csv") and its Examples, with a RowError for
    each line that cannot be used.

    Raises DatasetError for what makes the whole file unusable: empty, binary, a CSV header
    without the needed columns (the last one while iterating).
    """
    if forced_format is not None and forced_format not in FORMATS:
        raise DatasetError("invalid_format", f"format must be one of {', '.join(FORMATS)}.")
    chunks = iter(chunks)
    head = b""
    skipped_lines = 0  # newlines in leading whitespace-only chunks, so line numbers stay true
    for chunk in chunks:
        if chunk.strip():
            head = chunk
            break
        skipped_lines += chunk.count(b"\n")
    if not head:
        raise DatasetError("empty_file", "The file is empty.")
    binary = sniff_binary(head)
    if binary:
        raise DatasetError(
            "binary_file",
            f"This is {binary}, not JSONL or CSV text. Upload training data as UTF-8 JSONL or CSV.",
        )
    if head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8) :]

    def all_chunks():
        yield head
        yield from chunks

    lines = iter_lines(all_chunks(), truncated=truncated, first_line=1 + skipped_lines)
    name = filename.lower()
    is_csv = name.endswith(".csv") or (
        not name.endswith((".jsonl", ".json")) and not head.lstrip().startswith(b"{")
    )
    if is_csv:
        return "csv", _examples_from_csv(lines, forced_format)
    return "jsonl", _examples_from_jsonl(lines, forced_format)


def _examples_from_jsonl(lines, forced_format):
    for number, raw in lines:
        if raw is None:
            yield RowError(
                number, f"longer than {MAX_LINE_BYTES // 2**20} MB; a row must be shorter"
            )
            continue
        if not raw.strip():
            continue
        try:
            yield example_from_row(parse_json_row(decode_line(raw)), number, forced_format)
        except RowProblem as problem:
            yield RowError(number, str(problem))


def _examples_from_csv(lines, forced_format):
    rows = _csv_rows(lines, forced_format)
    _, fmt = next(rows)
    for number, row in rows:
        if isinstance(row, RowProblem):
            yield RowError(number, str(row))
            continue
        try:
            yield example_from_row(row, number, fmt)
        except RowProblem as problem:
            yield RowError(number, str(problem))


# --- rendering through the chat template --------------------------------------------------------


@dataclass
class Rendered:
    """An example as training sees it: the text, its tokens, and which tokens are trained."""

    text: str
    input_ids: list[int]
    trained: list[bool]

    def segments(self, offsets: list[tuple[int, int]]) -> list[dict]:
        """Consecutive runs of trained / untrained text, for showing a person what is learned."""
        runs: list[dict] = []
        cursor = 0
        for (start, end), trained in zip(offsets, self.trained, strict=True):
            # Tokens of one character split into bytes share its offsets: take it once.
            if end <= cursor:
                continue
            piece = self.text[max(start, cursor) : end]
            cursor = end
            if runs and runs[-1]["trained"] == trained:
                runs[-1]["text"] += piece
            else:
                runs.append({"text": piece, "trained": trained})
        if cursor < len(self.text):
            runs.append({"text": self.text[cursor:], "trained": False})
        return runs


def _as_dicts(messages: list[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def render_text(example: Example, tokenizer) -> str:
    if example.text is not None:
        return example.text + (tokenizer.eos_token or "")
    return tokenizer.apply_chat_template(_as_dicts(example.messages), tokenize=False)


def trained_char_spans(example: Example, tokenizer, full: str) -> list[tuple[int, int]]:
    """Character spans of the trained assistant turns, end-of-turn token included.

    A turn's span is the text it adds to the conversation after the generation prompt: it
    starts where ``render(turns before it, add_generation_prompt=True)`` ends and ends where
    ``render(turns through it)`` ends, less trailing whitespace. Rendering those prefixes for
    every turn takes time quadratic in the number of turns, so the spans are placed from a few
    renders of the whole conversation (``_spans_by_layout``), and from every turn's prefixes
    only for a template whose turns that cannot place (``MAX_MESSAGES_PER_ROW`` bounds it).
    """
    if example.text is not None:
        return [(0, len(full))]
    messages = _as_dicts(example.messages)
    trained = [index for index, message in enumerate(example.messages) if message.trained]
    spans = _spans_by_layout(messages, trained, tokenizer, full)
    if spans is None:
        spans = [_span(*_turn_prefixes(messages, index, tokenizer, full)) for index in trained]
    return spans


def _turn_prefixes(messages: list[dict], index: int, tokenizer, full: str) -> tuple[str, str]:
    """The conversation rendered up to turn ``index`` with the generation prompt, and through
    it; each must begin the next, as the spans are read off them."""
    before = tokenizer.apply_chat_template(
        messages[:index], tokenize=False, add_generation_prompt=True
    )
    through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
    if not (through.startswith(before) and full.startswith(through)):
        raise DatasetError(
            "template_not_incremental",
            "The base model's chat template does not render conversations turn by turn, "
            "so the trained spans cannot be found.",
        )
    return before, through


def _span(before: str, through: str) -> tuple[int, int]:
    return len(before), len(through.rstrip())


# Private-use characters, wrapped around every message's content for one render to show where
# each content lies in the rendered conversation.
CONTENT_START, CONTENT_END = "\ue000", "\ue001"
_MARKER = re.compile(f"[{CONTENT_START}{CONTENT_END}]")


def _content_offsets(messages: list[dict], tokenizer, full: str) -> list[tuple[int, int]] | None:
    """Where each message's content lies in ``full``; None when the template does not show
    every content once, in order and unchanged."""
    if CONTENT_START in full or CONTENT_END in full:
        return None
    marked = tokenizer.apply_chat_template(
        [{**m, "content": f"{CONTENT_START}{m['content']}{CONTENT_END}"} for m in messages],
        tokenize=False,
    )
    markers = [(found.start(), found.group()) for found in _MARKER.finditer(marked)]
    if len(markers) != 2 * len(messages):
        return None
    offsets = []
    for index in range(len(messages)):
        (opened, start), (closed, end) = markers[2 * index], markers[2 * index + 1]
        if (start, end) != (CONTENT_START, CONTENT_END):
            return None
        # In ``full`` coordinates: the 2 * index markers before this one are not there.
        offsets.append((opened - 2 * index, closed - 2 * index - 1))
    if marked.replace(CONTENT_START, "").replace(CONTENT_END, "") != full:
        return None
    if any(full[s:e] != m["content"] for (s, e), m in zip(offsets, messages, strict=True)):
        return None
    return offsets


def _spans_by_layout(
    messages: list[dict], trained: list[int], tokenizer, full: str
) -> list[tuple[int, int]] | None:
    """The trained spans from a fixed number of renders, or None when the template's trained
    turns do not all look alike.

    The first trained turn is measured by its prefixes: the generation prompt before its
    content, how far before its content the span starts, and the text that closes the turn.
    Every trained turn must show that same text around its own content (found by
    ``_content_offsets``) and is placed by it; the last one is measured by its prefixes too,
    and must agree.
    """
    contents = _content_offsets(messages, tokenizer, full)
    if contents is None:
        return None
    first = trained[0]
    before, through = _turn_prefixes(messages, first, tokenizer, full)
    prompt_start = len(tokenizer.apply_chat_template(messages[:first], tokenize=False))
    content_start, content_end = contents[first]
    if not (prompt_start <= len(before) <= content_start <= content_end <= len(through)):
        return None
    opening = full[prompt_start:content_start]  # the generation prompt, then the span's lead
    lead = content_start - len(before)
    closing = through[content_end:]  # what the template writes after the content
    trained_closing = len(closing.rstrip())
    starts = [start for start, _ in contents[1:]] + [len(full)]
    spans = []
    for index in trained:
        content_start, content_end = contents[index]
        previous_end = contents[index - 1][1] if index else 0
        if not (
            previous_end <= content_start - len(opening)
            and full.startswith(opening, content_start - len(opening))
            and content_end + len(closing) <= starts[index]
            and full.startswith(closing, content_end)
        ):
            return None
        if trained_closing:
            end = content_end + trained_closing
        else:  # the turn closes with whitespace only: the span ends where its text does
            end = _end_before_whitespace(full, content_end)
        spans.append((content_start - lead, end))
    last = trained[-1]
    if last != first and spans[-1] != _span(*_turn_prefixes(messages, last, tokenizer, full)):
        return None
    return spans


def _end_before_whitespace(text: str, position: int) -> int:
    while position and text[position - 1].isspace():
        position -= 1
    return position


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(span for span in spans if span[0] < span[1]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _trained_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Whether each token starts inside a span: a binary search per token in the merged spans,
    not a pass over every span."""
    merged = _merged(spans)
    starts = [start for start, _ in merged]
    trained = []
    for token_start, _ in offsets:
        index = bisect.bisect_right(starts, token_start) - 1
        trained.append(index >= 0 and token_start < merged[index][1])
    return trained


def render(example: Example, tokenizer) -> tuple[Rendered, list[tuple[int, int]]]:
    """Tokens and the trained mask of one example, plus each token's character offsets."""
    full = render_text(example, tokenizer)
    spans = trained_char_spans(example, tokenizer, full)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(pair) for pair in encoded["offset_mapping"]]
    return Rendered(full, list(encoded["input_ids"]), _trained_tokens(offsets, spans)), offsets


# --- the validation report -------------------------------------------------------------------


@dataclass
class ValidationReport:
    format: str
    file_type: str
    rows: int
    tokens: int
    error_count: int
    errors: list[str]
    tokens_per_row: dict
    duplicate_rows: int
    role_counts: dict
    rows_over_context: int
    context_length: int
    preview: list[dict]
    # Format ``preference`` only: the pairs and their answers, as ``_PairTally.as_dict`` says.
    preference: dict | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# The log-probabilities of tokens both answers begin with are the same in each (same context,
# same tokens), so they cancel in DPO's loss: a pair teaches nothing where its answers agree.
# The first 4 tokens, about three words, are where an answer takes its line ("Sure, here is",
# "I'm sorry, but"); a file whose pairs mostly agree on them only teaches what comes later.
SAME_START_TOKENS = 4


class _PairTally:
    """The answers of a file's preference pairs: their tokens, and how many open alike."""

    def __init__(self):
        self.pairs = 0
        self.totals = {"preferred": 0, "non_preferred": 0}
        self.longest = {"preferred": 0, "non_preferred": 0}
        self.same_start = 0

    def count(self, preferred: list[int], non_preferred: list[int]) -> None:
        self.pairs += 1
        for side, ids in (("preferred", preferred), ("non_preferred", non_preferred)):
            self.totals[side] += len(ids)
            self.longest[side] = max(self.longest[side], len(ids))
        if preferred[:SAME_START_TOKENS] == non_preferred[:SAME_START_TOKENS]:
            self.same_start += 1

    def as_dict(self) -> dict:
        """Answer tokens are the answer's text alone, without the template around it."""
        return {
            "pairs": self.pairs,
            **{
                f"{side}_answer_tokens": {
                    "total": total,
                    "mean": round(total / self.pairs, 1),
                    "max": self.longest[side],
                }
                for side, total in self.totals.items()
            },
            "same_start_tokens": SAME_START_TOKENS,
            "same_start_pairs": self.same_start,
            "same_start_share": round(self.same_start / self.pairs, 3),
        }


def _percentile(sorted_values: array, fraction: float) -> int:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return int(sorted_values[index])


def validate(
    chunks: Iterable[bytes],
    tokenizer,
    *,
    filename: str = "",
    forced_format: str | None = None,
    context_length: int = 2048,
    batch_size: int = 512,
    batch_chars: int = 2**20,
    deadline: float | None = None,
) -> ValidationReport:
    """Read, check and measure a dataset in one streaming pass.

    A preference pair is one row of both its rendered sides (DPO reads both): its tokens are
    their sum, and it is over the context when either side is.

    Raises DatasetError when the file has no usable row, or mixes formats; OutOfTime when
    ``time.monotonic()`` passes ``deadline`` (checked after each row and each batch of at most
    ``batch_size`` texts or ``batch_chars`` characters tokenized together).
    """
    tally = _RowTally()
    token_counts = array("I")
    over_context = 0
    pairs = _PairTally()
    fingerprints: set[bytes] = set()
    duplicates = 0
    roles: Counter[str] = Counter()
    preview: list[dict] = []
    batch: list[str] = []
    batch_sides: list[int] = []  # how many of the batch's texts each row rendered
    answers: list[str] = []  # each pair's preferred answer, then its non-preferred one
    batched_chars = 0

    def flush():
        nonlocal batched_chars, over_context
        if batch:
            lengths = (len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
            for sides in batch_sides:
                counts = [next(lengths) for _ in range(sides)]
                token_counts.append(sum(counts))
                over_context += max(counts) > context_length
            if answers:
                ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
                for preferred, non_preferred in zip(ids[::2], ids[1::2], strict=True):
                    pairs.count(preferred, non_preferred)
            batch.clear()
            batch_sides.clear()
            answers.clear()
            batched_chars = 0

    def check_time():
        if deadline is not None and time.monotonic() > deadline:
            raise OutOfTime("validation passed its deadline")

    file_type, items = open_dataset(chunks, filename=filename, forced_format=forced_format)
    for item in items:
        check_time()
        if isinstance(item, Example):
            try:
                texts = [render_text(side, tokenizer) for side in item.sides()]
            except TemplateError as error:  # e.g. a template that wants roles to alternate
                item = RowError(
                    item.line, f"the base model's chat template refuses it: {_cut(str(error))}"
                )
        if not tally.count(item):
            continue
        fingerprint = item.fingerprint()
        if fingerprint in fingerprints:
            duplicates += 1
        fingerprints.add(fingerprint)
        roles.update(m.role for m in item.messages)
        if len(preview) < PREVIEW_ROWS:
            rendered, offsets = render(item, tokenizer)
            preview.append(
                {
                    "line": item.line,
                    "tokens": len(rendered.input_ids),
                    "segments": rendered.segments(offsets),
                }
            )
        batch.extend(texts)
        batch_sides.append(len(texts))
        batched_chars += sum(len(text) for text in texts)
        if item.rejected is not None:
            answers.extend([item.messages[-1].content, item.rejected[-1].content])
        if len(batch) >= batch_size or batched_chars >= batch_chars:
            flush()
    flush()
    check_time()

    tally.refuse_unusable()
    ordered = array("I", sorted(token_counts))
    return ValidationReport(
        format=next(iter(tally.formats)),
        file_type=file_type,
        rows=len(token_counts),
        tokens=int(sum(token_counts)),
        error_count=tally.error_count,
        errors=[str(error) for error in tally.errors],
        tokens_per_row={
            "min": int(ordered[0]),
            "median": int(statistics.median(ordered)),
            "p95": _percentile(ordered, 0.95),
            "max": int(ordered[-1]),
        },
        duplicate_rows=duplicates,
        role_counts=dict(roles),
        rows_over_context=over_context,
        context_length=context_length,
        preview=preview,
        preference=pairs.as_dict() if pairs.pairs else None,
    )


class _RowTally:
    """Counts rows by format and keeps the first errors; decides whether a file is usable."""

    def __init__(self):
        self.errors: list[RowError] = []
        self.error_count = 0
        self.formats: dict[str, tuple[int, int]] = {}  # format -> (first line, rows)

    def count(self, item: Example | RowError) -> bool:
        """Record a row; True when it is a usable Example."""
        if isinstance(item, RowError):
            self.error_count += 1
            if len(self.errors) < MAX_LISTED_ERRORS:
                self.errors.append(item)
            return False
        first, rows = self.formats.get(item.format, (item.line, 0))
        self.formats[item.format] = (first, rows + 1)
        return True

    def refuse_unusable(self) -> None:
        """Raise DatasetError when no row is usable, or rows come in more than one format."""
        if len(self.formats) > 1:
            described = " and ".join(
                f"{FORMAT_NAMES[name]} (first on line {first}, {rows} rows)"
                for name, (first, rows) in self.formats.items()
            )
            raise DatasetError(
                "mixed_formats",
                f"The file mixes formats: {described}. "
                "Use one format per file, or force one with the format field.",
            )
        if not self.formats:
            listed = "; ".join(str(error) for error in self.errors[:5])
            more = f" (and {self.error_count - 5} more)" if self.error_count > 5 else ""
            raise DatasetError(
                "no_valid_rows",
                f"The file has no usable rows. {listed}{more}".strip(),
                errors=self.errors,
                error_count=self.error_count,
            )


def check_head(
    chunks: Iterable[bytes], *, filename: str = "", forced_format: str | None = None
) -> None:
    """A quick look at the first bytes of a large file, before it is accepted for a full pass:
    raises DatasetError when they show the file is unusable (binary, no usable row, mixed
    formats, a header without the needed columns). Rows are parsed, not tokenized."""
    tally = _RowTally()
    _, items = open_dataset(chunks, filename=filename, forced_format=forced_format, truncated=True)
    for item in items:
        tally.count(item)
    tally.refuse_unusable()


def chunks_of(data: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    """Bytes as a stream of chunks (tests, notebooks)."""
    stream = io.BytesIO(data)
    while chunk := stream.read(size):
        yield chunk
