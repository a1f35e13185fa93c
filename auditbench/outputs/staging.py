"""Staging beside --out and replacing an earlier run: only files auditbench wrote are ever removed."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator


from auditbench.outputs.files import (
    GALLERY_DIR, LEGACY_CHECKPOINT_FILES, MODELS_DIR, PARTIAL_MARKER, RUN_FILES, SUMMARY_FILE, OutputError, Say,
    file_sha256, is_result_path, is_run_folder, new_run_id, read_summary, read_summary_like, walk_files,
)
from auditbench.outputs.lock import locked


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
        owned = _ownedwalk_files(old) if self.previous == "run" else set()
        for current, dirnames, filenames in os.walk(old):  # empty folders are someone's too: move them
            if Path(current) != old and not dirnames and not filenames:
                target = self.out / Path(current).relative_to(old)
                if not os.path.lexists(target):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(current, target)
        for relative in list(walk_files(old)):
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


def _ownedwalk_files(folder: Path) -> set[str]:
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
    for relative in walk_files(folder):
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
    for relative in walk_files(folder):
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

