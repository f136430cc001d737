"""Atomic file writes: a reader never sees a half-written checkpoint or table (temp file + fsync + rename)."""
from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from .errors import UserError


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write to '{path.parent}': {exc.strerror}; choose a writable output directory "
                        f"(hydra.run.dir=...)") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
