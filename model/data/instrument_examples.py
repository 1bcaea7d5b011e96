"""Render the bundled instrument examples (`model/instruments/`): the clips a stem named "bass" or "sax" is queried
with when no clip is given (`stemquery separate MIX --stem bass`, `stemquery instruments`).

    python -m stemquery.model.data.instrument_examples [--out model/instruments]

Every clip is a short phrase in the instrument's register, rendered by this project's renderer through a TRAINING
timbre only (FluidR3_GM.sf2, in `render.SOUNDFONTS["train"]`): a separator never hears the reserved test timbres
through its own examples. Deterministic: the same notes through the same SoundFont give the same files
(fluidsynth renders without reverb or chorus, and each clip by a freshly loaded synth). The index records each
clip's provenance (SoundFont, bank, preset, phrase), which the tests check against the reserved timbres.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from stemquery.model.data.instruments import FAMILIES, family_of
from stemquery.model.data.render import SF2, SOUNDFONTS
from stemquery.model.data.synth import Note, Part, SoundFontSynth

log = logging.getLogger(__name__)

OUT = Path(__file__).resolve().parent.parent / "instruments"
SOUNDFONT = SF2 / "FluidR3_GM.sf2"
SAMPLE_RATE = 44100
#: Notes play for PHRASE_S; the clip runs on for the release.
PHRASE_S, CLIP_S = 2.5, 3.0
PEAK = 10 ** (-3 / 20)
BEAT = 0.3125  # eighth notes at 96 bpm: eight notes fill the phrase


@dataclass(frozen=True)
class Instrument:
    name: str
    program: int  # GM, 0-based; drums: the standard kit (bank 128, preset 0)
    phrase: str  # a key of PHRASES
    root: int  # MIDI note the phrase is built on: the instrument's comfortable register
    aliases: tuple[str, ...] = ()
    is_drum: bool = False


@dataclass(frozen=True)
class Group:
    """A name for several instruments (a GM family, or what musicians call them together)."""

    name: str
    family: str  # key of instruments.FAMILIES
    members: tuple[str, ...]
    aliases: tuple[str, ...] = field(default=())


def _line(root: int, steps: list[int], *, length: float = 0.9) -> list[Note]:
    return [Note(i * BEAT, (i + length) * BEAT, root + step, 100) for i, step in enumerate(steps)]


def _chords(root: int, chords: list[list[int]], beats: int) -> list[Note]:
    return [Note(i * beats * BEAT, ((i + 1) * beats - 0.1) * BEAT, root + step, 90)
            for i, chord in enumerate(chords) for step in chord]


def _drum_groove(_: int) -> list[Note]:
    kick, snare, hat = 36, 38, 42
    notes = [Note(i * BEAT, (i + 0.5) * BEAT, hat, 80) for i in range(8)]
    notes += [Note(i * BEAT, (i + 0.5) * BEAT, kick, 110) for i in (0, 3, 4)]
    notes += [Note(i * BEAT, (i + 0.5) * BEAT, snare, 105) for i in (2, 6)]
    return sorted(notes, key=lambda n: (n.start, n.pitch))


#: Phrase kinds: root → notes (seconds), each within PHRASE_S.
PHRASES = {
    "melody": lambda root: _line(root, [0, 2, 4, 7, 9, 7, 4, 0]),
    "bassline": lambda root: _line(root, [0, 0, 7, 5, 0, 12, 7, 5], length=0.7),
    "keys": lambda root: _line(root, [0, 4, 7, 12])[:4] + [Note(4 * BEAT + n.start, 4 * BEAT + n.end, n.pitch, 90)
                                                           for n in _chords(root, [[0, 4, 7], [-3, 0, 4]], 2)],
    "chords": lambda root: _chords(root, [[0, 4, 7], [-3, 0, 4]], 4),
    "power": lambda root: _chords(root, [[0, 7, 12], [0, 7, 12], [3, 10, 15], [5, 12, 17]], 2),
    "arpeggio": lambda root: _line(root, [0, 4, 7, 12, 16, 12, 7, 4], length=2.0),
    "drums": _drum_groove,
}

INSTRUMENTS = [
    Instrument("piano", 0, "keys", 60, ("grand piano", "acoustic piano")),
    Instrument("electric piano", 4, "keys", 60, ("ep", "e-piano", "rhodes", "electric pianos")),
    Instrument("harpsichord", 6, "keys", 60, ("cembalo",)),
    Instrument("bells", 14, "melody", 72, ("tubular bells", "chimes", "bell")),
    Instrument("glockenspiel", 9, "melody", 84, ("glock",)),
    Instrument("vibraphone", 11, "melody", 65, ("vibes", "vibraphones")),
    Instrument("marimba", 12, "melody", 60, ("xylophone",)),
    Instrument("organ", 16, "chords", 60, ("hammond", "b3", "drawbar organ", "electric organ")),
    Instrument("church organ", 19, "chords", 48, ("pipe organ",)),
    Instrument("accordion", 21, "chords", 60, ("squeezebox",)),
    Instrument("acoustic guitar", 25, "keys", 52, ("steel guitar", "folk guitar", "steel-string guitar")),
    Instrument("nylon guitar", 24, "keys", 52, ("classical guitar", "spanish guitar")),
    Instrument("electric guitar", 27, "keys", 52, ("clean guitar", "e-guitar", "clean electric guitar")),
    Instrument("distorted guitar", 30, "power", 40, ("distortion guitar", "overdrive guitar", "overdriven guitar",
                                                     "rock guitar", "heavy guitar")),
    Instrument("bass", 33, "bassline", 36, ("electric bass", "bass guitar", "e-bass", "finger bass")),
    Instrument("acoustic bass", 32, "bassline", 36, ("upright bass", "jazz bass")),
    Instrument("synth bass", 38, "bassline", 36, ("bass synth", "synthbass")),
    Instrument("violin", 40, "melody", 67, ("fiddle", "violins")),
    Instrument("viola", 41, "melody", 55, ("violas",)),
    Instrument("cello", 42, "melody", 48, ("violoncello", "cellos")),
    Instrument("contrabass", 43, "bassline", 36, ("double bass", "string bass")),
    Instrument("pizzicato strings", 45, "melody", 60, ("pizzicato", "pizz")),
    Instrument("harp", 46, "arpeggio", 55, ("harps",)),
    Instrument("string ensemble", 48, "chords", 60, ("string section", "orchestra strings", "strings section")),
    Instrument("choir", 52, "chords", 60, ("vox", "voice", "voices", "vocals", "vocal", "aahs", "choir aahs",
                                          "singers")),
    Instrument("trumpet", 56, "melody", 67, ("trumpets", "cornet")),
    Instrument("trombone", 57, "melody", 48, ("trombones", "bone")),
    Instrument("tuba", 58, "bassline", 36, ("tubas",)),
    Instrument("french horn", 60, "melody", 55, ("horn",)),
    Instrument("brass section", 61, "chords", 60, ("horns", "horn section")),
    Instrument("saxophone", 65, "melody", 60, ("sax", "alto sax", "alto saxophone", "saxophones")),
    Instrument("tenor sax", 66, "melody", 53, ("tenor saxophone", "tenor")),
    Instrument("oboe", 68, "melody", 67, ("oboes",)),
    Instrument("bassoon", 70, "melody", 43, ("bassoons", "fagott")),
    Instrument("clarinet", 71, "melody", 60, ("clarinets",)),
    Instrument("flute", 73, "melody", 72, ("concert flute",)),
    Instrument("piccolo", 72, "melody", 84, ()),
    Instrument("saw lead", 81, "melody", 72, ("sawtooth lead", "saw")),
    Instrument("square lead", 80, "melody", 72, ("square", "chiptune")),
    Instrument("warm pad", 89, "chords", 60, ()),
    Instrument("polysynth pad", 90, "chords", 60, ("polysynth",)),
    Instrument("drums", 0, "drums", 0, ("drum kit", "kit", "drumkit", "beat", "percussion"), is_drum=True),
]

GROUPS = [
    Group("keyboards", "piano", ("piano", "electric piano", "harpsichord"), ("keys", "piano family")),
    Group("mallets", "chromatic_percussion", ("bells", "glockenspiel", "vibraphone", "marimba"),
          ("chromatic percussion", "tuned percussion", "mallet percussion")),
    Group("organs", "organ", ("organ", "church organ", "accordion"), ("organ family",)),
    Group("guitar", "guitar", ("acoustic guitar", "nylon guitar", "electric guitar", "distorted guitar"),
          ("guitars",)),
    Group("basses", "bass", ("bass", "acoustic bass", "synth bass"), ("bass family",)),
    Group("strings", "strings", ("violin", "viola", "cello", "contrabass", "string ensemble"), ("string",)),
    Group("ensemble", "ensemble", ("string ensemble", "choir"), ("ensembles", "section")),
    Group("brass", "brass", ("trumpet", "trombone", "french horn", "tuba", "brass section"), ("brass family",)),
    Group("reeds", "reed", ("saxophone", "tenor sax", "oboe", "clarinet", "bassoon"), ("reed", "woodwinds")),
    Group("flutes", "pipe", ("flute", "piccolo"), ("pipe", "pipes")),
    Group("synth lead", "synth_lead", ("saw lead", "square lead"), ("lead", "lead synth", "synth leads")),
    Group("synth pad", "synth_pad", ("warm pad", "polysynth pad"), ("pad", "pads", "synth pads")),
]


def file_name(instrument: Instrument) -> str:
    return instrument.name.replace(" ", "_") + ".flac"


def render_clip(synth: SoundFontSynth, instrument: Instrument) -> np.ndarray:
    """The instrument's phrase, mono int16 samples, peak at -3 dBFS."""
    part = Part(instrument.name, instrument.program, PHRASES[instrument.phrase](instrument.root), instrument.is_drum)
    stereo = synth.render(part, int(CLIP_S * SAMPLE_RATE))
    mono = stereo.astype(np.float64).mean(axis=0)
    return np.round(mono * (PEAK * 32767 / np.abs(mono).max())).astype(np.int16)


def provenance(instrument: Instrument) -> dict:
    return {"file": file_name(instrument), "timbre": SOUNDFONT.name, "bank": 128 if instrument.is_drum else 0,
            "preset": 0 if instrument.is_drum else instrument.program, "phrase": instrument.phrase,
            "root": instrument.root, "renderer": "model/data/synth.py SoundFontSynth"}


def index() -> dict:
    """The index written beside the clips (read by `stemquery.model.instruments`)."""
    by_name = {i.name: i for i in INSTRUMENTS}
    names = []
    for instrument in INSTRUMENTS:
        family = family_of(instrument.program, instrument.is_drum)
        names.append({"name": instrument.name, "kind": "instrument", "family": family,
                      "programs": [] if instrument.is_drum else [instrument.program],
                      "aliases": list(instrument.aliases), "files": [file_name(instrument)]})
    for group in GROUPS:
        names.append({"name": group.name, "kind": "family", "family": group.family,
                      "programs": list(FAMILIES[group.family]), "aliases": list(group.aliases),
                      "files": [file_name(by_name[m]) for m in group.members]})
    return {"sample_rate": SAMPLE_RATE, "seconds": CLIP_S, "generator": "model/data/instrument_examples.py",
            "names": names, "provenance": {file_name(i): provenance(i) for i in INSTRUMENTS}}


def check_catalogue() -> None:
    """Every name and alias unique, every group member an instrument, the SoundFont a training timbre."""
    seen: dict[str, str] = {}
    for entry in index()["names"]:
        for word in [entry["name"], *entry["aliases"]]:
            if word in seen:
                raise ValueError(f"{word!r} names both {seen[word]!r} and {entry['name']!r}")
            seen[word] = entry["name"]
    if SOUNDFONT not in SOUNDFONTS["train"]:
        raise ValueError(f"{SOUNDFONT} is not a training timbre (render.SOUNDFONTS['train'])")


def render_all(out: Path = OUT) -> dict:
    """Render every clip into `out` and write its index.json; returns the index."""
    check_catalogue()
    out.mkdir(parents=True, exist_ok=True)
    for instrument in INSTRUMENTS:
        # A fresh synth per clip: fluidsynth keeps some state from one part to the next (the first part after
        # loading, and a part after another program, render slightly differently), so each clip would depend on
        # which were rendered before it.
        with SoundFontSynth(SOUNDFONT, sample_rate=SAMPLE_RATE) as synth:
            clip = render_clip(synth, instrument)
        sf.write(out / file_name(instrument), clip, SAMPLE_RATE, subtype="PCM_16")
        log.info("rendered %s", instrument.name)
    data = index()
    (out / "index.json").write_text(json.dumps(data, indent=1) + "\n")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    render_all(args.out)
    total = sum(p.stat().st_size for p in args.out.iterdir())
    log.info("%d files, %.2f MB in %s", len(list(args.out.iterdir())), total / 1e6, args.out)


if __name__ == "__main__":
    main()
