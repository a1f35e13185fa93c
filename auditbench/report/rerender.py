"""``auditbench report DIR``: re-render a run folder's report from its tables."""
from __future__ import annotations

import sys
from pathlib import Path

from auditbench.outputs import (
    OutputError, Say, locked, read_summary, refresh_manifest, verify_run_folder, write_text_atomic,
)
from auditbench.report.html import REPORT_FILE, REPORT_FILES, render_files
from auditbench.report.tables import read_tables


def rerender_report(out_dir: Path | str, say: Say | None = None) -> Path:
    """``auditbench report DIR``: re-render report.html from the folder's tables (under the folder's
    lock, written atomically) and record its new sha256 in summary.json's manifest, so that a
    folder that verified before still verifies. Raises ResultsError for unreadable tables."""
    say = say or (lambda text: print(text, file=sys.stderr))
    folder = Path(out_dir)
    if not folder.is_dir():
        raise OutputError(f"results folder {folder} does not exist or is not a folder")
    with locked(folder, say):
        tables = read_tables(folder)
        summary = read_summary(folder) or {}
        if isinstance(summary.get("manifest"), dict):
            problems = [p for p in verify_run_folder(folder, set(tables.models["model_id"].astype(str)), tables.provenance)
                        if not any(p.startswith(str(folder / name)) for name in REPORT_FILES)]
            if problems:
                say(f"warning: {folder} is not one complete run ({problems[0]}); report.html and the model card "
                    "re-rendered anyway, and `auditbench check` will refuse the folder")
        for name, content in render_files(tables).items():
            write_text_atomic(folder / name, content)
        refresh_manifest(folder, list(REPORT_FILES))
    return folder / REPORT_FILE
