"""The tasks bench/quality.py trains on: generated or read from the standard library, no network.

Each task is a list of (question, reply) rows for training and a disjoint list for judging,
the same on every run (a fixed data seed; the docstrings and pydoc topics are those of the
running Python, 3.11 here):

- ``dates``: a learnable rule. "Convert to ISO 8601: 5 March 2021" → "2021-03-05", the input
  in one of four spellings.
- ``docstrings``: free-form text in one domain. "What does `textwrap.dedent` do?" → the first
  sentence of the function's docstring.
- ``topics``: classification of real text. A ~30-word passage of one paragraph of the pydoc
  topics (``pydoc_data.topics``) → the topic's key; eight topics, the same number of rows each.

``dates`` and ``docstrings`` are used to tune Loft's defaults; ``topics`` is kept out of that
tuning and reported apart.
"""

from __future__ import annotations

import calendar
import datetime
import importlib
import inspect
import random
import re
from dataclasses import dataclass

DATA_SEED = 20261201
TRAIN_ROWS = 72  # 9 a topic; ~45 min for 3 tasks × 3 seeds × 3 contenders on 2 cores
HELD_OUT_ROWS = 32


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    tuned: bool  # used to tune Loft's defaults; the others are kept out of it
    train: list[tuple[str, str]]
    held_out: list[tuple[str, str]]


# --- dates ---------------------------------------------------------------------------------------

ORDINALS = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}


def spelled(day: datetime.date, style: int) -> str:
    month, short = calendar.month_name[day.month], calendar.month_abbr[day.month]
    if style == 0:
        return f"{day.day} {month} {day.year}"
    if style == 1:
        return f"{month} {day.day}, {day.year}"
    if style == 2:
        return f"{short} {day.day} {day.year}"
    return f"the {day.day}{ORDINALS.get(day.day, 'th')} of {month} {day.year}"


def date_rows(count: int, rng: random.Random) -> list[tuple[str, str]]:
    first, last = datetime.date(1950, 1, 1).toordinal(), datetime.date(2039, 12, 31).toordinal()
    days = sorted(rng.sample(range(first, last + 1), count))
    rng.shuffle(days)
    rows = []
    for index, ordinal in enumerate(days):
        day = datetime.date.fromordinal(ordinal)
        rows.append((f"Convert to ISO 8601: {spelled(day, index % 4)}", day.isoformat()))
    return rows


# --- docstrings ----------------------------------------------------------------------------------

DOC_MODULES = (
    "base64", "binascii", "bisect", "calendar", "colorsys", "copy", "difflib", "fnmatch",
    "functools", "glob", "gzip", "hashlib", "heapq", "html", "itertools", "json", "keyword",
    "math", "operator", "os", "os.path", "random", "re", "secrets", "shlex", "shutil",
    "statistics", "string", "textwrap", "time", "unicodedata", "urllib.parse", "zlib",
)  # fmt: skip
MAX_SENTENCE_WORDS = 20


def first_sentence(doc: str) -> str | None:
    """The docstring's first sentence, on one line; None when it is a signature or too long."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    if not match:
        return None
    sentence = match.group(1)
    words = sentence.split()
    if not 4 <= len(words) <= MAX_SENTENCE_WORDS or re.match(r"^[\w.]+\(", sentence):
        return None
    return sentence


def docstring_rows() -> list[tuple[str, str]]:
    """Every public function of DOC_MODULES with a usable docstring, each function object and
    each sentence once, in a fixed order."""
    seen_objects, seen_sentences, rows = set(), set(), []
    for module_name in DOC_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(vars(module)):
            value = getattr(module, name)
            if name.startswith("_") or not (inspect.isfunction(value) or inspect.isbuiltin(value)):
                continue
            sentence = first_sentence(inspect.getdoc(value) or "")
            if sentence is None or id(value) in seen_objects or sentence in seen_sentences:
                continue
            seen_objects.add(id(value))
            seen_sentences.add(sentence)
            rows.append((f"What does `{module_name}.{name}` do?", sentence))
    return rows


# --- topics --------------------------------------------------------------------------------------

TOPICS = (
    "assignment", "comparisons", "compound", "execmodel", "formatstrings", "specialnames",
    "types", "typesseq",
)  # fmt: skip
PASSAGE_WORDS = 30
MIN_PARAGRAPH_WORDS = 25


def paragraphs(text: str) -> list[str]:
    """The prose paragraphs of a pydoc topic, each on one line: code, tables and lists of
    signatures (fewer than 70 % plain words) left out."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        if block.startswith("   ") or ">>>" in block or "|" in block or "+--" in block:
            continue
        words = block.split()
        prose = sum(word.strip(".,;:()\"'‘’“”").isalpha() for word in words)
        if len(words) >= MIN_PARAGRAPH_WORDS and prose >= 0.7 * len(words):
            found.append(" ".join(words[:PASSAGE_WORDS]))
    return found


def topic_rows(per_topic: int, rng: random.Random) -> list[list[tuple[str, str]]]:
    from pydoc_data.topics import topics

    chosen = []
    for key in TOPICS:
        passages = paragraphs(topics[key])
        if len(passages) < per_topic:
            raise SystemExit(f"pydoc topic {key!r} has only {len(passages)} usable paragraphs")
        picked = rng.sample(passages, per_topic)
        chosen.append([(f"Which Python docs topic is this from?\n{p}", key) for p in picked])
    return chosen


# --- the tasks -----------------------------------------------------------------------------------


def split(rows: list, train: int, held_out: int, rng: random.Random) -> tuple[list, list]:
    if len(rows) < train + held_out:
        raise SystemExit(f"only {len(rows)} rows, {train + held_out} wanted")
    rows = list(rows)
    rng.shuffle(rows)
    return rows[:train], rows[train : train + held_out]


def build(name: str, train: int = TRAIN_ROWS, held_out: int = HELD_OUT_ROWS) -> Task:
    rng = random.Random(f"{DATA_SEED}-{name}")
    if name == "dates":
        rows = date_rows(train + held_out, rng)
        return Task(name, "a learnable rule", True, rows[:train], rows[train:])
    if name == "docstrings":
        train_rows, held = split(docstring_rows(), train, held_out, rng)
        return Task(name, "free-form text in one domain", True, train_rows, held)
    if name == "topics":
        per_train, per_held = -(-train // len(TOPICS)), -(-held_out // len(TOPICS))
        train_rows, held = [], []
        for rows in topic_rows(per_train + per_held, rng):
            train_rows += rows[:per_train]
            held += rows[per_train:]
        rng.shuffle(train_rows)
        rng.shuffle(held)
        return Task(name, "classification of real text", False, train_rows, held)
    raise SystemExit(f"unknown task {name!r}")


TASKS = ("dates", "docstrings", "topics")
