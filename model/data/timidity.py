"""Render note lists through TiMidity++ with a GUS-patch set (Debian `freepats` + `timidity`): a third family of
training timbres besides the SoundFonts, recorded and looped by other people with another synthesis engine.

Each part is written as a one-channel MIDI file and rendered by its own `timidity` process, so stems are rendered
alone (real silence where they rest) and deterministically. TiMidity's own reverb and chorus are off (the renderer
adds its seeded room) and so is its noise shaping, which would add dither noise to silent stretches.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import mido
import numpy as np
import soundfile as sf

from stemquery.model.audio import resample
from stemquery.model.data.synth import DRUM_CHANNEL, Part

FREEPATS = Path("/etc/timidity/freepats.cfg")
TICKS_PER_BEAT = 960
#: 120 bpm: a tick is 1/1920 s; note times are rounded to the tick (0.5 ms).
TEMPO = 500_000


def _patch_numbers(config: Path) -> tuple[frozenset[int], frozenset[int]]:
    """(melodic programs of bank 0, notes of drum set 0) that a TiMidity config has patches for."""
    melodic, drums, section = set(), set(), None
    for line in config.read_text().splitlines():
        words = line.split("#")[0].split()
        if not words:
            continue
        if words[0] in ("bank", "drumset"):
            section = (words[0], int(words[1]))
        elif re.fullmatch(r"\d+", words[0]) and section in (("bank", 0), ("drumset", 0)):
            (melodic if section[0] == "bank" else drums).add(int(words[0]))
    return frozenset(melodic), frozenset(drums)


def part_midi(part: Part, program: int) -> mido.MidiFile:
    """One track, one channel (10 for drums), the part's notes at 120 bpm."""
    channel = DRUM_CHANNEL if part.is_drum else 0
    events = []
    for note in part.notes:
        events.append((round(note.start * 2 * TICKS_PER_BEAT), 1, note.pitch, note.velocity))
        events.append((round(note.end * 2 * TICKS_PER_BEAT), 0, note.pitch, 0))
    events.sort(key=lambda e: (e[0], e[1]))  # note-offs first at the same tick, so repeated notes retrigger
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=TEMPO, time=0),
                            mido.Message("program_change", channel=channel, program=program, time=0)])
    cursor = 0
    for tick, is_on, pitch, velocity in events:
        kind = "note_on" if is_on else "note_off"
        track.append(mido.Message(kind, channel=channel, note=pitch, velocity=velocity, time=tick - cursor))
        cursor = tick
    midi = mido.MidiFile(ticks_per_beat=TICKS_PER_BEAT)
    midi.tracks.append(track)
    return midi


class TimiditySynth:
    """A TiMidity++ config (GUS patches); `render(part, samples)` returns (2, samples) float32 like
    `SoundFontSynth.render`."""

    def __init__(self, config: str | Path = FREEPATS, *, sample_rate: int = 44100) -> None:
        self.config = Path(config)
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.config}: TiMidity config not found; install the Debian packages "
                                    "`timidity` and `freepats`")
        self.executable = shutil.which("timidity")
        if self.executable is None:
            raise FileNotFoundError("timidity is not installed; install the Debian package `timidity`")
        self.sample_rate = sample_rate
        self.programs, self.drum_notes = _patch_numbers(self.config)

    def close(self) -> None:
        """Nothing is held between renders (one process per part)."""

    def render(self, part: Part, samples: int, *, bank: int | None = None, preset: int | None = None) -> np.ndarray:
        """Render `part` alone into exactly `samples` stereo samples. Melodic programs the patch set lacks are an
        error (TiMidity would silently play another instrument); drum notes it lacks are left out."""
        if part.is_drum:
            program = 0
        else:
            program = part.program if preset is None else preset
            if program not in self.programs:
                raise ValueError(f"{self.config.name} has no patch for GM program {program}")
        with tempfile.TemporaryDirectory(prefix="stemquery-timidity-") as scratch:
            midi_path, wav_path = Path(scratch) / "part.mid", Path(scratch) / "part.wav"
            part_midi(part, program).save(str(midi_path))
            command = [self.executable, "-c", str(self.config), "-idq", "-Ow", "--output-stereo", "--output-16bit",
                       f"-s{self.sample_rate}", "--noise-shaping=0", "--preserve-silence", "-EFreverb=0", "-EFchorus=0",
                       "-o", str(wav_path), str(midi_path)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0 or not wav_path.exists():
                raise RuntimeError(f"timidity failed on part {part.name!r}: {result.stderr.strip()[-500:]}")
            audio, rate = sf.read(wav_path, dtype="float32", always_2d=True)
        audio = resample(np.ascontiguousarray(audio.T), rate, self.sample_rate)
        out = np.zeros((2, samples), np.float32)
        length = min(samples, audio.shape[1])
        out[:, :length] = audio[:2, :length]
        return out
