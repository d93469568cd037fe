"""The promotion gate (jobs/promotion.py) on numbers alone: a candidate moves an alias only with
a gain whose paired-bootstrap interval lies above zero on some file, no file dropping past the
tolerance, and few probes lost; and the same numbers always give the same verdict."""

import random

import pytest

from jobs.promotion import FileScores, Limits, ProbeHits, gate, metric_for, paired_bootstrap

LIMITS = Limits(max_drop=0.02, max_probes_lost=0.10, samples=2000)


def rows(values: list[float]) -> dict[str, list[float]]:
    """Per-row values as a custom evaluation keeps them: exact match and ROUGE-L alike."""
    return {"normalized_exact_match": values, "rouge_l": values, "exact_match": values}


def matches(count: int, hits: int, seed: int = 0) -> list[float]:
    """``count`` rows of which ``hits``, scattered, are right."""
    right = set(random.Random(seed).sample(range(count), hits))
    return [1.0 if i in right else 0.0 for i in range(count)]


def file(name: str, current: list[float], candidate: list[float]) -> FileScores:
    return FileScores(name, rows(current), rows(candidate))


def all_answered(count: int = 20) -> ProbeHits:
    return ProbeHits([True] * count, [True] * count, [f"probe {i}" for i in range(count)])


def test_a_clear_gain_on_a_file_passes_with_its_interval_above_zero():
    current = matches(40, 10)
    candidate = [1.0] * 36 + [0.0] * 4
    report = gate([file("dates.jsonl", current, candidate)], all_answered(), LIMITS)
    assert report["passed"] is True, report["reasons"]
    entry = report["files"][0]
    assert entry["rows"] == 40 and entry["metric"] == "normalized_exact_match"
    assert entry["current"] == 0.25 and entry["candidate"] == 0.9
    assert entry["gain"] == pytest.approx(0.65)
    low, high = entry["interval"]
    assert 0 < low < 0.65 < high
    assert entry["significant"] is True and entry["dropped"] is False
    assert report["probes"]["lost"] == 0
    assert "dates.jsonl" in report["reasons"][0] and "interval" in report["reasons"][0]


def test_a_gain_whose_interval_crosses_zero_is_refused():
    current = matches(20, 10, seed=1)
    candidate = list(current)
    candidate[current.index(0.0)] = 1.0  # one row better in twenty: could be luck
    report = gate([file("small.jsonl", current, candidate)], all_answered(), LIMITS)
    entry = report["files"][0]
    assert entry["gain"] == pytest.approx(0.05)
    assert entry["interval"][0] <= 0 < entry["interval"][1]
    assert entry["significant"] is False
    assert report["passed"] is False
    assert "No eval file shows a gain" in report["reasons"][0]
    assert "small.jsonl" in report["reasons"][0] and "interval" in report["reasons"][0]


def test_a_drop_beyond_the_tolerance_on_a_second_file_is_refused():
    gained = file("dates.jsonl", matches(40, 8), [1.0] * 40)
    dropped = file("other.jsonl", [1.0] * 40, [1.0] * 36 + [0.0] * 4)  # 1.0 → 0.9
    report = gate([gained, dropped], all_answered(), LIMITS)
    assert report["files"][0]["significant"] is True
    assert report["files"][1]["dropped"] is True
    assert report["passed"] is False
    assert report["reasons"] == [
        "On other.jsonl the normalized exact match drops by 0.100 (from 1.000 to 0.900), "
        "more than the 0.02 allowed."
    ]


def test_a_drop_within_the_tolerance_is_allowed():
    gained = file("dates.jsonl", matches(40, 8), [1.0] * 40)
    steady = file("other.jsonl", [1.0] * 100, [1.0] * 99 + [0.0])  # 1.00 → 0.99
    report = gate([gained, steady], all_answered(), LIMITS)
    assert report["files"][1]["dropped"] is False
    assert report["passed"] is True, report["reasons"]


def test_probes_lost_beyond_the_share_are_refused_by_name():
    gained = file("dates.jsonl", matches(40, 8), [1.0] * 40)
    prompts = [f"What is the capital of country {i}?" for i in range(20)]
    probes = ProbeHits([True] * 20, [False] * 3 + [True] * 17, prompts)  # 3 of 20 = 15 %
    report = gate([gained], probes, LIMITS)
    assert report["probes"] == {
        "count": 20,
        "current_answered": 1.0,
        "candidate_answered": 0.85,
        "lost": 3,
        "lost_share": 0.15,
        "lost_prompts": prompts[:3],
    }
    assert report["passed"] is False
    assert "fails 3 of the 20 general probes" in report["reasons"][0]
    assert prompts[0] in report["reasons"][0]
    # Two lost of twenty (10 %) is within the share; probes the current one missed do not count.
    probes = ProbeHits([True] * 18 + [False] * 2, [False] * 4 + [True] * 16, prompts)
    assert gate([gained], probes, LIMITS)["probes"]["lost"] == 4
    probes = ProbeHits([True] * 2 + [False] * 18, [False] * 20, prompts)
    assert gate([gained], probes, LIMITS)["passed"] is True


def test_the_verdict_is_reproducible_and_the_interval_is_seeded():
    current, candidate = matches(30, 12, seed=3), matches(30, 18, seed=4)
    first = gate([file("a.jsonl", current, candidate)], all_answered(), LIMITS)
    again = gate([file("a.jsonl", current, candidate)], all_answered(), LIMITS)
    assert first == again
    gains = [b - a for a, b in zip(current, candidate, strict=True)]
    assert paired_bootstrap(gains, 2000) == paired_bootstrap(gains, 2000)
    assert paired_bootstrap(gains, 2000, seed=1) != paired_bootstrap(gains, 2000, seed=2)


def test_rouge_l_judges_when_neither_adapter_matched_a_single_reference():
    current = {"normalized_exact_match": [0.0] * 30, "rouge_l": [0.2] * 30}
    candidate = {"normalized_exact_match": [0.0] * 30, "rouge_l": [0.6] * 30}
    assert metric_for(current, candidate) == "rouge_l"
    report = gate([FileScores("free.jsonl", current, candidate)], None, LIMITS)
    assert report["files"][0]["metric"] == "rouge_l"
    assert report["passed"] is True and report["probes"] is None


def test_rows_that_differ_in_number_cannot_be_paired():
    with pytest.raises(ValueError, match="same rows"):
        gate([file("a.jsonl", [1.0] * 3, [1.0] * 4)], None, LIMITS)


def test_preference_accuracy_judges_on_a_preference_file_whatever_the_answers_matched():
    """A DPO adapter is judged on the pairs it ranks right (worker/evaluations.py keeps, on a
    preference file, whether each pair's preferred answer was the likelier)."""
    current = {**rows(matches(40, 30)), "preference_accuracy": matches(40, 20, seed=2)}
    candidate = {**rows(matches(40, 10)), "preference_accuracy": [1.0] * 38 + [0.0] * 2}
    assert metric_for(current, candidate) == "preference_accuracy"
    report = gate([FileScores("pairs.jsonl", current, candidate)], None, LIMITS)
    entry = report["files"][0]
    assert entry["metric"] == "preference_accuracy" and entry["candidate"] == 0.95
    assert report["passed"] is True
    assert "preference accuracy" in report["reasons"][0]
    worse = gate([FileScores("pairs.jsonl", candidate, current)], None, LIMITS)
    assert worse["passed"] is False and "preference accuracy drops" in " ".join(worse["reasons"])
