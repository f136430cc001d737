"""Atomic file writes: a reader never sees a half-written checkpoint or table (temp file + fsync + rename); the CSV
tables are written and read through pandas."""
from __future__ import annotations

import io
import math
import numbers
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


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temp files `atomic_write` leaves when its process is killed mid-write (`.<name>.<random>.tmp`)
    in `directory`, its checkpoints/ folder and checkpoints/top/. Only for a directory whose run lock this process holds: then no
    other writer can own them. Returns what was removed."""
    removed = []
    for folder in (Path(directory), Path(directory) / "checkpoints", Path(directory) / "checkpoints" / "top"):
        for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
            if stale.is_file():
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _is_nan(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isnan(value)


def csv_text(rows: Iterable[Mapping], columns: Sequence[str] | None = None) -> str:
    """The CSV text of `rows` (pandas): a header of `columns` (default: every key, in first-seen order), one line
    per row, keys not in `columns` ignored, a missing key or None an empty cell, nan written as `nan`."""
    import pandas as pd

    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    # object columns keep every value as given (ints stay ints, floats print with repr precision); pandas writes
    # all missing values alike, but an empty cell means "no value" (None) and `nan` a non-finite number here.
    cells = [{key: "nan" if _is_nan(value) else value for key, value in row.items()} for row in rows]
    frame = pd.DataFrame(cells, columns=list(columns), dtype=object)
    return frame.to_csv(index=False, lineterminator="\n", na_rep="")


def write_csv(path: str | Path, rows: Iterable[Mapping], columns: Sequence[str] | None = None) -> Path:
    """Write `rows` as CSV to `path` atomically (see `csv_text` for the format)."""
    return atomic_write_text(path, csv_text(rows, columns))


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


def read_frame(path: str | Path):
    """A CSV written by `write_csv` as a pandas DataFrame of strings (empty cells as ""; nothing converted)."""
    import pandas as pd

    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:  # a zero-byte file: no header, no rows
        return pd.DataFrame()


def read_csv(path: str | Path, typed: bool = False) -> list[dict]:
    """Rows as dicts of strings, or with `typed=True` of the values they were written from (see `parse_cell`)."""
    rows = read_frame(path).to_dict("records")
    if typed:
        rows = [{key: parse_cell(value) for key, value in row.items()} for row in rows]
    return rows
