#!/usr/bin/env python
"""Same as the `maml-aggregate` command (maml_runner/aggregate.py: main), run with the environment's Python
(the package installed, editable in a checkout: `make setup`).

  .venv/bin/python scripts/aggregate.py multirun/2026-11-22_10-00-00
  .venv/bin/python scripts/aggregate.py multirun/a multirun/b --out reports/ab --baseline algorithm=maml
"""
from __future__ import annotations

import sys

from maml_runner.aggregate import main

if __name__ == "__main__":
    sys.exit(main())
