"""Run-folder files: identity (run id, hashes, PNG text), summary and manifest, atomic writes, verification."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
import zlib
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator



SUMMARY_FILE = "summary.json"
PARTIAL_MARKER = ".auditbench-partial"
"""Written first into a staging folder: proof that auditbench made it (stale ones are removed)."""
GALLERY_DIR, MODELS_DIR = "gallery", "models"
PROTOCOL_FILE = "protocol.resolved.yaml"
REQUIRED_FILES = [PROTOCOL_FILE, "results.csv", "models.csv", "images.csv", "skipped.csv", "gallery.csv"]
"""Files every run writes (report.html only with report.html: true, validation.csv only on synthetic data)."""
PNG_RUN_KEY, PNG_PROTOCOL_KEY = "auditbench-run-id", "auditbench-protocol-sha256"
YAML_HEADER = "# auditbench run {run_id}; protocol_sha256 {digest} (sha256 of the lines below)\n"

# The files at the top of a run folder (docs/tables.md); also what a run from before manifests
# wrote there: deleted by name when such a run is replaced.
RUN_FILES = {
    "protocol.resolved.yaml", "results.csv", "models.csv", "images.csv", "validation.csv", "skipped.csv",
    "gallery.csv", "summary.json", "report.html", "model_card.md", "model_card.json", "sanity.csv",
}
LEGACY_CHECKPOINT_FILES = {"weights.safetensors", "config.json"}

Say = Callable[[str], None]


class OutputError(Exception):
    """The output folder cannot be used or verified; one line for the user (CLI exit code 2)."""


# ----- identity ---------------------------------------------------------------------------------


def new_run_id() -> str:
    """A unique run id, sortable by time: ``20261203T101500Z-1a2b3c4d``."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def protocol_yaml(text: str, run_id: str) -> tuple[str, str]:
    """protocol.resolved.yaml's content (a header comment naming the run and the protocol hash,
    then ``text``) and the protocol hash, the sha256 of ``text``."""
    digest = text_sha256(text)
    return YAML_HEADER.format(run_id=run_id, digest=digest) + text, digest


def split_protocol_yaml(text: str) -> tuple[str | None, str | None, str]:
    """(run id, declared protocol hash, body) of a protocol.resolved.yaml; None, None where it has no header."""
    first, newline, body = text.partition("\n")
    prefix = "# auditbench run "
    if not first.startswith(prefix) or "; protocol_sha256 " not in first:
        return None, None, text
    run_id, _, rest = first[len(prefix):].partition("; protocol_sha256 ")
    return run_id.strip(), rest.split(" ", 1)[0].strip(), body


def png_with_text(png: bytes, text: dict[str, str]) -> bytes:
    """``png`` with tEXt chunks (Latin-1 key/value) inserted after its header chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    end = 8 + 12 + struct.unpack(">I", png[8:12])[0]
    chunks = b""
    for key, value in text.items():
        data = key.encode("latin-1") + b"\0" + value.encode("latin-1")
        chunks += struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:end] + chunks + png[end:]


def png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG file (empty where it has none or is not a PNG)."""
    data = path.read_bytes()
    out: dict[str, str] = {}
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return out
    position = 8
    while position + 8 <= len(data):
        length = struct.unpack(">I", data[position:position + 4])[0]
        kind = data[position + 4:position + 8]
        if kind == b"tEXt":
            key, _, value = data[position + 8:position + 8 + length].partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        if kind == b"IDAT" or kind == b"IEND":
            break
        position += 12 + length
    return out


# ----- run folders ------------------------------------------------------------------------------


def read_summary(folder: Path) -> dict[str, Any] | None:
    """summary.json of a folder as a dict; None where absent or not a JSON object."""
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an auditbench run: a summary.json that auditbench wrote."""
    summary = read_summary(folder)
    return summary is not None and "auditbench_version" in summary


def is_result_path(relative: str | PurePosixPath, model_ids: set[str]) -> bool:
    """Whether a file at this place in a run folder is a result file: a file a run writes at the top
    (:data:`RUN_FILES`) or any other table (``*.csv``) there, anything under gallery/, a file of a
    checkpoint folder of one of ``model_ids``. Hidden files (``.DS_Store``), notes, a policy file, a
    folder of someone else's under models/ are not."""
    parts = PurePosixPath(relative).parts
    if not parts or any(p.startswith(".") for p in parts):
        return False
    if len(parts) == 1:
        return parts[0] in RUN_FILES or PurePosixPath(parts[0]).suffix.lower() == ".csv"
    if parts[0] == GALLERY_DIR:
        return True
    return parts[0] == MODELS_DIR and len(parts) >= 3 and parts[1] in model_ids


def walk_files(folder: Path) -> Iterator[PurePosixPath]:
    """Every non-folder entry under ``folder`` (symbolic links are entries, never followed)."""
    stack = [folder]
    while stack:
        current = stack.pop()
        with os.scandir(current) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    yield PurePosixPath(Path(entry.path).relative_to(folder).as_posix())


def build_manifest(folder: Path) -> dict[str, Any]:
    """sha256 and size of every file of a folder that auditbench wrote alone (a run's staging
    folder), summary.json and the staging marker excepted."""
    files = {}
    for relative in sorted(walk_files(folder), key=str):
        if str(relative) in (SUMMARY_FILE, PARTIAL_MARKER):
            continue
        path = folder / relative
        files[str(relative)] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return {"algorithm": "sha256", "files": files}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file beside ``path`` and an atomic replace."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def refresh_manifest(folder: Path, names: list[str]) -> bool:
    """After ``names`` were rewritten in place (``auditbench report`` re-renders report.html),
    record their new sha256 in summary.json's manifest. False where the folder has no manifest."""
    summary = read_summary(folder)
    if summary is None or not isinstance(summary.get("manifest"), dict):
        return False
    files = summary["manifest"].setdefault("files", {})
    for name in names:
        path = folder / name
        files[name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    summary["manifest"]["files"] = dict(sorted(files.items()))
    write_json_atomic(folder / SUMMARY_FILE, summary)
    return True


def seal(folder: Path | str) -> dict[str, Any]:
    """Add the manifest of every file now in ``folder`` to its summary.json; return the summary.
    For folders that hold one run and nothing else (a run's staging folder, a test's hand-made run)."""
    folder = Path(folder)
    summary = read_summary(folder)
    if summary is None:
        raise OutputError(f"{folder / SUMMARY_FILE} is missing or not a JSON object")
    summary["manifest"] = build_manifest(folder)
    write_json_atomic(folder / SUMMARY_FILE, summary)
    return summary


# ----- verification -----------------------------------------------------------------------------


def verify_run_folder(folder: Path | str, model_ids: set[str] | None = None,
                      provenance: dict[str, set[tuple[str, str]]] | None = None, hashes: bool = True) -> list[str]:
    """Problems that make ``folder`` not one complete run, each naming its file; [] when none.

    Every file of summary.json's manifest must be there with its sha256; no result file
    (:func:`is_result_path`, with ``model_ids`` from models.csv) may be there unlisted (a stale
    validation.csv of an older run, say); every CSV row (``provenance``, from
    :func:`auditbench.report.tables.read_tables`), checkpoint config, gallery PNG and the protocol
    file must name the run of summary.json. ``hashes=False``: only what needs no file contents (a
    second pass once models.csv and the rows' provenance are read)."""
    folder = Path(folder)
    summary = read_summary(folder)
    if summary is None:
        return [f"{folder / SUMMARY_FILE} is missing or not a JSON object"]
    run_id, digest = summary.get("run_id"), summary.get("protocol_sha256")
    manifest = summary.get("manifest")
    if not run_id or not digest or not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return [f"{folder / SUMMARY_FILE} has no run_id, protocol_sha256 and manifest (written by auditbench before "
                "0.1.0's manifests, or by hand): whether the folder is complete and of one run cannot be "
                "verified; run it again"]
    listed: dict[str, Any] = manifest["files"]
    problems = [f"{folder / name}: missing (every run writes it; not in the manifest of run {run_id})"
                for name in REQUIRED_FILES if name not in listed]
    for name, entry in listed.items():
        path = folder / name
        expected = entry.get("sha256") if isinstance(entry, dict) else entry
        if ".." in PurePosixPath(name).parts or PurePosixPath(name).is_absolute():
            problems.append(f"{folder / SUMMARY_FILE}: manifest entry {name!r} points outside the folder")
        elif not path.is_file():
            problems.append(f"{path}: missing (listed in the manifest of run {run_id})")
        elif hashes and file_sha256(path) != expected:
            problems.append(f"{path}: sha256 differs from the manifest of run {run_id} (changed after the run wrote it)")
    ids = set(model_ids or ()) | {PurePosixPath(n).parts[1] for n in listed
                                   if PurePosixPath(n).parts[:1] == (MODELS_DIR,) and len(PurePosixPath(n).parts) >= 3}
    for relative in walk_files(folder):
        name = str(relative)
        if name != SUMMARY_FILE and name not in listed and is_result_path(relative, ids):
            problems.append(f"{folder / name}: result file not written by run {run_id} (not in its manifest; "
                            "left by another run?)")
    for name, pairs in (provenance or {}).items():
        other = sorted({f"{r} / {d[:12]}" for r, d in pairs if (r, d) != (run_id, digest)})
        if other:
            problems.append(f"{folder / name}: rows of run/protocol {', '.join(other)}, not of run {run_id} / "
                            f"{digest[:12]} (summary.json)")
    if not hashes:
        return problems
    protocol = folder / PROTOCOL_FILE
    if protocol.is_file():
        declared_run, declared_digest, body = split_protocol_yaml(protocol.read_text(encoding="utf-8"))
        if declared_run != run_id or declared_digest != digest or text_sha256(body) != digest:
            problems.append(f"{protocol}: header or content does not match run {run_id}, protocol_sha256 {digest[:12]}")
    for name in listed:
        parts = PurePosixPath(name).parts
        path = folder / name
        if not path.is_file():
            continue
        if parts[:1] == (MODELS_DIR,) and parts[-1] == "config.json":
            config = read_summary_like(path)
            if config.get("run_id") != run_id or config.get("protocol_sha256") != digest:
                problems.append(f"{path}: checkpoint of run {config.get('run_id')!r}, not of run {run_id}")
        elif parts[:1] == (GALLERY_DIR,) and name.lower().endswith(".png"):
            if png_text(path).get(PNG_RUN_KEY) != run_id:
                problems.append(f"{path}: gallery image not of run {run_id}")
    return problems


def read_summary_like(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

