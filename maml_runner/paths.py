"""Where the files read at run time live: a source checkout's conf/, or the copy an installed wheel ships.

The wheel maps the repository's top-level conf/ to the package directory maml_runner/conf (pyproject.toml), so
`pip install .` gives a maml-run that works from any directory. In a checkout (editable install, `python -m
maml_runner.cli`, `make run`) the top-level conf/ is the one users edit, so it wins there.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The Hydra config directory (the one holding config.yaml)."""
    root = PACKAGE_DIR.parent
    checkout = root / "conf"
    # pyproject.toml beside conf/ marks a source tree: an installed package's parent is site-packages, where a
    # stray top-level conf/ of some other distribution must not be taken for ours.
    if (root / "pyproject.toml").is_file() and (checkout / "config.yaml").is_file():
        return checkout
    return PACKAGE_DIR / "conf"


CONF_DIR = conf_dir()
PAPER_RESULTS = PACKAGE_DIR / "paper_results.yaml"  # package data in both layouts
