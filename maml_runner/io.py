"""Atomic file writes: a reader never sees a half-written checkpoint or table (temp file + fsync + rename)."""
from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (a crash right after it must not bring back the old file)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories; the data itself is already synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write `path` through a temp file in the same directory, fsync it, then rename it over `path`.

    A crash or kill at any moment leaves either the old complete file or the new complete one. OS errors
    (read-only or full disk, a file where a directory should be) become one-line `UserError`s naming the path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write to '{path.parent}': {exc.strerror}; choose a writable output directory "
                        f"(hydra.run.dir=... or hydra.sweep.dir=...)") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results should be as readable as any other
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write '{path}': {exc.strerror}") from None
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def write_csv(path: str | Path, rows: Iterable[Mapping], columns: Sequence[str] | None = None) -> Path:
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def parse_cell(text: str):
    """A CSV cell back to the value `write_csv` was given: int, float (nan/inf too), bool, None ('') or str."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_csv(path: str | Path, typed: bool = False) -> list[dict]:
    """Rows as dicts of strings, or with `typed=True` of the values they were written from (see `parse_cell`)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if typed:
        rows = [{key: parse_cell(value) for key, value in row.items()} for row in rows]
    return rows
