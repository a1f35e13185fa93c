"""Writing a run's CSV files safely: text cells neutralised against spreadsheet formula injection
(OWASP "CSV injection"), restored exactly on reading, and every file ending with the run's provenance."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

PROVENANCE_COLUMNS = ["run_id", "protocol_sha256"]
"""Last two columns of every CSV a run writes: which run wrote the row, from which resolved protocol."""

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
"""A spreadsheet reads a cell starting with one of these as a formula (OWASP "CSV injection")."""
_QUOTE = "'"


def neutralise_cell(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, prefixed with a single quote (OWASP).

    Only ``str`` values change: numbers (a negative float too) stay numbers. A text cell that starts
    with the quote itself is quoted as well, so :func:`restore_cell` gives back every text exactly."""
    if isinstance(value, str) and value[:1] in (*FORMULA_PREFIXES, _QUOTE):
        return _QUOTE + value
    return value


def restore_cell(value: Any) -> Any:
    """The inverse of :func:`neutralise_cell` for cells read back from a CSV this package wrote."""
    if isinstance(value, str) and value.startswith(_QUOTE):
        return value[1:]
    return value


def is_text(values: pd.Series) -> bool:
    """Whether a column can hold text cells (object or a string dtype); numbers and booleans cannot."""
    return values.dtype == object or isinstance(values.dtype, pd.StringDtype) or pd.api.types.is_string_dtype(values.dtype)


def write_csv(frame: pd.DataFrame, path: Path | str, provenance: dict[str, str] | None = None) -> None:
    """The one CSV writer of a run: every text cell (and column name) neutralised against formula
    injection, and with ``provenance`` (``run_id``, ``protocol_sha256``) as the last columns."""
    frame = frame.copy()
    if provenance:
        frame = frame.drop(columns=[c for c in PROVENANCE_COLUMNS if c in frame.columns])
        for column in PROVENANCE_COLUMNS:
            frame[column] = str(provenance.get(column, ""))
    for column in frame.columns:
        if is_text(frame[column]):
            frame[column] = frame[column].map(neutralise_cell).astype(object)
    frame.columns = [neutralise_cell(str(c)) for c in frame.columns]
    frame.to_csv(path, index=False)
