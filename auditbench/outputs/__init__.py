"""Output folders that never lose or mix data (docs/tables.md, "How a run writes its folder").

A run writes into ``PARENT/.OUT.partial-<run id>`` beside ``--out`` and moves the finished folder
into place at the end. An earlier auditbench run in ``OUT`` is replaced only then, and of its
files only those it wrote (listed, unchanged, in its manifest) are deleted: anything else that
was there is kept. ``PARENT/.OUT.lock`` refuses a second run on the same folder. summary.json lists
every file with its sha256 (the manifest); :func:`verify_run_folder` says whether a folder is
complete and of one run.

The manifest detects accidents (a stale file of an older run, a half-copied folder, an edit after
the run), not tampering: whoever can edit the files can edit summary.json too.
"""
from auditbench.outputs.files import (
    GALLERY_DIR, MODELS_DIR, PARTIAL_MARKER, PNG_PROTOCOL_KEY, PNG_RUN_KEY, PROTOCOL_FILE, REQUIRED_FILES, RUN_FILES,
    SUMMARY_FILE, OutputError, Say, build_manifest, file_sha256, is_run_folder, new_run_id, png_text, png_with_text,
    protocol_yaml, read_summary, refresh_manifest, seal, split_protocol_yaml, text_sha256, verify_run_folder,
    write_json_atomic, write_text_atomic,
)
from auditbench.outputs.lock import RunLock, lock_path, locked
from auditbench.outputs.staging import OutputTarget, prepare_output

__all__ = [
    "GALLERY_DIR", "MODELS_DIR", "PARTIAL_MARKER", "PNG_PROTOCOL_KEY", "PNG_RUN_KEY", "PROTOCOL_FILE", "REQUIRED_FILES",
    "RUN_FILES", "SUMMARY_FILE", "OutputError", "OutputTarget", "RunLock", "Say", "build_manifest", "file_sha256",
    "is_run_folder", "lock_path", "locked", "new_run_id", "png_text", "png_with_text", "prepare_output", "protocol_yaml",
    "read_summary", "refresh_manifest", "seal", "split_protocol_yaml", "text_sha256", "verify_run_folder",
    "write_json_atomic", "write_text_atomic",
]
