"""(mixture, query, target) triples drawn from a rendered corpus, for training and for building eval sets.

Query protocols, as the product offers them:
- `same_stem`: another time segment of the target's own stem (same instrument, same SoundFont);
- `cross_track`: the same GM program in another track (another work), when the corpus has one;
- `mixture_region`: a region of the mixture itself where the target is prominent (REAPER's "time selection
  as query"); the query then also contains the other sources, as it does for the user;
- `cross_source` ("a sample from your library"): the same GM program (or else family; drums: another kit) rendered
  by another timbre source (bank, synth voice or kit), from another track;
- `overlap`: the target's own stem over a window that overlaps the mixture's segment (a solo passage selected
  around the target, or the perfect example itself): the protocol that rewards matching the example exactly.

Some draws have a target that is absent from the mixture (the query names an instrument that does not play):
the right answer is silence.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from stemquery.model.audio import fit_length, resample

PROTOCOLS = ("same_stem", "cross_track", "mixture_region", "cross_source")
#: Protocols for training only (eval sets draw `PROTOCOLS`).
TRAINING_PROTOCOLS = PROTOCOLS + ("overlap",)
#: Frame length (s) of the activity envelope used to find where a stem plays.
ACTIVITY_HOP_S = 0.1
ACTIVE_DBFS = -50.0
#: Centre frequencies (Hz) of the random timbre EQ; the curve is interpolated in log frequency between them.
TIMBRE_EQ_HZ = np.geomspace(60.0, 16000.0, 8)


@dataclass
class Stem:
    track: str
    name: str
    program: int
    family: str
    is_drum: bool
    timbre: str
    audio: np.ndarray  # int16 (channels, samples), memory-mapped
    active: np.ndarray  # bool per ACTIVITY_HOP_S frame
    energy: np.ndarray  # mean power per frame
    notes: np.ndarray  # (n, 4) float: start s, end s, MIDI pitch, velocity (empty when the render has none)

    @property
    def source(self) -> str:
        """Which timbre source played it: a SoundFont or patch set (whatever its drum kit preset), one Hydrogen
        kit, one procedural voice."""
        if self.timbre.startswith(("hydrogen:", "procedural")):
            return self.timbre
        return self.timbre.split(":")[0]

    @property
    def key(self) -> tuple:
        """What "the same instrument" means across tracks: program (or drums) and timbre source."""
        return ("drums" if self.is_drum else self.program, self.source)


@dataclass
class Track:
    name: str
    stems: list[Stem]
    samples: int


def _activity(audio: np.ndarray, hop: int) -> tuple[np.ndarray, np.ndarray]:
    frames = audio.shape[1] // hop
    power = np.square(audio[:, : frames * hop].astype(np.float32) / 32768.0).mean(axis=0)
    energy = power.reshape(frames, hop).mean(axis=1)
    return energy > 10 ** (ACTIVE_DBFS / 10), energy


def cache_track(track_dir: Path, sample_rate: int) -> Path:
    """Decode a track's stems once to int16 .npy at `sample_rate` (memory-mapped later). Returns the cache dir."""
    cache = track_dir / f"cache_{sample_rate}"
    if (cache / "done").exists():
        return cache
    cache.mkdir(exist_ok=True)
    meta = json.loads((track_dir / "meta.json").read_text())
    for index, record in enumerate(meta["stems"]):
        audio, rate = sf.read(track_dir / record["file"], dtype="float32", always_2d=True)
        audio = resample(np.ascontiguousarray(audio.T), rate, sample_rate)
        np.save(cache / f"{index:02d}.npy", np.clip(audio * 32768.0, -32768, 32767).astype(np.int16))
    (cache / "done").write_text("")
    return cache


def load_corpus(root: Path, sample_rate: int) -> list[Track]:
    hop = int(ACTIVITY_HOP_S * sample_rate)
    tracks = []
    for track_dir in sorted(p for p in root.iterdir() if (p / "meta.json").exists()):
        meta = json.loads((track_dir / "meta.json").read_text())
        cache = cache_track(track_dir, sample_rate)
        stems = []
        for index, record in enumerate(meta["stems"]):
            audio = np.load(cache / f"{index:02d}.npy", mmap_mode="r")
            active, energy = _activity(np.asarray(audio), hop)
            notes = np.asarray(record.get("notes", []), dtype=np.float64).reshape(-1, 4)
            stems.append(Stem(track_dir.name, record["part"], record["program"], record["family"],
                              record["is_drum"], record["timbre"], audio, active, energy, notes))
        if len(stems) >= 2:
            tracks.append(Track(track_dir.name, stems, min(s.audio.shape[1] for s in stems)))
    return tracks


@dataclass
class Triple:
    mixture: np.ndarray  # float32 (channels, samples)
    target: np.ndarray
    query: np.ndarray
    protocol: str
    info: dict


def stack_triples(triples: list[Triple]):
    """A batch as torch tensors: mixture, target, query, each (batch, channels, samples)."""
    import torch

    return tuple(torch.from_numpy(np.stack([getattr(t, name) for t in triples]))
                 for name in ("mixture", "target", "query"))


class TripleSampler:
    """Draws triples from loaded tracks with a numpy Generator (deterministic for a seed)."""

    def __init__(self, tracks: list[Track], *, sample_rate: int, segment_s: float, query_s: float,
                 protocols: tuple[str, ...] = PROTOCOLS, absent_target_p: float = 0.05,
                 min_active: float = 0.5, random_gains: bool = True, timbre_eq_db: float = 0.0,
                 speed_semitones: float = 0.0, family_negative_p: float = 0.0, dominant_p: float = 0.0) -> None:
        self.tracks = tracks
        self.rate = sample_rate
        self.segment = int(segment_s * sample_rate)
        self.query_len = int(query_s * sample_rate)
        self.hop = int(ACTIVITY_HOP_S * sample_rate)
        self.protocols = protocols
        self.absent_target_p = absent_target_p
        self.min_active = min_active
        self.random_gains = random_gains
        self.timbre_eq_db = timbre_eq_db
        self.speed_semitones = speed_semitones
        self.family_negative_p = family_negative_p
        self.dominant_p = dominant_p
        self.by_key: dict[tuple, list[Stem]] = {}
        self.by_program: dict[object, list[Stem]] = {}
        self.by_family: dict[str, list[Stem]] = {}
        for track in tracks:
            for stem in track.stems:
                self.by_key.setdefault(stem.key, []).append(stem)
                self.by_program.setdefault(stem.key[0], []).append(stem)
                self.by_family.setdefault(stem.family, []).append(stem)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _frames(self, samples: int) -> int:
        return max(1, samples // self.hop)

    def _active_starts(self, stem: Stem, length: int, limit: int, min_active: float) -> np.ndarray:
        """Frame indices where a window of `length` samples has at least `min_active` of its frames active."""
        window = self._frames(length)
        usable = min(len(stem.active), limit // self.hop) - window + 1
        if usable <= 0:
            return np.array([], dtype=int)
        csum = np.concatenate([[0], np.cumsum(stem.active[: usable + window - 1])])
        share = (csum[window:] - csum[:-window]) / window
        return np.flatnonzero(share >= min_active)

    @staticmethod
    def _span(length: int, speed: float) -> int:
        """Source samples that make `length` samples once played `speed` times as fast."""
        return length if speed == 1.0 else int(np.ceil(length * speed)) + 1

    def _cut(self, stem: Stem, start: int, length: int, eq_db: np.ndarray | None = None,
             speed: float = 1.0) -> np.ndarray:
        span = self._span(length, speed)
        clip = fit_length(np.asarray(stem.audio[:, start: start + span], dtype=np.float32) / 32768.0, span)
        if speed != 1.0:
            clip = fit_length(resample(clip, self.rate * speed, self.rate), length)
        return clip if eq_db is None else apply_eq(clip, eq_db, self.rate)

    def _timbre_eq(self, rng: np.random.Generator) -> np.ndarray | None:
        """A random EQ (dB at `TIMBRE_EQ_HZ`) that makes one stem a new timbre, or None when disabled.

        The training SoundFonts offer a handful of timbres per instrument, so a separator can learn to recognise
        them instead of listening to the query. One EQ per stem, applied alike to the stem in the mixture, to the
        target and to its query, keeps the query truthful while the timbre is one no SoundFont has.
        """
        if self.timbre_eq_db <= 0:
            return None  # no draw: the random stream (and so every eval set) is what it was without the option
        return rng.uniform(-self.timbre_eq_db, self.timbre_eq_db, len(TIMBRE_EQ_HZ))

    def _speed(self, rng: np.random.Generator) -> float:
        """A random tape-speed factor for a whole draw (mixture, target and query alike), or 1.0 when disabled.

        Playing every stem faster or slower moves pitch, formants and tempo together: each SoundFont instrument
        becomes a neighbour the corpus does not have (a smaller or larger body), while the music stays in time.
        """
        if self.speed_semitones <= 0:
            return 1.0  # no draw, as for the EQ
        return float(2 ** (rng.uniform(-self.speed_semitones, self.speed_semitones) / 12))

    def _gain(self, rng: np.random.Generator) -> float:
        return float(10 ** (rng.uniform(-6, 6) / 20)) if self.random_gains else 1.0

    # -- drawing ----------------------------------------------------------------------------------------------
    def draw(self, rng: np.random.Generator, protocol: str | None = None) -> Triple:
        for _ in range(100):
            triple = self._try(rng, protocol or self.protocols[int(rng.integers(len(self.protocols)))])
            if triple is not None:
                return triple
        raise RuntimeError("could not draw a triple: the corpus has too little active audio")

    def _try(self, rng: np.random.Generator, protocol: str) -> Triple | None:
        track = self.tracks[int(rng.integers(len(self.tracks)))]
        target = track.stems[int(rng.integers(len(track.stems)))]
        starts = self._active_starts(target, self.segment, track.samples, self.min_active)
        if len(starts) == 0:
            return None
        start = int(starts[int(rng.integers(len(starts)))]) * self.hop
        speed = self._speed(rng)
        others = [s for s in track.stems if s is not target]
        chosen = [others[i] for i in rng.choice(len(others), size=int(rng.integers(1, len(others) + 1)),
                                                 replace=False)]
        target_eq, rest_eqs = self._timbre_eq(rng), [self._timbre_eq(rng) for _ in chosen]
        target_audio = self._cut(target, start, self.segment, target_eq, speed) * self._gain(rng)
        rest = [self._cut(s, start, self.segment, eq, speed) * self._gain(rng) for s, eq in zip(chosen, rest_eqs)]
        absent = protocol != "mixture_region" and rng.random() < self.absent_target_p
        query_stem, query = target, None
        if protocol == "same_stem":
            query = self._query_same_stem(rng, target, start, track.samples, target_eq, speed)
        elif protocol == "cross_track":
            query, query_stem = self._query_cross_track(rng, target, target_eq, speed)
        elif protocol == "cross_source":
            query, query_stem = self._query_cross_source(rng, target, speed)
        elif protocol == "overlap":
            query = self._query_overlap(rng, target, start, track.samples, target_eq, speed)
        elif protocol == "mixture_region":
            query = self._query_mixture_region(rng, target, chosen, track.samples, [target_eq, *rest_eqs], speed)
        if query is None:
            return None
        negative = self._family_negative(rng, target, track, speed) \
            if self.family_negative_p > 0 and rng.random() < self.family_negative_p else None
        if negative is not None:
            rest.append(negative * self._gain(rng))
        if absent:  # the query's instrument does not play in this mixture
            if not any(np.any(r) for r in rest):
                return None  # nothing else plays either: a silent mixture teaches nothing
            target_audio = np.zeros_like(target_audio)
        elif protocol != "mixture_region" and self.dominant_p > 0 and rng.random() < self.dominant_p:
            rest = self._under(rest, target_audio, float(rng.uniform(5.0, 15.0)))
        mixture = target_audio + np.sum(rest, axis=0)
        peak = max(np.abs(mixture).max(), np.abs(query).max(), 1e-6)
        scale = min(1.0, 0.99 / peak)
        info = {"track": track.name, "target": target.name, "program": target.program, "family": target.family,
                "timbre": target.timbre, "instrument": target.key, "start_s": start / self.rate, "absent": bool(absent),
                "sources": 1 + len(chosen) + (negative is not None), "query_track": query_stem.track,
                "query_part": query_stem.name, "query_timbre": query_stem.timbre, "speed": speed}
        return Triple(*(np.float32(scale) * np.asarray(a, np.float32) for a in (mixture, target_audio, query)),
                      protocol, info)

    @staticmethod
    def _under(rest: list[np.ndarray], target: np.ndarray, db: float) -> list[np.ndarray]:
        """The other sources scaled so that the target is `db` above their sum (a target-dominant mixture: the
        model must learn to leave a dominant target in place rather than remove it)."""
        target_power = float(np.mean(target**2))
        rest_power = float(np.mean(np.sum(rest, axis=0) ** 2))
        if target_power <= 0 or rest_power <= 0:
            return rest
        gain = float(np.sqrt(target_power / rest_power / 10 ** (db / 10)))
        return [r * gain for r in rest]

    def _family_negative(self, rng, target: Stem, track: Track, speed: float) -> np.ndarray | None:
        """A hard negative: a stem of the target's family but another instrument (program or source), from another
        track, playing through the segment; None when the corpus has none to offer."""
        candidates = [s for s in self.by_family.get(target.family, [])
                      if s.track != track.name and s.key != target.key]
        if not candidates:
            return None
        other = candidates[int(rng.integers(len(candidates)))]
        starts = self._active_starts(other, self.segment, other.audio.shape[1], self.min_active)
        if len(starts) == 0:
            return None
        start = int(starts[int(rng.integers(len(starts)))]) * self.hop
        return self._cut(other, start, self.segment, self._timbre_eq(rng), speed)

    def _query_same_stem(self, rng, stem: Stem, avoid_start: int, limit: int, eq_db: np.ndarray | None,
                         speed: float = 1.0) -> np.ndarray | None:
        query_span = self._span(self.query_len, speed)
        starts = self._active_starts(stem, query_span, limit, self.min_active) * self.hop
        apart = starts[(starts + query_span <= avoid_start) | (starts >= avoid_start + self._span(self.segment, speed))]
        if len(apart) == 0:
            return None
        start = int(apart[int(rng.integers(len(apart)))])
        return self._cut(stem, start, self.query_len, eq_db, speed) * self._gain(rng)

    def _query_cross_track(self, rng, stem: Stem, eq_db: np.ndarray | None,
                           speed: float = 1.0) -> tuple[np.ndarray | None, Stem]:
        candidates = [s for s in self.by_key.get(stem.key, []) if s.track != stem.track]
        return self._query_from_one_of(rng, candidates, stem, eq_db, speed)

    def _query_cross_source(self, rng, stem: Stem, speed: float = 1.0) -> tuple[np.ndarray | None, Stem]:
        """The same program (else family; drums: drums) from another timbre source and another track, with an EQ of
        its own: a library sample of "that kind of instrument", never the target's own source."""
        kind = stem.key[0]
        candidates = [s for s in self.by_program.get(kind, []) if s.source != stem.source and s.track != stem.track]
        if not candidates and not stem.is_drum:
            candidates = [s for s in self.by_family.get(stem.family, [])
                          if s.source != stem.source and s.track != stem.track and not s.is_drum]
        return self._query_from_one_of(rng, candidates, stem, None, speed, own_eq=True)

    def _query_from_one_of(self, rng, candidates: list[Stem], stem: Stem, eq_db: np.ndarray | None, speed: float,
                           own_eq: bool = False) -> tuple[np.ndarray | None, Stem]:
        """A query-long active clip of one of `candidates` (with `eq_db`, or an EQ of its own drawn after its start
        when `own_eq`), and the stem it came from; (None, `stem`) when there is none."""
        if not candidates:
            return None, stem
        other = candidates[int(rng.integers(len(candidates)))]
        starts = self._active_starts(other, self.query_len, other.audio.shape[1], self.min_active)
        if len(starts) == 0:
            return None, stem
        start = int(starts[int(rng.integers(len(starts)))]) * self.hop
        eq_db = self._timbre_eq(rng) if own_eq else eq_db
        return self._cut(other, start, self.query_len, eq_db, speed) * self._gain(rng), other

    def _query_overlap(self, rng, stem: Stem, segment_start: int, limit: int, eq_db: np.ndarray | None,
                       speed: float = 1.0) -> np.ndarray | None:
        """The target's own stem over a query-long window that overlaps the mixture's segment by at least half the
        shorter of the two."""
        query_span, segment_span = self._span(self.query_len, speed), self._span(self.segment, speed)
        overlap = min(query_span, segment_span) // 2
        low = max(0, segment_start + overlap - query_span)
        high = min(limit - query_span, segment_start + segment_span - overlap)
        if high < low:
            return None
        start = int(rng.integers(low, high + 1))
        return self._cut(stem, start, self.query_len, eq_db, speed) * self._gain(rng)

    def _query_mixture_region(self, rng, target: Stem, chosen: list[Stem], limit: int,
                              eqs: list[np.ndarray | None], speed: float = 1.0) -> np.ndarray | None:
        """The mix (target + the same other sources) where the target is loudest relative to the rest."""
        window = self._frames(self.query_len)
        frames = min(len(target.energy), limit // self.hop)
        if frames < window:
            return None
        rest_energy = np.sum([s.energy[:frames] for s in chosen], axis=0)
        ratio = target.energy[:frames] / (rest_energy + 1e-9)
        kernel = np.ones(window) / window
        score = np.convolve(ratio, kernel, mode="valid")
        active = np.convolve(target.active[:frames].astype(float), kernel, mode="valid") >= self.min_active
        score[~active] = -np.inf
        if not np.isfinite(score).any():
            return None
        best = np.argsort(score)[-3:]  # one of the three best regions, so it is not always the same one
        start = int(best[int(rng.integers(len(best)))]) * self.hop
        return sum(self._cut(s, start, self.query_len, eq, speed) for s, eq in zip([target, *chosen], eqs))


def apply_eq(audio: np.ndarray, gains_db: np.ndarray, sample_rate: int) -> np.ndarray:
    """`audio` (channels, samples) through a smooth EQ: `gains_db` at `TIMBRE_EQ_HZ`, flat beyond the ends.

    Applied in the frequency domain over the whole clip: a curve this smooth has an impulse response of some tens of
    milliseconds, so the circular wrap is inaudible, and the operation is linear, so stems still sum to the mix.
    """
    import scipy.fft  # the data extra's; single precision and a fast length: 3× quicker than numpy's here

    samples = audio.shape[-1]
    length = scipy.fft.next_fast_len(samples, real=True)
    frequencies = np.fft.rfftfreq(length, 1.0 / sample_rate)
    curve_db = np.interp(np.log(np.maximum(frequencies, 1.0)), np.log(TIMBRE_EQ_HZ), gains_db)
    spectrum = scipy.fft.rfft(audio.astype(np.float32), n=length, axis=-1) * (10 ** (curve_db / 20)).astype(np.float32)
    return scipy.fft.irfft(spectrum, n=length, axis=-1)[..., :samples].astype(np.float32)


def piano_roll(notes: np.ndarray, start_s: float, frames: int, frame_s: float, pitches: int = 128) -> np.ndarray:
    """(pitches, frames) float32: 1 where a note sounds during a frame of `frame_s` seconds from `start_s`."""
    roll = np.zeros((pitches, frames), np.float32)
    tolerance = 1e-6  # so that a note on a frame boundary is not put a frame early by float rounding
    for onset, offset, pitch, _ in notes:
        first = int(np.floor((onset - start_s) / frame_s + tolerance))
        last = int(np.ceil((offset - start_s) / frame_s - tolerance))
        if last > 0 and first < frames and 0 <= pitch < pitches:
            roll[int(pitch), max(first, 0): min(last, frames)] = 1.0
    return roll


@dataclass
class ClipPair:
    """Two clips of one stem (same instrument, different moments) and their piano rolls."""

    clips: np.ndarray  # float32 (2, channels, samples)
    rolls: np.ndarray  # float32 (2, pitches, frames)
    key: tuple


class ClipPairSampler:
    """Draws `ClipPair`s from loaded tracks: the VAE's training data (reconstruction, pitch, contrastive timbre)."""

    def __init__(self, tracks: list[Track], *, sample_rate: int, clip_s: float, roll_frame_s: float,
                 roll_frames: int, min_active: float = 0.5) -> None:
        self.stems = [stem for track in tracks for stem in track.stems]
        self.rate = sample_rate
        self.clip = int(clip_s * sample_rate)
        self.hop = int(ACTIVITY_HOP_S * sample_rate)
        self.roll_frame_s, self.roll_frames = roll_frame_s, roll_frames
        self.min_active = min_active

    def draw(self, rng: np.random.Generator) -> ClipPair:
        for _ in range(100):
            stem = self.stems[int(rng.integers(len(self.stems)))]
            window = max(1, self.clip // self.hop)
            usable = len(stem.active) - window + 1
            if usable < 2 * window:
                continue
            csum = np.concatenate([[0], np.cumsum(stem.active)])
            starts = np.flatnonzero((csum[window: usable + window] - csum[:usable]) / window >= self.min_active)
            if len(starts) < 2:
                continue
            first = int(starts[int(rng.integers(len(starts)))])
            apart = starts[np.abs(starts - first) >= window]
            if len(apart) == 0:
                continue
            second = int(apart[int(rng.integers(len(apart)))])
            clips, rolls = [], []
            for frame in (first, second):
                start = frame * self.hop
                clip = np.asarray(stem.audio[:, start: start + self.clip], dtype=np.float32) / 32768.0
                gain = 10 ** (rng.uniform(-6, 6) / 20)
                clips.append(clip * gain)
                rolls.append(piano_roll(stem.notes, start / self.rate, self.roll_frames, self.roll_frame_s))
            return ClipPair(np.stack(clips), np.stack(rolls), stem.key)
        raise RuntimeError("could not draw a clip pair: the corpus has too little active audio")
