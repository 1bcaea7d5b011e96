"""Instrument names with bundled example clips: what a stem named "bass" or "sax" is queried with when the user
gives no clip of their own.

The clips and `index.json` live in `model/instruments/`, rendered from training timbres by
`model/data/instrument_examples.py` (which owns the catalogue: names, aliases, phrases). A name is an instrument
(one clip) or a family (the clips of its instruments); names are matched case-insensitively, with `_` and `-`
read as spaces.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from stemquery.model.errors import QueryError

FOLDER = Path(__file__).resolve().parent / "instruments"
#: How many of the nearest names an unknown name's error lists.
SUGGESTIONS = 5


@dataclass(frozen=True)
class InstrumentName:
    name: str
    kind: str  # "instrument" or "family"
    family: str  # GM family (model/data/instruments.py FAMILIES), "drums" for the kit
    programs: tuple[int, ...]  # GM programs (0-based) this name covers
    aliases: tuple[str, ...]
    files: tuple[Path, ...]


def normalise(name: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[_-]+", " ", name)).strip().lower()


@lru_cache(maxsize=1)
def _index() -> dict:
    path = FOLDER / "index.json"
    if not path.exists():
        raise QueryError(f"the bundled instrument examples are missing ({path}); reinstall stemquery, or render them "
                         "with `python -m stemquery.model.data.instrument_examples`")
    return json.loads(path.read_text())


@lru_cache(maxsize=1)
def instrument_names() -> tuple[InstrumentName, ...]:
    """Every name with bundled examples, instruments first, in the catalogue's order."""
    return tuple(InstrumentName(entry["name"], entry["kind"], entry["family"], tuple(entry["programs"]),
                                tuple(entry["aliases"]), tuple(FOLDER / f for f in entry["files"]))
                 for entry in _index()["names"])


@lru_cache(maxsize=1)
def _by_word() -> dict[str, InstrumentName]:
    return {normalise(word): entry for entry in instrument_names() for word in (entry.name, *entry.aliases)}


def lookup(name: str) -> InstrumentName:
    """The instrument or family `name` (or an alias) stands for; unknown → QueryError with the nearest names."""
    words = _by_word()
    key = normalise(name)
    if key in words:
        return words[key]
    close = difflib.get_close_matches(key, list(words), n=3 * SUGGESTIONS, cutoff=0.5)
    nearest = list(dict.fromkeys(words[word].name for word in close))[:SUGGESTIONS]  # an alias → what it names
    hint = f"nearest: {', '.join(nearest)}" if nearest else "`stemquery instruments` lists them"
    raise QueryError(f"{name!r} is not an instrument with bundled examples ({hint}); give a clip instead "
                     "(NAME=CLIP)")


def family_members(entry: InstrumentName) -> list[str]:
    """The instruments whose clips a family name stands for (an instrument: itself)."""
    return [other.name for other in instrument_names()
            if other.kind == "instrument" and set(other.files) <= set(entry.files)]


def name_for_program(program: int, is_drum: bool = False) -> str:
    """The name a musician would ask for a General-MIDI program by: its own instrument when bundled, else its
    family's."""
    if is_drum:
        return lookup("drums").name
    for kind in ("instrument", "family"):
        for entry in instrument_names():
            if entry.kind == kind and program in entry.programs:
                return entry.name
    raise QueryError(f"no bundled instrument or family covers GM program {program}")


def example_clips(name: str, sample_rate: int) -> list[np.ndarray]:
    """The bundled clips of `name`, float32 (channels, samples) at `sample_rate`."""
    import soundfile as sf

    from stemquery.model.audio import resample

    clips = []
    for path in lookup(name).files:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
        clips.append(resample(np.ascontiguousarray(audio.T), rate, sample_rate))
    return clips
