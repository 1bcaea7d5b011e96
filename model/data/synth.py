"""Render note lists to float audio through a General-MIDI SoundFont with libfluidsynth (via pyfluidsynth).

One `SoundFontSynth` loads its SoundFont once and renders many parts in turn: the synth is reset between parts,
so each stem is rendered alone (real silence where it rests) and stems sum exactly to their mixture.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DRUM_CHANNEL = 9
#: Rendered after the last note-off so decays and reverb tails are not cut.
TAIL_SECONDS = 1.0
FLUID_BLOCK = 64
#: Blocks of silence rendered after each part so reverb tails do not leak into the next one (~3 s).
FLUSH_BLOCKS = 2048


@dataclass(frozen=True)
class Note:
    start: float
    end: float
    pitch: int
    velocity: int = 90


@dataclass
class Part:
    name: str
    program: int
    notes: list[Note] = field(default_factory=list)
    is_drum: bool = False

    @property
    def end(self) -> float:
        return max((n.end for n in self.notes), default=0.0)


def _write_float_function():
    import fluidsynth

    return fluidsynth.cfunc(
        "fluid_synth_write_float", ctypes.c_int,
        ("synth", ctypes.c_void_p, 1), ("len", ctypes.c_int, 1),
        ("lout", ctypes.c_void_p, 1), ("loff", ctypes.c_int, 1), ("lincr", ctypes.c_int, 1),
        ("rout", ctypes.c_void_p, 1), ("roff", ctypes.c_int, 1), ("rincr", ctypes.c_int, 1),
    )


class SoundFontSynth:
    """A SoundFont loaded once; `render(part, samples)` returns (2, samples) float32."""

    #: General-MIDI SoundFonts have every melodic program.
    programs: frozenset[int] = frozenset(range(128))

    def __init__(self, soundfont: str | Path, *, sample_rate: int = 44100, reverb: bool = False) -> None:
        import fluidsynth

        self.soundfont = Path(soundfont)
        if not self.soundfont.is_file():
            raise FileNotFoundError(f"{self.soundfont}: SoundFont not found; install its Debian package")
        self.sample_rate = sample_rate
        self._synth = fluidsynth.Synth(samplerate=float(sample_rate), gain=0.5)
        # Load every sample up front: with lazy loading a sample's first use renders differently from later ones.
        self._synth.setting("synth.dynamic-sample-loading", 0)
        # fluidsynth's reverb keeps its state from one part to the next; the renderer adds its own (seeded) reverb.
        self._synth.setting("synth.reverb.active", int(reverb))
        self._synth.setting("synth.chorus.active", 0)
        self._sfid = self._synth.sfload(str(self.soundfont))
        if self._sfid < 0:
            raise RuntimeError(f"{self.soundfont}: fluidsynth could not load this SoundFont")
        self._write_float = _write_float_function()

    def close(self) -> None:
        self._synth.delete()

    def __enter__(self) -> "SoundFontSynth":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _advance(self, out: np.ndarray, start: int, stop: int) -> None:
        if stop <= start:
            return
        left = out[0, start:stop]
        right = out[1, start:stop]
        self._write_float(self._synth.synth, stop - start, left.ctypes.data, 0, 1, right.ctypes.data, 0, 1)

    def preset_name(self, bank: int, preset: int) -> str | None:
        return self._synth.sfpreset_name(self._sfid, bank, preset) or None

    def render(self, part: Part, samples: int, *, bank: int | None = None, preset: int | None = None) -> np.ndarray:
        """Render `part` alone into exactly `samples` stereo samples.

        Melodic parts play `part.program` from bank 0; drum parts the kit at (bank, preset), by default GM's
        standard kit (128, 0).
        """
        synth = self._synth
        synth.system_reset()
        channel = DRUM_CHANNEL if part.is_drum else 0
        if bank is None:
            bank = 128 if part.is_drum else 0
        if preset is None:
            preset = 0 if part.is_drum else part.program
        if synth.program_select(channel, self._sfid, bank, preset) != 0:
            raise ValueError(f"{self.soundfont.name} has no preset {bank}:{preset}")
        events = []
        for note in part.notes:
            events.append((note.start, 1, note.pitch, note.velocity))
            events.append((note.end, 0, note.pitch, 0))
        # note-offs before note-ons at the same instant, so repeated notes retrigger
        events.sort(key=lambda e: (e[0], e[1]))
        out = np.zeros((2, samples), np.float32)
        cursor = 0
        for time, is_on, pitch, velocity in events:
            at = min(samples, int(round(time * self.sample_rate)))
            self._advance(out, cursor, at)
            cursor = max(cursor, at)
            if is_on:
                synth.noteon(channel, pitch, velocity)
            else:
                synth.noteoff(channel, pitch)
        self._advance(out, cursor, samples)
        self._flush(samples)
        return out

    def _flush(self, rendered: int) -> None:
        """Silence the synth and run it to a block boundary, so the next part starts from the same state.

        fluidsynth processes events in 64-sample blocks: without this, where the previous part ended would
        shift the next part's note timings, and rendering would depend on render order.
        """
        self._synth.system_reset()
        flush = FLUSH_BLOCKS * FLUID_BLOCK + (-rendered) % FLUID_BLOCK
        scratch = np.zeros((2, flush), np.float32)
        self._advance(scratch, 0, flush)
