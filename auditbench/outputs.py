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
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import struct
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

try:  # POSIX; elsewhere the lock falls back to an exclusive create with a process check
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

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


def _files(folder: Path) -> Iterator[PurePosixPath]:
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
    for relative in sorted(_files(folder), key=str):
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
    for relative in _files(folder):
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


# ----- the lock ---------------------------------------------------------------------------------


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``PARENT/.OUT.lock``: held (``flock``) while a run or a re-render writes ``OUT``.

    The kernel drops the lock when its process ends, however it ends, so a lock file whose lock
    nobody holds is stale: it is reported and taken over. The file records pid, host, run id and
    start time for the message a second run gets."""

    def __init__(self, out: Path, run_id: str, say: Say):
        self.path = lock_path(out)
        self.out = out
        self.run_id = run_id
        self.say = say
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                if self._try_lock(fd):
                    # The file may have been removed by the holder between our open and our lock.
                    try:
                        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                    except FileNotFoundError:
                        same = False
                    if same:
                        break
                os.close(fd)
        except OutputError:
            raise
        except OSError as error:
            raise OutputError(f"cannot create the lock file {self.path}: {error.strerror or error}") from None
        self._fd = fd
        held = _read_lock(fd)
        if held:
            self.say(f"stale lock {self.path} of run {held.get('run_id', '?')} (pid {held.get('pid', '?')} on "
                     f"{held.get('host', '?')}, started {held.get('started', '?')}) whose process is gone: taken over")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)

    def _try_lock(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
        else:  # pragma: no cover - without flock: the recorded process must be gone
            held = _read_lock(fd)
            if not held or (held.get("host") == socket.gethostname() and not _process_alive(int(held.get("pid", 0)))):
                return True
        held = _read_lock(fd)
        os.close(fd)
        who = (f"run {held.get('run_id', '?')}, pid {held.get('pid', '?')} on {held.get('host', '?')}, "
               f"started {held.get('started', '?')}") if held else "unknown process"
        raise OutputError(f"another auditbench process ({who}) is writing {self.out}: wait for it to finish, "
                          f"or stop it (lock {self.path})")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def _read_lock(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {"pid": "?"}
    return data if isinstance(data, dict) else {"pid": "?"}


@contextmanager
def locked(out: Path | str, say: Say, run_id: str | None = None) -> Iterator[RunLock]:
    """Hold the lock of output folder ``out`` (whose parent must exist)."""
    lock = RunLock(Path(os.path.realpath(out)), run_id or new_run_id(), say)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


# ----- staging and replacing --------------------------------------------------------------------


@dataclass
class OutputTarget:
    """Where a run writes (``staging``) and where its folder goes at the end (``out``)."""

    out: Path
    staging: Path
    run_id: str
    previous: str  # "none" | "empty" | "run" | "foreign"
    say: Say
    committed: bool = False
    moving: bool = False
    kept: list[str] = field(default_factory=list)
    resumed: bool = False  # staging is an interrupted run's folder, taken over with its run id
    keep_staging: bool = False  # set by a run that stops with finished work to resume from

    def commit(self, model_ids: set[str]) -> None:
        """Move the finished staging folder to ``out``; then delete the replaced run's own files."""
        _fsync_tree(self.staging)
        (self.staging / PARTIAL_MARKER).unlink()
        self.moving = True  # from here on the staging folder is complete: never removed
        old = self.out.parent / f".{self.out.name}.previous-{self.run_id}"
        try:
            if self.previous in ("none", "empty"):
                os.rename(self.staging, self.out)
            elif exchange(self.staging, self.out):
                os.rename(self.staging, old)
            else:  # two renames: for a moment there is no folder at ``out``, never a mixed one
                os.rename(self.out, old)
                try:
                    os.rename(self.staging, self.out)
                except OSError:
                    os.rename(old, self.out)
                    raise
            _fsync_dir(self.out.parent)
        except OSError as error:
            raise OutputError(f"the run finished but could not be moved into {self.out} ({error.strerror or error}); "
                              f"its complete output is in {self.staging}") from None
        self.committed = True
        if self.previous in ("run", "foreign"):
            try:
                self._clear_previous(old, model_ids)
            except OSError as error:
                self.say(f"the new run is in {self.out}; the folder it replaced could not be cleared "
                         f"({error.strerror or error}) and is kept in {old}")

    def _clear_previous(self, old: Path, model_ids: set[str]) -> None:
        """Of the replaced folder: delete what its run wrote, move everything else that is not a
        result file (notes, a foreign folder under models/) into the new folder, keep the rest."""
        owned = _owned_files(old) if self.previous == "run" else set()
        for current, dirnames, filenames in os.walk(old):  # empty folders are someone's too: move them
            if Path(current) != old and not dirnames and not filenames:
                target = self.out / Path(current).relative_to(old)
                if not os.path.lexists(target):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(current, target)
        for relative in list(_files(old)):
            source = old / relative
            if str(relative) in owned:
                source.unlink()
                continue
            target = self.out / relative
            if is_result_path(relative, model_ids) or os.path.lexists(target):
                self.kept.append(str(relative))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, target)
        _remove_empty_dirs(old)
        if self.kept:
            shown = ", ".join(self.kept[:3]) + (f" and {len(self.kept) - 3} more" if len(self.kept) > 3 else "")
            self.say(f"kept in {old}: {len(self.kept)} file(s) of the replaced folder that auditbench did not write "
                     f"(or that changed since) and that would mix with this run's results: {shown}")


def _owned_files(folder: Path) -> set[str]:
    """Files of an earlier run that it wrote and that are unchanged: its manifest's files whose
    sha256 still matches, or for a run from before manifests its known file names."""
    summary = read_summary(folder) or {}
    manifest = summary.get("manifest")
    owned = {SUMMARY_FILE}
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        for name, entry in manifest["files"].items():
            path = folder / name
            expected = entry.get("sha256") if isinstance(entry, dict) else entry
            if ".." not in PurePosixPath(name).parts and path.is_file() and not path.is_symlink() \
                    and file_sha256(path) == expected:
                owned.add(name)
        return owned
    for relative in _files(folder):
        parts = relative.parts
        if len(parts) == 1 and parts[0] in RUN_FILES:
            owned.add(str(relative))
        elif len(parts) == 2 and parts[0] == GALLERY_DIR and parts[1].endswith(("__best.png", "__worst.png")):
            owned.add(str(relative))
        elif len(parts) == 3 and parts[0] == MODELS_DIR and parts[2] in LEGACY_CHECKPOINT_FILES:
            config = read_summary_like(folder / MODELS_DIR / parts[1] / "config.json")
            if config.get("model_id") == parts[1]:
                owned.add(str(relative))
    return owned


def _remove_empty_dirs(folder: Path) -> None:
    """Remove the folders that moving and deleting files emptied (and ``folder`` itself)."""
    for current, dirnames, filenames in os.walk(folder, topdown=False):
        try:
            os.rmdir(current)
        except OSError:
            pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for relative in _files(folder):
        path = folder / relative
        if path.is_symlink():
            continue
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    for current, _, _ in os.walk(folder):
        _fsync_dir(Path(current))


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _resolve_out(out: Path | str, make_parents: bool) -> Path:
    out = Path(os.path.realpath(Path(out).expanduser()))
    cwd = Path(os.path.realpath(Path.cwd()))
    if out == cwd or out in cwd.parents or out.parent == out or out == Path(os.path.realpath(Path.home())):
        raise OutputError(f"--out {out} is the working folder, one of its parents or the home folder; "
                          "give the run a folder of its own")
    parent = out.parent
    if not parent.exists():
        if not make_parents:
            raise OutputError(f"the parent folder {parent} of --out does not exist; create it first")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create the folder {parent}: {error.strerror or error}") from None
    if not parent.is_dir():
        raise OutputError(f"the parent {parent} of --out is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {parent} (the parent of --out): permission denied")
    return out


def _previous_kind(out: Path, overwrite: bool) -> str:
    if not os.path.lexists(out):
        return "none"
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return "empty"
    if is_run_folder(out):
        return "run"
    if overwrite:
        return "foreign"
    raise OutputError(f"--out {out} exists and is not an auditbench run folder (no summary.json written by "
                      "auditbench); choose another folder, or pass --overwrite to write into it (files "
                      "auditbench did not write are never deleted)")


def _stale_partials(out: Path, say: Say) -> list[Path]:
    """Staging folders of runs on ``out`` that stopped before their end (their lock is free: we hold it)."""
    prefix = f".{out.name}.partial-"
    stale = []
    for path in sorted(out.parent.iterdir()):
        if path.name.startswith(prefix) and path.is_dir() and not path.is_symlink():
            if (path / PARTIAL_MARKER).is_file():
                stale.append(path)
            else:
                say(f"left {path} alone: it looks like an unfinished run but holds no auditbench marker")
    return stale


Resume = Callable[[Path], "str | None"]
"""Given a stale staging folder, the run id to resume it under, or None (it is removed)."""


@contextmanager
def prepare_output(out: Path | str, overwrite: bool = False, say: Say | None = None, make_parents: bool = False,
                   run_id: str | None = None, resume: Resume | None = None) -> Iterator[OutputTarget]:
    """Check ``out``, take its lock and yield an :class:`OutputTarget` whose ``staging`` folder the
    run writes; the caller calls ``commit`` at the end. On any exception before that the staging
    folder is removed and ``out`` is left exactly as it was -- unless the run set ``keep_staging``
    (finished work to resume from).

    ``out`` may be absent, empty or an earlier auditbench run; any other folder is refused
    (:class:`OutputError`) unless ``overwrite``, and even then no file in it is deleted. ``resume``
    decides, for the staging folder of a run on ``out`` that stopped before its end, whether this
    run takes it over (``resumed``); the others are removed."""
    say = say or (lambda text: print(text, file=sys.stderr))
    run_id = run_id or new_run_id()
    path = _resolve_out(out, make_parents)
    with locked(path, say, run_id):
        previous = _previous_kind(path, overwrite)
        staging, resumed = None, False
        for stale in _stale_partials(path, say):
            resumed_id = resume(stale) if resume is not None and staging is None else None
            if resumed_id is not None:
                staging, run_id, resumed = stale, resumed_id, True
                continue
            say(f"removed {stale}: the unfinished output of a run that stopped before its end")
            shutil.rmtree(stale, ignore_errors=True)
        staging = staging or path.parent / f".{path.name}.partial-{run_id}"
        try:
            staging.mkdir(exist_ok=resumed)
            (staging / PARTIAL_MARKER).write_text(json.dumps({"run_id": run_id, "pid": os.getpid()}), encoding="utf-8")
        except OSError as error:
            if not resumed:
                shutil.rmtree(staging, ignore_errors=True)
            raise OutputError(f"cannot write in {path.parent}: {error.strerror or error}") from None
        target = OutputTarget(path, staging, run_id, previous, say, resumed=resumed)
        try:
            yield target
        finally:
            if not target.committed and not target.moving and not target.keep_staging:
                shutil.rmtree(staging, ignore_errors=True)


# ----- re-rendering -----------------------------------------------------------------------------


def rerender_report(out_dir: Path | str, say: Say | None = None) -> Path:
    """``auditbench report DIR``: re-render report.html from the folder's tables (under the folder's
    lock, written atomically) and record its new sha256 in summary.json's manifest, so that a
    folder that verified before still verifies. Raises ResultsError for unreadable tables."""
    from auditbench.report.html import REPORT_FILE, REPORT_FILES, render_files
    from auditbench.report.tables import read_tables

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
