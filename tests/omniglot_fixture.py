"""The tiny synthetic Omniglot the tests build (kept in the package: scripts/bad_input_table.py uses it too)."""
from maml_runner.data.synthetic_omniglot import PARTS, character_image, make_fake_omniglot  # noqa: F401
