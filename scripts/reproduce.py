#!/usr/bin/env python
"""Same as the `maml-reproduce` command (maml_runner/reproduce_cli.py), runnable from a checkout without installing.

  .venv/bin/python scripts/reproduce.py finn2017 --budget 0.002 dataset.root=../shared/data/omniglot hardware=cpu
  .venv/bin/python scripts/reproduce.py sinusoid --budget 0.05
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from maml_runner.reproduce_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
