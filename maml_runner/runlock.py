"""One writer per run directory: `<dir>/.maml-run.lock`, held with `fcntl.flock` while a process trains or tests
into the directory (or, for a sweep, runs jobs under it).

The lock belongs to the open file, not to the file's existence: the kernel drops it when the holder exits, however
it exits (kill -9 included), so a stale lock cannot outlive its process. The file holds the holder's pid as text,
for the message the next process prints. A process that already holds a directory may take it again (an ablation
trains into sub-directories of the directory it holds, tests call `train.run` repeatedly): a per-process registry
counts those holds, because a second `open` + `flock` of the same file in the same process would conflict with the
first.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError

LOCK_NAME = ".maml-run.lock"

_registry: dict[str, list[int]] = {}  # real path of the directory -> [fd of its lock file, number of holds]
_registry_mutex = threading.Lock()


class DirectoryInUse(UserError):
    """Another process holds the run directory."""

    def __init__(self, directory: Path, pid: int | None):
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"run directory '{directory}' is in use by another maml-run ({holder}); wait for it to "
                         f"finish, or write somewhere else (hydra.run.dir=..., hydra.sweep.dir=... with -m)")
        self.directory, self.pid = directory, pid


def _read_pid(fd: int) -> int | None:
    # The holder writes its pid right after taking the lock: a reader arriving in between sees an empty file.
    for _ in range(20):
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if text:
            return int(text) if text.isdigit() else None
        time.sleep(0.01)
    return None


def _lock_file(directory: Path) -> int:
    """Open and flock `directory/LOCK_NAME`; the fd on success, DirectoryInUse if another process holds it."""
    path = directory / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise DirectoryInUse(directory, pid) from None
        except BaseException:
            os.close(fd)
            raise
        # A holder that released removes the file while still holding it; if that happened between our open and
        # flock we locked a file nobody else will look at: take the one now at `path` instead.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def acquire(directory: str | Path) -> Path:
    """Hold `directory` for this process (creating it); a no-op but for a count if this process holds it already.

    Raises DirectoryInUse (a UserError: one line, exit 2) naming the directory and the holder's pid; nothing is
    written into the directory then.
    """
    directory = Path(os.path.abspath(directory))
    directory.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(directory)
    with _registry_mutex:
        if key in _registry:
            _registry[key][1] += 1
        else:
            _registry[key] = [_lock_file(directory), 1]
    return directory / LOCK_NAME


def release(directory: str | Path) -> None:
    """Undo one `acquire`; the last one removes the lock file and drops the lock."""
    key = os.path.realpath(os.path.abspath(directory))
    with _registry_mutex:
        entry = _registry.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _registry[key]
        try:  # removed while still locked, so no other process can be holding this file (see _lock_file)
            os.unlink(os.path.join(key, LOCK_NAME))
        except OSError:
            pass
        os.close(entry[0])


@contextmanager
def hold(directory: str | Path) -> Iterator[Path]:
    acquire(directory)
    try:
        yield Path(directory)
    finally:
        release(directory)


def held() -> list[str]:
    """The directories this process holds (real paths)."""
    with _registry_mutex:
        return sorted(_registry)


try:  # the Hydra callback; Hydra is a dependency, but keep this module importable on its own
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


class Refused(BaseException):
    """Carries DirectoryInUse past Hydra, which turns a callback's Exception into a warning and runs the job anyway.
    `cli.main` unwraps it and prints the one line."""

    def __init__(self, error: UserError):
        super().__init__(str(error))
        self.error = error


class RunLockCallback(Callback):
    """Holds the run directory (the sweep directory with -m) from before Hydra writes `.hydra/` and `cli.log` into it
    until the run ends, so a second maml-run aimed at it stops before writing anything there."""

    def __init__(self) -> None:
        self._held: str | None = None

    def _acquire(self, config, key: str) -> None:
        try:
            directory = os.path.abspath(str(config.hydra[key].dir))  # ${now:...} is cached: the dir Hydra will use
        except Exception:  # noqa: BLE001 - an interpolation only Hydra's job setup can resolve: train.run locks
            return
        try:
            acquire(directory)
        except DirectoryInUse as exc:
            raise Refused(exc) from None
        except OSError:  # cannot create it: Hydra's own attempt reports that as one line
            return
        self._held = directory

    def _release(self) -> None:
        if self._held is not None:
            release(self._held)
            self._held = None

    def on_run_start(self, config, **kwargs) -> None:
        self._acquire(config, "run")

    def on_run_end(self, config, **kwargs) -> None:
        self._release()

    def on_multirun_start(self, config, **kwargs) -> None:
        self._acquire(config, "sweep")

    def on_multirun_end(self, config, **kwargs) -> None:
        self._release()
