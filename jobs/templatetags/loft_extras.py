"""Template filters for scores: a metric of a model's scores, shown the same way everywhere."""

from django import template

register = template.Library()

PERCENT_METRICS = {
    "exact_match",
    "normalized_exact_match",
    "rouge_l",
    "token_accuracy",
    "preference_accuracy",
    "reward_accuracy",
}


@register.filter
def metric(scores: dict, key: str) -> str:
    value = scores.get(key)
    if value is None:
        return "–"
    if key in PERCENT_METRICS:
        return f"{value:.1%}"
    return f"{value:.4g}"


@register.filter
def percent(value) -> str:
    return "–" if value is None else f"{value:.0%}"


@register.filter
def duration(seconds) -> str:
    """Seconds as a person reads them: 45 s, 3 min 20 s, 2 h 5 min; – for none."""
    if seconds is None:
        return "–"
    seconds = round(float(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@register.filter
def seconds_since(moment, now) -> float:
    """Seconds from ``moment`` to ``now``, for the duration filter."""
    return max(0.0, (now - moment).total_seconds())


@register.filter
def thousands(number) -> str:
    """1234567 → 1,234,567."""
    return f"{int(number or 0):,}"
