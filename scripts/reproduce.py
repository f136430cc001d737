#!/usr/bin/env python
"""Same as the `maml-reproduce` command (maml_runner/reproduce_cli.py), run with the environment's
Python (the package installed, editable in a checkout: `make setup`).

  .venv/bin/python scripts/reproduce.py finn2017 --budget 0.002 dataset.root=../shared/data/omniglot hardware=cpu
  .venv/bin/python scripts/reproduce.py sinusoid --budget 0.05
"""
from __future__ import annotations

import sys

from maml_runner.reproduce_cli import main

if __name__ == "__main__":
    sys.exit(main())
