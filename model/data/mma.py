"""Random chord charts rendered to MIDI by MMA (Debian `mma`): drums, bass, chords and arpeggios in many grooves."""
from __future__ import annotations

import re
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

STDLIB = Path("/usr/share/mma/lib/stdlib")
ROOTS = ["C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B"]
QUALITIES = ["", "m", "7", "m7", "maj7", "sus4", "6", "m6", "9", "dim"]
#: Scale degrees (semitones) and qualities of common diatonic progressions in a major key.
DIATONIC = [(0, ""), (2, "m"), (4, "m"), (5, ""), (7, ""), (9, "m"), (0, "maj7"), (7, "7"), (2, "m7"), (9, "m7")]


@lru_cache(maxsize=1)
def grooves_by_file() -> dict[str, tuple[str, ...]]:
    """Every groove in MMA's standard library, by library file (e.g. '50srock' → 50sRock, 50sRockSus, ...).

    Variants in one file share their patterns, so the train/val/test split is by file, never by groove.
    """
    found = {}
    for path in sorted(STDLIB.glob("*.mma")):
        if path.stem.startswith("metronome"):  # clicks, not music
            continue
        names = [m.group(1) for line in path.read_text(errors="replace").splitlines()
                 if (m := re.match(r"^\s*DefGroove\s+(\S+)", line, re.IGNORECASE))]
        if names:
            found[path.stem] = tuple(sorted(set(names), key=str.lower))
    return found


def random_chart(groove: str, rng: np.random.Generator, *, bars: int = 24) -> str:
    """An MMA file: tempo, groove and a chord progression (mostly diatonic, some chromatic colour)."""
    key = int(rng.integers(12))
    tempo = int(rng.integers(70, 170))
    phrase = [DIATONIC[i] for i in rng.choice(len(DIATONIC), size=4)]
    lines = [f"Tempo {tempo}", f"Groove {groove}"]
    for bar in range(1, bars + 1):
        if rng.random() < 0.15:
            chord = ROOTS[int(rng.integers(12))] + QUALITIES[int(rng.integers(len(QUALITIES)))]
        else:
            degree, quality = phrase[(bar - 1) % 4]
            chord = ROOTS[(key + degree) % 12] + quality
        lines.append(f"{bar} {chord}")
    return "\n".join(lines) + "\n"


def render_groove_midi(groove: str, seed: int, out_path: Path, *, bars: int = 24) -> Path:
    """Write a MIDI file of `bars` bars of `groove` over a random chart drawn from `seed`."""
    chart = random_chart(groove, np.random.default_rng(seed), bars=bars)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "chart.mma"
        source.write_text(chart)
        result = subprocess.run(["mma", "-f", str(out_path), str(source)], capture_output=True, text=True,
                                timeout=60)
    if result.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"mma failed on groove {groove}: {result.stdout[-300:]} {result.stderr[-300:]}")
    return out_path
