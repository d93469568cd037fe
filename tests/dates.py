"""A learnable rule for evaluation tests: dates written in free form → ISO 8601.

Every row asks for one date, written one of several ways (month names, abbreviations,
ordinals, day first or month first), and the answer is that date as YYYY-MM-DD and nothing
else. The rule is simple and exact, the base model follows it only now and then, and exact
match on held-out rows shows at once whether an adapter learned it. Generated from a seed, so
the same call makes the same file. (As a file: ``tests.helpers.jsonl(date_rows(...))``.)
"""

from __future__ import annotations

import datetime
import random

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
# As a system turn: it replaces SmolLM2's default system prompt, which keeps rows short.
INSTRUCTION = "Rewrite the date as YYYY-MM-DD."
# A job that learns the rule from 320 rows in 20 steps (tests/test_evaluation_loop.py measured
# held-out exact match 0 % → 90 %); tests/times.py's rule too (bench/continual.py). LoRA on the
# full-precision base: on a CPU, 4-bit layers cost minutes a step.
RULE_ROWS = 320
LEARNS_THE_RULE = {
    "quantization": "none",
    "lora_rank": 16,
    "lora_alpha": 32,
    "learning_rate_multiplier": 15,
    "n_epochs": 1,
    "batch_size": 16,
    "warmup_ratio": 0.1,
    "max_seq_length": 64,
    "checkpoint_every": 1000,
}


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def free_form(date: datetime.date, rng: random.Random) -> str:
    month = MONTHS[date.month - 1]
    short = month[:3]
    forms = [
        f"{month} {date.day}, {date.year}",
        f"{date.day} {month} {date.year}",
        f"the {ordinal(date.day)} of {month}, {date.year}",
        f"{short} {date.day} {date.year}",
        f"{date.day}-{short}-{date.year}",
        f"{month} {ordinal(date.day)} {date.year}",
    ]
    return rng.choice(forms)


def date_rows(count: int, seed: int = 0) -> list[dict]:
    """``count`` chat rows, each a different random date between 1950 and 2049."""
    rng = random.Random(seed)
    first, span = (
        datetime.date(1950, 1, 1),
        (datetime.date(2049, 12, 31) - datetime.date(1950, 1, 1)).days,
    )
    rows = []
    for _ in range(count):
        date = first + datetime.timedelta(days=rng.randrange(span + 1))
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": INSTRUCTION},
                    {"role": "user", "content": free_form(date, rng)},
                    {"role": "assistant", "content": date.isoformat()},
                ]
            }
        )
    return rows
