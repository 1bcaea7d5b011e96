"""Hydrogen drum kits (Debian `hydrogen-drumkits`: drumkit.xml + multi-velocity samples) as a drum renderer.

General-MIDI drum notes are mapped to the kit's instruments by their `midiOutNote`, or else by name (a "Kick" is
GM 35/36, a "Snare" 38/40, ...); each hit plays the sample layer whose velocity range holds the note's velocity,
with the instrument's gain and pan. Notes the kit has no instrument for are left out.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from stemquery.model.audio import resample
from stemquery.model.data.synth import Part

DRUMKITS = Path("/usr/share/hydrogen/data/drumkits")

#: Name keywords → the GM drum notes such an instrument can play (first keyword that matches wins).
GM_BY_NAME = [
    (r"kick|bass ?drum|bd\b", (35, 36)), (r"snare.*(rim|stick)|rim|stick", (37,)), (r"clap", (39,)),
    (r"snare|sd\b", (38, 40)), (r"(hat|hh).*(open)|open.*(hat|hh)", (46,)),
    (r"(hat|hh).*(pedal|foot)|pedal", (44,)), (r"hat|hh", (42,)),
    (r"floor|tom.*(low|lo\b|3|4)|low.*tom", (41, 43)), (r"tom.*(mid|2)|mid.*tom", (45, 47)),
    (r"tom", (48, 50)), (r"crash|splash|china", (49, 57, 52, 55)), (r"ride.*bell|bell", (53,)),
    (r"ride", (51, 59)), (r"tamb", (54,)), (r"cowbell", (56,)), (r"shaker|maraca|cabasa", (70, 69)),
    (r"conga", (62, 63, 64)), (r"bongo", (60, 61)), (r"agogo", (67, 68)),
]


def _text(node: ET.Element, tag: str, default: str = "") -> str:
    child = node.find(f"{{*}}{tag}")
    if child is None:
        child = node.find(tag)
    return child.text.strip() if child is not None and child.text else default


@dataclass
class Layer:
    low: float
    high: float
    gain: float
    audio: np.ndarray  # (2, samples) at the renderer's rate


@dataclass
class Instrument:
    name: str
    gain: float
    pan: tuple[float, float]
    layers: list[Layer] = field(default_factory=list)

    def layer_for(self, velocity: int) -> Layer:
        v = velocity / 127
        for layer in self.layers:
            if layer.low <= v <= layer.high:
                return layer
        return min(self.layers, key=lambda layer: min(abs(layer.low - v), abs(layer.high - v)))


class HydrogenKit:
    """A Hydrogen drum kit, loaded once; `render(part, samples)` returns (2, samples) float32."""

    def __init__(self, drumkit_xml: str | Path, *, sample_rate: int = 44100) -> None:
        self.path = Path(drumkit_xml)
        self.sample_rate = sample_rate
        root = ET.parse(self.path).getroot()
        self.name = _text(root, "name", self.path.parent.name)
        self.by_note: dict[int, Instrument] = {}
        named: list[tuple[str, Instrument]] = []
        for node in root.iter():
            if node.tag.split("}")[-1] != "instrument":
                continue
            instrument = self._instrument(node)
            if not instrument.layers:
                continue
            note = _text(node, "midiOutNote")
            if note.lstrip("-").isdigit() and 27 <= int(note) <= 87:
                self.by_note.setdefault(int(note), instrument)
            named.append((instrument.name.lower(), instrument))
        for pattern, notes in GM_BY_NAME:  # fill the GM notes no midiOutNote claimed
            match = next((inst for name, inst in named if re.search(pattern, name)), None)
            for note in notes:
                if match is not None:
                    self.by_note.setdefault(note, match)

    def _instrument(self, node: ET.Element) -> Instrument:
        gain = float(_text(node, "gain", "1") or 1) * float(_text(node, "volume", "1") or 1)
        pan = (float(_text(node, "pan_L", "1") or 1), float(_text(node, "pan_R", "1") or 1))
        instrument = Instrument(_text(node, "name"), gain, pan)
        # Kit formats differ: <layer>s directly under the instrument, inside <instrumentComponent>, or (old kits)
        # one <filename> on the instrument itself.
        layers = [n for n in node.iter() if n.tag.split("}")[-1] == "layer"] or [node]
        for layer in layers:
            name = _text(layer, "filename")
            file = self.path.parent / name
            if not name or not file.is_file():
                continue
            audio, rate = sf.read(file, dtype="float32", always_2d=True)
            audio = audio.T if audio.shape[1] == 2 else np.repeat(audio[:, :1].T, 2, axis=0)
            low, high = (float(_text(layer, "min", "0")), float(_text(layer, "max", "1"))) if layer is not node \
                else (0.0, 1.0)
            instrument.layers.append(Layer(low, high, float(_text(layer, "gain", "1") or 1) if layer is not node
                                           else 1.0, resample(np.ascontiguousarray(audio), rate, self.sample_rate)))
        return instrument

    def close(self) -> None:
        pass

    def render(self, part: Part, samples: int, **_) -> np.ndarray:
        out = np.zeros((2, samples), np.float32)
        for note in part.notes:
            instrument = self.by_note.get(note.pitch)
            start = int(round(note.start * self.sample_rate))
            if instrument is None or start >= samples:
                continue
            layer = instrument.layer_for(note.velocity)
            hit = layer.audio[:, : samples - start] * (instrument.gain * layer.gain * note.velocity / 127)
            out[0, start: start + hit.shape[1]] += hit[0] * instrument.pan[0]
            out[1, start: start + hit.shape[1]] += hit[1] * instrument.pan[1]
        return out


def kit_paths() -> list[Path]:
    return sorted(DRUMKITS.glob("*/drumkit.xml"))
