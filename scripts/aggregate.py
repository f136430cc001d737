#!/usr/bin/env python
"""Same as the `maml-aggregate` command (maml_runner/aggregate.py: main), runnable from a checkout without installing.

  .venv/bin/python scripts/aggregate.py multirun/2026-11-22_10-00-00
  .venv/bin/python scripts/aggregate.py multirun/a multirun/b --out reports/ab --baseline algorithm=maml
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from maml_runner.aggregate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
