"""Template filters for scores: a metric of a model's scores, shown the same way everywhere."""

from django import template

register = template.Library()

PERCENT_METRICS = {"exact_match", "normalized_exact_match", "rouge_l", "token_accuracy"}


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
