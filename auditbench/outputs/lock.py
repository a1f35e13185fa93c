"""The lock beside an output folder: one run (or re-render) at a time per folder."""
from __future__ import annotations

import errno
import json
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

try:  # POSIX; elsewhere the lock falls back to an exclusive create with a process check
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from auditbench.outputs.files import OutputError, Say, new_run_id


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

