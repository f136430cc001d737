"""A tiny synthetic Omniglot in the original layout: 105x105 mode-"1" PNGs, 20 drawings per character.

For the tests (tests/omniglot_fixture.py) and scripts/bad_input_table.py, which must not need the real data: each
character is a bar pattern of its own, so tasks are learnable and rotations differ.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

PARTS = ("images_background", "images_evaluation")


def character_image(character: int, drawing: int) -> Image.Image:
    """A character-specific bar pattern (asymmetric, so rotations differ) plus per-drawing noise; ink is black."""
    rng = np.random.RandomState(1000 * character + drawing)
    canvas = np.ones((105, 105), dtype=bool)
    row = 10 + (character * 7) % 60
    canvas[row:row + 12, 10:95] = False                    # a horizontal bar at a character-specific height
    canvas[10:95, 10 + (character * 11) % 40:22 + (character * 11) % 40] = False  # and a vertical one
    canvas[rng.rand(105, 105) < 0.02] = False              # drawing noise
    return Image.fromarray(canvas.astype(np.uint8) * 255).convert("1")


def make_fake_omniglot(root, alphabets=(2, 2), chars_per_alphabet=3, images_per_char=20, as_zip=True) -> Path:
    """Writes `images_background` / `images_evaluation` (zips or folders) under root; returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    character = 0
    for part, n_alphabets in zip(PARTS, alphabets):
        files = {}
        for a in range(n_alphabets):
            for c in range(chars_per_alphabet):
                character += 1
                for d in range(images_per_char):
                    buffer = io.BytesIO()
                    character_image(character, d).save(buffer, format="PNG")
                    name = f"{part}/Alphabet_{part[7]}{a}/character{c + 1:02d}/{character:04d}_{d + 1:02d}.png"
                    files[name] = buffer.getvalue()
        if as_zip:
            with zipfile.ZipFile(root / f"{part}.zip", "w") as archive:
                for name, data in sorted(files.items()):
                    archive.writestr(name, data)
        else:
            for name, data in files.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
    return root
