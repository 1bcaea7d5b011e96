"""Re-create the shipped example: a short piano + bass + flute mix, and a flute phrase from elsewhere as the query.

    python examples/audio/make_example.py  [--soundfont /usr/share/sounds/sf2/FluidR3_GM.sf2]

Writes mix.flac (6 s), query_flute.flac (3.6 s, a different phrase of the same flute) and the true flute stem
(target_flute.flac, so a separation can be scored: tests/test_cli.py does) beside this file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf

from stemquery.model.data.synth import Note, Part, SoundFontSynth

RATE = 44100
BEAT = 0.6  # 100 bpm
CHORDS = [(48, 52, 55), (45, 48, 52), (41, 45, 48), (43, 47, 50)]  # C, Am, F, G


def chord_part() -> Part:
    notes = [Note(bar * 4 * BEAT + beat * BEAT, bar * 4 * BEAT + (beat + 1) * BEAT - 0.05, pitch + 12, 70)
             for bar, chord in enumerate(CHORDS * 2) for beat in (0, 2) for pitch in chord]
    return Part("piano", 0, [n for n in notes if n.start < 6.0])


def bass_part() -> Part:
    notes = [Note(bar * 4 * BEAT + beat * BEAT, bar * 4 * BEAT + (beat + 1) * BEAT - 0.1, chord[0] - 12, 95)
             for bar, chord in enumerate(CHORDS * 2) for beat in range(4)]
    return Part("bass", 33, [n for n in notes if n.start < 6.0])


def melody(pitches: list[int], start: float = 0.0) -> Part:
    notes, t = [], start
    for pitch in pitches:
        notes.append(Note(t, t + BEAT * 0.9, pitch, 100))
        t += BEAT
    return Part("flute", 73, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--soundfont", default="/usr/share/sounds/sf2/FluidR3_GM.sf2")
    args = parser.parse_args()
    here = Path(__file__).parent
    with SoundFontSynth(args.soundfont, sample_rate=RATE) as synth:
        length = 6 * RATE
        flute = synth.render(melody([76, 79, 81, 79, 76, 74, 72, 74, 76, 72]), length)
        rest = synth.render(chord_part(), length) + synth.render(bass_part(), length)
        query = synth.render(melody([72, 74, 76, 77, 79, 81]), int(3.6 * RATE))
    mix = flute + rest
    scale = 0.8 / max(np.abs(mix).max(), np.abs(query).max())
    outputs = {here / "mix.flac": mix, here / "query_flute.flac": query, here / "target_flute.flac": flute}
    for path, audio in outputs.items():
        sf.write(path, (audio * scale).T, RATE, subtype="PCM_16")


if __name__ == "__main__":
    main()
