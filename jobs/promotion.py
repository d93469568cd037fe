"""The promotion gate: does a candidate adapter earn an alias over the adapter it points at now?

Pure and torch-free (the web runs it): it takes numbers a worker measured — per eval file, both
adapters' scores row by row on the same rows (worker/evaluations.py), and both adapters' hits
on the forgetting probes — and returns a verdict with its evidence. The alias's side (finding the
evaluations, recording the move) is ``Alias.promote`` in jobs/models/aliases.py.

The rule, all three parts needed:

- **a real gain somewhere**: on at least one file, the paired-bootstrap 95 % interval of the
  mean per-row gain (candidate − current) lies above zero. Paired, because both adapters
  answered the same rows: resampling rows, not adapters, removes the rows' own difficulty from
  the noise, so a gain of a few rows in 50 can be told from luck;
- **no loss anywhere**: on no file does the mean score drop by more than ``max_drop`` (absolute);
- **little forgetting**: of the probes (general questions, engine/probes.jsonl), the share that
  the current adapter answers and the candidate does not is at most ``max_probes_lost``.

The bootstrap is seeded, so the same numbers always give the same verdict.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# The generation metrics a custom evaluation records per row (engine/evaluate.py::per_row), and
# on a preference file whether each pair's preferred answer was the likelier.
EXACT, ROUGE = "normalized_exact_match", "rouge_l"
PREFERENCE = "preference_accuracy"
BOOTSTRAP_SEED = 20261206
CONFIDENCE = 0.95


@dataclass
class FileScores:
    """One pinned eval file: each adapter's per-row values of every generation metric, on the
    same rows in the same order (``{"normalized_exact_match": [...], "rouge_l": [...]}``)."""

    file: str
    current: dict[str, list[float]]
    candidate: dict[str, list[float]]
    evaluation: str = ""


@dataclass
class ProbeHits:
    """Which probes each adapter answered (one bool per probe, same order), and the prompts."""

    current: list[bool]
    candidate: list[bool]
    prompts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Limits:
    max_drop: float = 0.02
    max_probes_lost: float = 0.10
    samples: int = 2000
    seed: int = BOOTSTRAP_SEED

    @classmethod
    def from_settings(cls) -> Limits:
        from django.conf import settings

        return cls(
            max_drop=settings.LOFT_PROMOTION_MAX_DROP,
            max_probes_lost=settings.LOFT_PROMOTION_MAX_PROBES_LOST,
            samples=settings.LOFT_PROMOTION_BOOTSTRAP_SAMPLES,
        )


def metric_for(current: dict[str, list[float]], candidate: dict[str, list[float]]) -> str:
    """The metric the evaluation judges by (as engine/evaluate.py::verdict): on a preference
    file preference accuracy (DPO adapters are judged on it); else normalized exact match, or
    ROUGE-L when neither adapter matched a single reference."""
    if current.get(PREFERENCE) is not None and candidate.get(PREFERENCE) is not None:
        return PREFERENCE
    matched = sum(current.get(EXACT) or []) + sum(candidate.get(EXACT) or [])
    return EXACT if matched > 0 else ROUGE


def paired_bootstrap(
    gains: list[float], samples: int, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """The percentile interval (``CONFIDENCE``) of the mean of ``gains``, resampling rows with
    replacement ``samples`` times with a fixed seed."""
    count = len(gains)
    rng = random.Random(seed)
    rows = range(count)
    means = sorted(
        sum(gains[i] for i in rng.choices(rows, k=count)) / count for _ in range(samples)
    )
    tail = (1 - CONFIDENCE) / 2
    return _percentile(means, tail), _percentile(means, 1 - tail)


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def compare_file(scores: FileScores, limits: Limits) -> dict:
    """One file's part of the report: both means on the judged metric, the gain, its interval,
    whether the gain is significant (interval above zero) and whether the score dropped more
    than allowed."""
    metric = metric_for(scores.current, scores.candidate)
    current, candidate = scores.current.get(metric) or [], scores.candidate.get(metric) or []
    if len(current) != len(candidate):
        raise ValueError(
            f"{scores.file}: the adapters were scored on {len(current)} and {len(candidate)} "
            "rows; a paired comparison needs the same rows."
        )
    rows = len(current)
    entry = {"file": scores.file, "evaluation": scores.evaluation, "rows": rows, "metric": metric}
    if not rows:
        return {
            **entry,
            "current": None,
            "candidate": None,
            "gain": None,
            "interval": None,
            "significant": False,
            "dropped": False,
        }
    gains = [b - a for a, b in zip(current, candidate, strict=True)]
    mean_current, mean_candidate = sum(current) / rows, sum(candidate) / rows
    low, high = paired_bootstrap(gains, limits.samples, limits.seed)
    gain = mean_candidate - mean_current
    return {
        **entry,
        "current": mean_current,
        "candidate": mean_candidate,
        "gain": gain,
        "interval": [low, high],
        "significant": low > 0,
        "dropped": -gain > limits.max_drop + 1e-12,
    }


def compare_probes(probes: ProbeHits | None) -> dict | None:
    if probes is None or not probes.current:
        return None
    if len(probes.current) != len(probes.candidate):
        raise ValueError("The adapters were asked different numbers of probes.")
    lost = [
        i for i, (was, now) in enumerate(zip(probes.current, probes.candidate, strict=True))
        if was and not now
    ]  # fmt: skip
    count = len(probes.current)
    return {
        "count": count,
        "current_answered": sum(probes.current) / count,
        "candidate_answered": sum(probes.candidate) / count,
        "lost": len(lost),
        "lost_share": len(lost) / count,
        "lost_prompts": [probes.prompts[i] for i in lost if i < len(probes.prompts)],
    }


def gate(files: list[FileScores], probes: ProbeHits | None, limits: Limits | None = None) -> dict:
    """The verdict on a candidate, with its evidence: ``{files: [...], probes, passed,
    reasons}``. ``reasons`` are sentences: why it was refused, or what earned the move.
    ``limits``: the settings' (``Limits.from_settings``) when not given."""
    limits = limits or Limits.from_settings()
    compared = [compare_file(scores, limits) for scores in files]
    forgetting = compare_probes(probes)
    refusals: list[str] = []
    significant = [entry for entry in compared if entry["significant"]]
    if not significant:
        shown = "; ".join(_described(entry) for entry in compared) or "no eval file"
        refusals.append(
            "No eval file shows a gain whose 95 % interval lies above zero "
            f"({shown}): the candidate is not shown to be better."
        )
    for entry in compared:
        if entry["dropped"]:
            refusals.append(
                f"On {entry['file']} the {_metric_name(entry['metric'])} drops by "
                f"{-entry['gain']:.3f} (from {entry['current']:.3f} to {entry['candidate']:.3f}), "
                f"more than the {limits.max_drop:g} allowed."
            )
    if forgetting and forgetting["lost_share"] > limits.max_probes_lost + 1e-12:
        refusals.append(
            f"The candidate fails {forgetting['lost']} of the {forgetting['count']} general "
            f"probes that the current adapter answers ({forgetting['lost_share']:.0%}), more "
            f"than the {limits.max_probes_lost:.0%} allowed: "
            + "; ".join(repr(p) for p in forgetting["lost_prompts"][:5])
            + "."
        )
    passed = not refusals
    reasons = refusals or [
        f"A gain on {entry['file']}: {_described(entry)}." for entry in significant
    ]
    return {
        "passed": passed,
        "reasons": reasons,
        "files": compared,
        "probes": forgetting,
        "limits": {
            "max_drop": limits.max_drop,
            "max_probes_lost": limits.max_probes_lost,
            "bootstrap_samples": limits.samples,
            "seed": limits.seed,
            "confidence": CONFIDENCE,
        },
    }


def _metric_name(metric: str) -> str:
    return {EXACT: "normalized exact match", PREFERENCE: "preference accuracy"}.get(
        metric, "ROUGE-L"
    )


def _described(entry: dict) -> str:
    if not entry["rows"]:
        return f"{entry['file']}: no rows with an answer to compare"
    low, high = entry["interval"]
    return (
        f"{entry['file']} {_metric_name(entry['metric'])} {entry['current']:.3f} → "
        f"{entry['candidate']:.3f}, gain {entry['gain']:+.3f}, 95 % interval "
        f"[{low:+.3f}, {high:+.3f}] over {entry['rows']} rows"
    )
