"""A second learnable rule, for continual training (rule A is tests/dates.py): times of day in
12-hour form → 24-hour HH:MM.

Every row asks for one time, written one of several ways ("7:45 pm", "quarter past 3 in the
afternoon", "11.05 a.m."), and the answer is that time as HH:MM and nothing else. Another
instruction than the dates', so that a model can hold both rules, and one that the base rarely
follows: exact match shows which adapters learned it and which forgot it. Generated from a seed.
"""

from __future__ import annotations

import random

INSTRUCTION = "Rewrite the time in 24-hour form as HH:MM."


def spoken(hour: int, minute: int, rng: random.Random) -> str:
    """The time ``hour``:``minute`` (0-23, 0-59) written in one of the 12-hour ways."""
    twelve = hour % 12 or 12
    meridiem = "am" if hour < 12 else "pm"
    forms = [
        f"{twelve}:{minute:02d} {meridiem}",
        f"{twelve}:{minute:02d} {meridiem.upper()}",
        f"{twelve}.{minute:02d} {meridiem[0]}.m.",
        f"{minute:02d} minutes past {twelve} {meridiem}",
    ]
    if minute == 0:
        forms.append(f"{twelve} o'clock {'in the morning' if hour < 12 else 'in the evening'}")
    return rng.choice(forms)


def time_rows(count: int, seed: int = 0) -> list[dict]:
    """``count`` chat rows, each a random time of day."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        hour, minute = rng.randrange(24), rng.choice([0, 5, 10, 15, 20, 30, 40, 45, 50, 55])
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": INSTRUCTION},
                    {"role": "user", "content": spoken(hour, minute, rng)},
                    {"role": "assistant", "content": f"{hour:02d}:{minute:02d}"},
                ]
            }
        )
    return rows
