"""General-MIDI programs drawn per part from families that suit the part's register.

A Bach bass line may become a cello, a bassoon, a fretless bass or an organ, never a piccolo; a soprano line a
flute, a violin, a trumpet or a synth lead. Parts of one mixture always get different programs, so a query for
"the oboe" is never ambiguous within the mix.
"""
from __future__ import annotations

import numpy as np

from stemquery.model.data.synth import Part

FAMILIES = {
    "piano": range(0, 8), "chromatic_percussion": range(8, 16), "organ": range(16, 24), "guitar": range(24, 32),
    "bass": range(32, 40), "strings": range(40, 48), "ensemble": range(48, 56), "brass": range(56, 64),
    "reed": range(64, 72), "pipe": range(72, 80), "synth_lead": range(80, 88), "synth_pad": range(88, 96),
    "drums": range(128, 129),
}

#: Programs that make sense in each register (GM numbers, 0-based). Effects, percussive and ethnic oddities are left
#: out: they make poor "instruments" to query for.
REGISTER_PROGRAMS = {
    "low": [32, 33, 34, 35, 36, 37, 38, 39, 42, 43, 57, 58, 70, 0, 19, 16, 1, 24, 87],
    "mid": [0, 1, 2, 4, 5, 6, 11, 12, 16, 17, 18, 19, 21, 24, 25, 26, 27, 29, 30, 40, 41, 42, 46, 48, 49, 50, 52,
            56, 60, 61, 64, 65, 66, 69, 71, 80, 81, 88, 89, 90, 91, 94, 95],
    "high": [40, 41, 56, 64, 65, 68, 69, 71, 72, 73, 74, 75, 78, 79, 80, 81, 82, 83, 84, 85, 8, 9, 11, 12, 13, 0,
             24, 25, 16, 52, 53, 54],
}


def family_of(program: int, is_drum: bool = False) -> str:
    if is_drum:
        return "drums"
    for name, programs in FAMILIES.items():
        if program in programs:
            return name
    return "other"


def register_of(part: Part) -> str:
    median = float(np.median([n.pitch for n in part.notes]))
    return "low" if median < 50 else "mid" if median < 67 else "high"


def assign_programs(parts: list[Part], rng: np.random.Generator, *, keep_family: bool,
                    available: frozenset[int] = frozenset(range(128))) -> None:
    """Give each melodic part a distinct program, in place, among the `available` ones of the synth.

    keep_family: the MIDI's own program is meaningful (MMA's bass is a bass): draw within its family.
    Otherwise (music21's scores mostly say "piano"), draw from the part's register.
    """
    used: set[int] = set()
    for part in parts:
        if part.is_drum:
            continue
        if keep_family:
            candidates = list(FAMILIES[family_of(part.program)]) if family_of(part.program) != "other" else []
        else:
            candidates = REGISTER_PROGRAMS[register_of(part)]
        free = [p for p in candidates if p not in used and p in available] or \
            [p for p in range(96) if p not in used and p in available]
        part.program = int(rng.choice(free))
        used.add(part.program)
