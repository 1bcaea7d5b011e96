"""Render a Slakh-style multitrack corpus: each track is one work's parts, each part a stem, mixture = sum.

    stemquery data render --out data/train --timbres train --hours 10 --seed 0

Layout: OUT/tNNNNNN/{mix.flac, stems/NN_<part>.flac, meta.json} (FLAC 16-bit), OUT/index.json.

Determinism: the plan (which work, excerpt, SoundFont, programs, gains, reverb) is drawn from (seed, track index);
tracks are rendered in fixed shards, each shard by its own fresh synths in track order, so the audio depends on the
seed alone, not on the number of workers. Resumable: a track whose meta.json (written last) exists is kept.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import fftconvolve

from stemquery.model.data.hydrogen import HydrogenKit, kit_paths
from stemquery.model.data.instruments import assign_programs, family_of
from stemquery.model.data.midi import read_midi
from stemquery.model.data.mma import grooves_by_file, render_groove_midi
from stemquery.model.data.procedural import PROCEDURAL_TIMBRES, ProceduralSynth
from stemquery.model.data.production import apply_chain, draw_chain
from stemquery.model.data.splits import MMA, MUSIC21, split_of
from stemquery.model.data.synth import TAIL_SECONDS, Part, SoundFontSynth
from stemquery.model.data.timidity import FREEPATS, TimiditySynth

log = logging.getLogger(__name__)

SF2, SF3 = Path("/usr/share/sounds/sf2"), Path("/usr/share/sounds/sf3")
OPL3 = SF2 / "OPL-3_FM_128M.sf2"
#: Procedural voices (model/data/procedural.py): a name, not a file.
PROCEDURAL, PROCEDURAL_FM = Path("procedural"), Path("procedural-fm")
#: Melodic timbres per split: SoundFonts (fluidsynth), TiMidity configs of GUS patches (freepats) and procedural
#: voices, drawn uniformly from the list (the procedural synth is listed twice: every one of its voices is new).
#: - train: what the separator learns from;
#: - val: seen timbres, unseen music (the three SoundFonts it was first rendered with);
#: - val_unseen: unseen music AND timbres held out of training, to choose checkpoints and designs by how they do on
#:   sounds never trained on: the OPL3 FM bank and the procedural FM voices (and one Hydrogen kit);
#: - test: the reserved SoundFonts, never used for training or tuning.
SOUNDFONTS = {
    "train": [SF2 / "FluidR3_GM.sf2", SF3 / "FluidR3Mono_GM.sf3", SF3 / "MuseScore_General.sf3", FREEPATS,
              PROCEDURAL, PROCEDURAL],
    "val": [SF2 / "FluidR3_GM.sf2", SF3 / "FluidR3Mono_GM.sf3", SF3 / "MuseScore_General.sf3"],
    "val_unseen": [OPL3, PROCEDURAL_FM],
    "test": [SF2 / "TimGM6mb.sf2", SF2 / "sf_GMbank.sf2"],
}
#: Whose music each timbre split plays (the music split is by work: model/data/splits.py).
MUSIC_SPLIT = {"train": "train", "val": "val", "val_unseen": "val", "test": "test"}
#: Per-stem production chains (model/data/production.py) for the splits rendered since they exist; val and test keep
#: their documented renders.
PRODUCTION = {"train": True, "val": False, "val_unseen": True, "test": False}
#: Hydrogen kits reserved for the test set, never trained or tuned on.
RESERVED_HYDROGEN = ("ForzeeStereo", "BJA_Pacific", "rumpf_kit_z01_h2")
#: The Hydrogen kit held out of training for the unseen-timbre validation set.
UNSEEN_HYDROGEN = ("ColomboAcousticDrumkit",)
#: Hydrogen kits without a kick, snare and hi-hat (hand percussion, djembes) cannot play a GM drum part.
UNUSABLE_HYDROGEN = ("Gimme A Hand 1.0", "circAfrique v4")


def _hydrogen(names=None, *, exclude=()) -> list[tuple[Path, int, int]]:
    kits = [p for p in kit_paths() if p.parent.name not in exclude + UNUSABLE_HYDROGEN]
    return [(p, 0, 0) for p in kits if names is None or p.parent.name in names]


#: Drum kits (SoundFont or Hydrogen drumkit.xml, bank, preset) per split, besides the melodic timbres' own kits.
AVLDRUMS = [(SF2 / "Black_Pearl_4_LV2.sf2", 0, 0), (SF2 / "Red_Zeppelin_4_LV2.sf2", 0, 0)]
EXTRA_KITS = {
    "train": AVLDRUMS + _hydrogen(exclude=RESERVED_HYDROGEN + UNSEEN_HYDROGEN),
    "val": AVLDRUMS + _hydrogen(exclude=RESERVED_HYDROGEN + UNSEEN_HYDROGEN),
    "val_unseen": _hydrogen(UNSEEN_HYDROGEN),
    "test": _hydrogen(RESERVED_HYDROGEN),
}
GM_KIT_PRESETS = [0, 8, 16, 24, 25, 32, 40]
#: SoundFonts with fewer drum kits than GM's seven.
KIT_PRESETS = {OPL3.name: [0]}
SHARDS = 8
MAX_STEMS = 6
MAX_EXCERPT_S = 60.0
MIN_EXCERPT_S = 20.0


@dataclass(frozen=True)
class RenderConfig:
    out: Path
    timbres: str
    hours: float
    seed: int = 0
    sample_rate: int = 44100
    workers: int = 2
    midi_cache: Path = Path("data/midi_music21")
    #: Share of tracks drawn from MMA grooves (the rest from the music21 corpus).
    mma_share: float = 0.5
    soundfonts: tuple[Path, ...] | None = None


@dataclass
class TrackPlan:
    index: int
    track: str
    source: str
    work: str
    soundfont: str
    kit: tuple[str, int, int]
    seconds: float
    start: float = 0.0
    midi: str | None = None
    groove: str | None = None
    chart_seed: int | None = None
    extra: dict = field(default_factory=dict)


def _rng(seed: int, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, purpose])


def music21_pool(cache: Path, split: str) -> list[Path]:
    split = MUSIC_SPLIT[split]
    pool = []
    for path in sorted(cache.glob("*.mid")):
        work = MUSIC21 + path.name.split("#")[0].removesuffix(".mid").replace("__", "/")
        if split_of(work) == split:
            pool.append(path)
    return pool


def mma_pool(split: str) -> list[tuple[str, str]]:
    split = MUSIC_SPLIT[split]
    return [(file, groove) for file, grooves in grooves_by_file().items() if split_of(MMA + file) == split
            for groove in grooves]


def _own_kits(timbre: str) -> list[tuple[str, int, int]]:
    """The drum kits a melodic timbre brings: a SoundFont's GM kits, a TiMidity config's one drum set, a random
    procedural kit per track (none for the FM voices)."""
    if timbre in PROCEDURAL_TIMBRES:
        return [(timbre, 0, 0)] if PROCEDURAL_TIMBRES[timbre][1] else []
    presets = [0] if Path(timbre).suffix == ".cfg" else KIT_PRESETS.get(Path(timbre).name, GM_KIT_PRESETS)
    return [(timbre, 128, preset) for preset in presets]


def plan_tracks(config: RenderConfig) -> list[TrackPlan]:
    """Draw tracks until their total length reaches config.hours."""
    music = music21_pool(config.midi_cache, config.timbres)
    grooves = mma_pool(config.timbres)
    soundfonts = [str(p) for p in (config.soundfonts or SOUNDFONTS[config.timbres])]
    kits = [kit for sf in soundfonts for kit in _own_kits(sf)] + \
        [(str(sf), b, p) for sf, b, p in EXTRA_KITS[config.timbres] if config.soundfonts is None]
    if not music and not grooves:
        raise RuntimeError(f"no {config.timbres} music found (music21 cache: {config.midi_cache})")
    plans, total, index = [], 0.0, 0
    while total < config.hours * 3600:
        rng = _rng(config.seed, index, 0)
        soundfont = soundfonts[int(rng.integers(len(soundfonts)))]
        kit = kits[int(rng.integers(len(kits)))]
        use_mma = grooves and (not music or rng.random() < config.mma_share)
        track = f"t{index:06d}"
        if use_mma:
            file, groove = grooves[int(rng.integers(len(grooves)))]
            seconds = MAX_EXCERPT_S
            plan = TrackPlan(index, track, "mma", MMA + file, soundfont, kit, seconds, groove=groove,
                             chart_seed=int(rng.integers(2**31)))
        else:
            path = music[int(rng.integers(len(music)))]
            length = max((p.end for p in read_midi(path)), default=0.0)
            seconds = float(min(length, rng.uniform(MIN_EXCERPT_S, MAX_EXCERPT_S)))
            start = float(rng.uniform(0, max(0.0, length - seconds)))
            work = MUSIC21 + path.name.split("#")[0].removesuffix(".mid").replace("__", "/")
            plan = TrackPlan(index, track, "music21", work, soundfont, kit, seconds, start=start, midi=str(path))
        if plan.seconds >= 2.0:
            plans.append(plan)
            total += plan.seconds
        index += 1
    return plans


def excerpt(parts: list[Part], start: float, seconds: float) -> list[Part]:
    """Notes that start inside [start, start + seconds), shifted to 0 and cut at the excerpt's end."""
    out = []
    for part in parts:
        notes = [type(n)(n.start - start, min(n.end, start + seconds) - start, n.pitch, n.velocity)
                 for n in part.notes if start <= n.start < start + seconds]
        if notes:
            out.append(Part(part.name, part.program, notes, part.is_drum))
    return out


def room_impulse(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """A stereo exponentially decaying noise tail: a plain, seeded stand-in for a room."""
    rt60 = rng.uniform(0.3, 1.8)
    t = np.arange(int(rt60 * sample_rate)) / sample_rate
    decay = np.exp(-6.9 * t / rt60)
    ir = rng.standard_normal((2, t.size)) * decay
    return (ir / np.sqrt(np.sum(ir**2, axis=1, keepdims=True))).astype(np.float32)


def part_file_name(position: int, part: Part) -> str:
    return f"{position:02d}_{re.sub(r'[^A-Za-z0-9]+', '-', part.name).strip('-')[:40] or 'part'}.flac"


class ShardRenderer:
    """Renders one shard's tracks in order, with its own synths (one load per SoundFont)."""

    def __init__(self, config: RenderConfig) -> None:
        self.config = config
        self.synths: dict[str, SoundFontSynth | TimiditySynth | HydrogenKit] = {}

    def synth(self, timbre: str) -> SoundFontSynth | TimiditySynth | HydrogenKit | ProceduralSynth:
        """The renderer of a SoundFont, a TiMidity config, a Hydrogen kit (its drumkit.xml) or procedural voices,
        loaded once per shard."""
        if timbre not in self.synths:
            kinds = {".xml": HydrogenKit, ".cfg": TimiditySynth}
            kind = ProceduralSynth if timbre in PROCEDURAL_TIMBRES else kinds.get(Path(timbre).suffix, SoundFontSynth)
            self.synths[timbre] = kind(timbre, sample_rate=self.config.sample_rate)
        return self.synths[timbre]

    def close(self) -> None:
        for synth in self.synths.values():
            synth.close()

    def parts_for(self, plan: TrackPlan, scratch: Path) -> list[Part]:
        if plan.source == "mma":
            midi = render_groove_midi(plan.groove, plan.chart_seed, scratch / f"{plan.track}.mid")
            parts = read_midi(midi)
            midi.unlink()
        else:
            parts = read_midi(plan.midi)
        parts = excerpt(parts, plan.start, plan.seconds)
        rng = _rng(self.config.seed, plan.index, 1)
        if len(parts) > MAX_STEMS:
            keep = sorted(rng.choice(len(parts), MAX_STEMS, replace=False))
            parts = [parts[i] for i in keep]
        assign_programs(parts, rng, keep_family=plan.source == "mma", available=self.synth(plan.soundfont).programs)
        return parts

    def render_part(self, plan: TrackPlan, position: int, part: Part, samples: int) -> tuple[np.ndarray, str]:
        """One part alone, (2, samples), and its timbre label: the track's drum kit or melodic timbre. Procedural
        voices are drawn from the part's own seed, so every stem is a new voice."""
        if part.is_drum:
            source, bank, preset = plan.kit
        else:
            source, bank, preset = plan.soundfont, None, None
        synth = self.synth(source)
        if isinstance(synth, ProceduralSynth):
            seed = int(_rng(self.config.seed, plan.index, 100 + position).integers(2**31))
            return synth.render(part, samples, seed=seed), synth.voice_name(part, seed)
        if not part.is_drum:
            return synth.render(part, samples), Path(source).name
        kit = Path(source)
        timbre = f"hydrogen:{kit.parent.name}" if kit.name == "drumkit.xml" else f"{kit.name}:{bank}:{preset}"
        return synth.render(part, samples, bank=bank, preset=preset), timbre

    def render(self, plan: TrackPlan) -> dict:
        rate = self.config.sample_rate
        folder = self.config.out / plan.track
        (folder / "stems").mkdir(parents=True, exist_ok=True)
        parts = self.parts_for(plan, folder)
        plan.seconds = min(plan.seconds, max((p.end for p in parts), default=0.0))
        samples = int(round((plan.seconds + TAIL_SECONDS) * rate))
        rng = _rng(self.config.seed, plan.index, 2)
        room = room_impulse(rng, rate)
        stems, records = [], []
        for position, part in enumerate(parts):
            audio, timbre = self.render_part(plan, position, part, samples)
            family = family_of(part.program, part.is_drum)
            chain = draw_chain(_rng(self.config.seed, plan.index, 10 + position), family) \
                if PRODUCTION[self.config.timbres] else []
            audio = apply_chain(audio, chain, rate)
            wet = float(rng.uniform(0.0, 0.35)) if rng.random() < 0.8 else 0.0
            if wet > 0 and np.any(audio):
                tail = np.stack([fftconvolve(audio[c], room[c])[:samples] for c in range(2)])
                audio = (1 - wet) * audio + wet * tail.astype(np.float32)
            gain_db = float(rng.uniform(-9.0, 0.0))
            audio *= 10 ** (gain_db / 20)
            stems.append(audio)
            records.append({"file": f"stems/{part_file_name(position, part)}", "part": part.name,
                            "program": part.program, "family": family, "is_drum": part.is_drum, "timbre": timbre,
                            "production": chain, "gain_db": gain_db, "wet": wet,
                            # the score of this stem: pitch supervision for the refiner's VAE
                            "notes": [[round(n.start, 4), round(n.end, 4), n.pitch, n.velocity] for n in part.notes]})
        mix = np.sum(stems, axis=0) if stems else np.zeros((2, samples), np.float32)
        # Stems and mix scaled together, so that neither the mix nor any stem clips.
        peak = max([np.abs(mix).max()] + [np.abs(s).max() for s in stems]) + 1e-9
        scale = float(rng.uniform(0.5, 0.95)) / peak
        for record, audio in zip(records, stems):
            sf.write(folder / record["file"], (audio * scale).T, rate, subtype="PCM_16")
        sf.write(folder / "mix.flac", (mix * scale).T, rate, subtype="PCM_16")
        meta = {**asdict(plan), "split": self.config.timbres, "sample_rate": rate, "samples": samples,
                "stems": records}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        return meta


def _render_shard(args: tuple[RenderConfig, list[TrackPlan], object]) -> list[dict]:
    config, plans, done_queue = args
    renderer = ShardRenderer(config)
    metas = []
    try:
        for plan in plans:
            done = config.out / plan.track / "meta.json"  # written last: the track is complete
            meta = json.loads(done.read_text()) if done.exists() else renderer.render(plan)
            metas.append(meta)
            if done_queue is not None:
                done_queue.put(sum(1 for _ in meta["stems"]) * plan.seconds)
    finally:
        renderer.close()
    return metas


def render_dataset(config: RenderConfig) -> list[dict]:
    """Plan and render; returns every track's metadata (also written to OUT/index.json)."""
    from tqdm import tqdm

    plans = plan_tracks(config)
    config.out.mkdir(parents=True, exist_ok=True)
    shards = [[p for p in plans if p.index % SHARDS == s] for s in range(SHARDS)]
    shards = [s for s in shards if s]
    stem_hours = tqdm(total=None, unit="stem-s", desc=f"render {config.timbres}")
    if config.workers <= 1:
        metas = []
        for shard in shards:
            metas += _render_shard((config, shard, None))
            stem_hours.update(sum(len(m["stems"]) * m["seconds"] for m in metas[-len(shard):]))
    else:
        with multiprocessing.get_context("spawn").Manager() as manager:
            queue = manager.Queue()
            with multiprocessing.get_context("spawn").Pool(config.workers) as pool:
                pending = pool.map_async(_render_shard, [(config, shard, queue) for shard in shards])
                while not pending.ready() or not queue.empty():
                    try:
                        stem_hours.update(queue.get(timeout=0.5))
                    except Exception:
                        pass
                metas = [m for shard in pending.get() for m in shard]
    stem_hours.close()
    metas.sort(key=lambda m: m["index"])
    (config.out / "index.json").write_text(json.dumps(
        {"timbres": config.timbres, "seed": config.seed, "sample_rate": config.sample_rate,
         "tracks": [m["track"] for m in metas]}, indent=1))
    return metas
