"""The fixed train/val/test split of the music, by work (a music21 corpus file, an MMA groove library file).

The held-out lists are committed (`splits/val.txt`, `splits/test.txt`) and never regenerated: a work listed
there is never rendered for training. Timbres are split too: the test set uses only the reserved SoundFonts.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

SPLIT_DIR = Path(__file__).parent / "splits"
HELD_OUT = ("val", "test")
MUSIC21 = "music21:"
MMA = "mma:"


@lru_cache(maxsize=None)
def held_out(split: str) -> frozenset[str]:
    return frozenset(line.strip() for line in (SPLIT_DIR / f"{split}.txt").read_text().splitlines()
                     if line.strip() and not line.startswith("#"))


def split_of(work: str) -> str:
    for split in HELD_OUT:
        if work in held_out(split):
            return split
    return "train"


def make_split_lists(music21_works: list[str], groove_files: list[str], *, seed: int = 20261124,
                     fraction: float = 0.05) -> dict[str, list[str]]:
    """How the committed lists were drawn (kept so the choice is reproducible, not to redraw them)."""
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[str]] = {"val": [], "test": []}
    for prefix, works in ((MUSIC21, sorted(music21_works)), (MMA, sorted(groove_files))):
        order = rng.permutation(len(works))
        n = max(2, int(round(fraction * len(works))))
        chosen["val"] += [prefix + works[i] for i in sorted(order[:n])]
        chosen["test"] += [prefix + works[i] for i in sorted(order[n: 2 * n])]
    return chosen
