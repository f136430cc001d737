#!/usr/bin/env python
"""Gather every run's results.csv under the given directories into one table, swept keys as columns, with paired
comparisons against a baseline run over the same test tasks (from each run's test_tasks.csv).

  .venv/bin/python scripts/aggregate.py multirun/2026-11-22_10-00-00
  .venv/bin/python scripts/aggregate.py multirun/a multirun/b --out reports/ab --baseline algorithm=maml

Writes aggregate.csv, aggregate.md and comparisons.csv into --out (default: the first directory). `maml-run -m`
does the same at the end of every sweep (hydra.callbacks.aggregate in conf/config.yaml).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from maml_runner.aggregate import aggregate  # noqa: E402
from maml_runner.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="sweep or run directories (searched recursively for results.csv)")
    parser.add_argument("--out", default=None, help="where to write (default: the first directory)")
    parser.add_argument("--baseline", default=None,
                        help="the run the others are compared with: key=value[,key=value] over the table's columns "
                             "(default: the first run)")
    args = parser.parse_args(argv)
    try:
        result = aggregate(args.dirs, args.out, args.baseline)
    except UserError as exc:
        print(f"aggregate.py: error: {exc}", file=sys.stderr)
        return 2
    print((result["out"] / "aggregate.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
