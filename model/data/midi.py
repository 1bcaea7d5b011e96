"""MIDI files → `Part`s (note lists in seconds), one per (track, channel) that plays notes."""
from __future__ import annotations

from bisect import bisect_right
from pathlib import Path

import mido

from stemquery.model.data.synth import DRUM_CHANNEL, Note, Part


class TempoMap:
    def __init__(self, midi: mido.MidiFile) -> None:
        changes = {0: 500000}
        for track in midi.tracks:
            tick = 0
            for message in track:
                tick += message.time
                if message.type == "set_tempo":
                    changes[tick] = message.tempo
        self.ticks = sorted(changes)
        self.tempos = [changes[t] for t in self.ticks]
        self.per_beat = midi.ticks_per_beat
        self.seconds = [0.0]
        for i in range(1, len(self.ticks)):
            span = self.ticks[i] - self.ticks[i - 1]
            self.seconds.append(self.seconds[-1] + span * self.tempos[i - 1] / 1e6 / self.per_beat)

    def __call__(self, tick: int) -> float:
        i = bisect_right(self.ticks, tick) - 1
        return self.seconds[i] + (tick - self.ticks[i]) * self.tempos[i] / 1e6 / self.per_beat


def read_midi(path: str | Path) -> list[Part]:
    midi = mido.MidiFile(str(path))
    seconds = TempoMap(midi)
    parts: dict[tuple[int, int], Part] = {}
    for track_index, track in enumerate(midi.tracks):
        tick = 0
        programs: dict[int, int] = {}
        sounding: dict[tuple[int, int], list[tuple[float, int]]] = {}
        name = track.name.strip() or f"track{track_index}"
        for message in track:
            tick += message.time
            if message.type == "program_change":
                programs[message.channel] = message.program
            elif message.type in ("note_on", "note_off"):
                key = (message.channel, message.note)
                if message.type == "note_on" and message.velocity > 0:
                    sounding.setdefault(key, []).append((seconds(tick), message.velocity))
                elif sounding.get(key):
                    start, velocity = sounding[key].pop(0)
                    end = seconds(tick)
                    if end > start:
                        part = parts.setdefault((track_index, message.channel), Part(
                            name=name, program=programs.get(message.channel, 0),
                            is_drum=message.channel == DRUM_CHANNEL))
                        part.notes.append(Note(start, end, message.note, velocity))
    result = [p for p in parts.values() if p.notes]
    for part in result:
        part.notes.sort(key=lambda n: (n.start, n.pitch))
    return result
