"""Cells of the result tables as display text: numbers formatted, blanks and NaN made explicit.

Shared by the HTML sections, the findings and the model card, so that one number reads the same
everywhere. Nothing here escapes: HTML escaping is the template's (autoescape), Markdown escaping is
:func:`auditbench.report.model_card_markdown.md`'s.
"""
from __future__ import annotations

import base64
import math
from typing import Any

import pandas as pd


def number(value: Any) -> float:
    """``value`` as a float; NaN for blanks, text and None."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def isnan(value: Any) -> bool:
    return math.isnan(number(value))


def nanmean(values: list[Any]) -> float:
    numbers = [number(v) for v in values if not isnan(v)]
    return sum(numbers) / len(numbers) if numbers else math.nan


def fmt(value: Any, digits: int = 3, signed: bool = False) -> str:
    value = number(value)
    if math.isnan(value):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_int(value: Any) -> str:
    value = number(value)
    return "n/a" if math.isnan(value) else str(int(round(value)))


def percent(rate: Any) -> str:
    rate = number(rate)
    return "n/a" if math.isnan(rate) else f"{100 * rate:.0f}%"


def text(value: Any) -> str:
    """Display text of a cell; blanks and NaN become ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def items(value: Any) -> list[str]:
    """The ``;``-separated entries of a text cell (violations, unverified, not_applicable)."""
    return [v.strip() for v in text(value).split(";") if v.strip()]


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def pairs(mapping: Any, raw: bool = False) -> list[tuple[str, Any]]:
    """(key, value) of a summary.json mapping as text; [] when it is not a mapping."""
    if not isinstance(mapping, dict):
        return []
    return [(text(k), v if raw else text(v)) for k, v in mapping.items()]


def arrow(higher: bool | None) -> str:
    return "" if higher is None else ("↑" if higher else "↓")


def direction_words(higher: bool | None) -> str:
    return "" if higher is None else ("higher is better" if higher else "lower is better")


def interval(low: Any, high: Any, signed: bool = False, digits: int = 2) -> str:
    """``[low, high]``; "" where either end is undefined."""
    if isnan(low) or isnan(high):
        return ""
    return f"[{fmt(low, digits, signed)}, {fmt(high, digits, signed)}]"


def ci(row: pd.Series, metric: str, digits: int = 2) -> str:
    """``[low, high]`` from models.csv's ``<metric>_ci_low``/``_ci_high``; "" where absent or NaN."""
    return interval(row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high"), digits=digits)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
