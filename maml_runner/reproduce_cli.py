"""`maml-reproduce` (also scripts/reproduce.py): run a paper table's cells (conf/experiment presets), write
table.md + table.csv. The work is in reproduce.py; this module is only the command line."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

USAGE = """Reproduce a paper table: run its cells (conf/experiment presets) and write table.md + table.csv.

  maml-reproduce finn2017 --budget 0.002 dataset.root=../shared/data/omniglot hardware=cpu
  maml-reproduce sinusoid --budget 0.05
  maml-reproduce finn2017 --cells 5w1s --out outputs/reproduce/finn2017_full   # full budget, one column

Tables and the paper's numbers: maml_runner/paper_results.yaml. Extra arguments are config overrides applied to
every cell (as on the maml-run command line). Running the same command again reuses finished cells and continues
interrupted ones.
"""


def main(argv=None) -> int:
    import maml_runner  # noqa: F401  (first: keeps gym's import banner quiet)
    from . import reproduce as reproduce_module
    from .errors import UserError

    tables = reproduce_module.load_tables()
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=sorted(tables), help="which table")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="fraction of the paper's training iterations, in (0, 1] (default 1: full protocol)")
    parser.add_argument("--out", default=None, help="output directory (default outputs/reproduce/<table>_budget<b>)")
    parser.add_argument("--cells", default=None,
                        help="comma-separated subset: experiment names or parts of them (e.g. 5w1s,fomaml_20w5s)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every cell, e.g. hardware=cpu")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    out = Path(args.out or f"outputs/reproduce/{args.table}_budget{args.budget:g}")
    try:
        rows = reproduce_module.reproduce(args.table, out, args.budget, args.overrides,
                                          cells=args.cells.split(",") if args.cells else None)
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print((out / "table.md").read_text())
    failed = [r for r in rows if r["status"] != "done"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
