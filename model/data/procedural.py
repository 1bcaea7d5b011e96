"""Procedural instruments: a random synthesizer voice per stem, rendered from the same note lists as the SoundFonts.

SoundFont banks give each General-MIDI program three or four timbres, few enough for a separator to learn them by
heart instead of listening to its query. A voice drawn here is one no bank has: its parameters (spectrum, formants,
envelopes, filter sweep, detune, vibrato, stereo width) are drawn from the stem's seed and fixed for the whole stem,
so a query cut from the same stem tells the truth about the target while the timbre is new every time.

Kinds of voice (`VOICE_KINDS`), each fitted to the GM family it stands in for (a bass line stays low and plucked or
filtered, a pad swells):
- `additive`: harmonics with a spectral tilt, one to three fixed formant peaks and faster decay of the upper
  partials;
- `subtractive`: saw / square / pulse oscillators, detuned copies, a resonant low-pass whose cutoff follows its own
  envelope (done per harmonic, so it is band-limited and vectorised);
- `fm`: two-operator frequency modulation with an index envelope (bells, electric pianos, basses, brass);
- `pluck`: a plucked string (partials damped by frequency, a pluck-position comb);
- drums (`DrumKitVoice`): kick, snare, hats, toms, cymbals, claps and hand percussion from sine sweeps and shaped
  noise.

`ProceduralSynth(kinds)` renders parts with voices of those kinds only: the training set and the unseen-timbre
validation set draw from disjoint kinds (`fm` is held out).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stemquery.model.data.instruments import family_of
from stemquery.model.data.synth import Part

VOICE_KINDS = ("additive", "subtractive", "fm", "pluck")
#: Which kinds can stand in for a GM family (a kind not offered by the synth is skipped).
KINDS_BY_FAMILY = {
    "piano": ("additive", "fm", "pluck"), "chromatic_percussion": ("fm", "additive", "pluck"),
    "organ": ("additive", "subtractive"), "guitar": ("pluck", "subtractive", "fm"),
    "bass": ("pluck", "subtractive", "fm"), "strings": ("subtractive", "additive"),
    "ensemble": ("subtractive", "additive"), "brass": ("subtractive", "fm", "additive"),
    "reed": ("additive", "subtractive", "fm"), "pipe": ("additive", "fm"),
    "synth_lead": ("subtractive", "fm", "additive"), "synth_pad": ("subtractive", "additive", "fm"),
}
#: (attack s, decay s, sustain level, release s) ranges per family: how the family's notes start and end.
ENVELOPES = {
    "piano": ((0.001, 0.01), (0.4, 2.5), (0.0, 0.2), (0.05, 0.3)),
    "chromatic_percussion": ((0.001, 0.005), (0.3, 2.0), (0.0, 0.1), (0.1, 0.6)),
    "organ": ((0.005, 0.04), (0.1, 0.5), (0.8, 1.0), (0.02, 0.1)),
    "guitar": ((0.001, 0.008), (0.3, 2.0), (0.0, 0.3), (0.05, 0.3)),
    "bass": ((0.002, 0.02), (0.2, 1.2), (0.2, 0.8), (0.03, 0.15)),
    "strings": ((0.04, 0.3), (0.2, 1.0), (0.7, 1.0), (0.1, 0.5)),
    "ensemble": ((0.05, 0.4), (0.2, 1.0), (0.7, 1.0), (0.2, 0.8)),
    "brass": ((0.02, 0.08), (0.1, 0.5), (0.6, 0.9), (0.05, 0.2)),
    "reed": ((0.01, 0.06), (0.1, 0.5), (0.7, 1.0), (0.03, 0.15)),
    "pipe": ((0.02, 0.1), (0.1, 0.5), (0.7, 1.0), (0.03, 0.2)),
    "synth_lead": ((0.002, 0.05), (0.1, 0.8), (0.5, 1.0), (0.02, 0.3)),
    "synth_pad": ((0.2, 1.0), (0.5, 2.0), (0.6, 1.0), (0.3, 1.5)),
}
MAX_HARMONICS = 48


def midi_hz(pitch: float) -> float:
    return 440.0 * 2 ** ((pitch - 69) / 12)


@dataclass(frozen=True)
class VoiceParams:
    """Everything that makes one melodic voice (drawn once per stem)."""

    kind: str
    attack: float
    decay: float
    sustain: float
    release: float
    tilt_db: float  # per octave, negative: darker
    formants_hz: tuple[float, ...]
    formant_gain_db: tuple[float, ...]
    formant_width: float  # octaves
    partial_damping: float  # extra decay per harmonic number (1/s)
    waveform: str  # subtractive: saw, square, pulse
    pulse_width: float
    detune_cents: float
    voices: int
    cutoff_ratio: float  # subtractive: cutoff at sustain, as a multiple of the note frequency
    cutoff_env: float  # how far the cutoff opens at the attack (multiplier)
    cutoff_decay: float  # s
    resonance: float
    fm_ratio: float
    fm_index: float
    fm_index_decay: float
    pluck_position: float
    vibrato_hz: float
    vibrato_cents: float
    noise: float  # breath / bow noise share
    width: float  # stereo spread of detuned voices
    pan: float


def draw_voice(rng: np.random.Generator, family: str, kinds: tuple[str, ...]) -> VoiceParams:
    """A random voice for a melodic GM `family`, of one of `kinds`."""
    allowed = [k for k in KINDS_BY_FAMILY.get(family, VOICE_KINDS) if k in kinds] or list(kinds)
    kind = allowed[int(rng.integers(len(allowed)))]
    attack, decay, sustain, release = (float(rng.uniform(*r)) for r in ENVELOPES.get(family, ENVELOPES["synth_lead"]))
    formants = int(rng.integers(1, 4))
    sustained = family in ("strings", "ensemble", "reed", "brass", "pipe", "synth_lead", "synth_pad")
    return VoiceParams(
        kind=kind, attack=attack, decay=decay, sustain=sustain, release=release,
        tilt_db=float(rng.uniform(-9.0, -1.5)),
        formants_hz=tuple(float(f) for f in np.sort(np.exp(rng.uniform(np.log(300), np.log(5000), formants)))),
        formant_gain_db=tuple(float(g) for g in rng.uniform(3.0, 18.0, formants)),
        formant_width=float(rng.uniform(0.15, 0.6)),
        partial_damping=float(rng.uniform(0.0, 1.5)),
        waveform=str(rng.choice(["saw", "square", "pulse"])), pulse_width=float(rng.uniform(0.1, 0.45)),
        detune_cents=float(rng.uniform(0.0, 18.0)), voices=int(rng.integers(1, 4)),
        cutoff_ratio=float(np.exp(rng.uniform(np.log(1.5), np.log(16.0)))),
        cutoff_env=float(np.exp(rng.uniform(0.0, np.log(8.0)))), cutoff_decay=float(rng.uniform(0.05, 1.2)),
        resonance=float(rng.uniform(0.0, 0.9)),
        fm_ratio=float(rng.choice([0.5, 1.0, 1.0, 2.0, 3.0, 4.0, 1.41, 2.76, 3.5, 7.0])),
        fm_index=float(rng.uniform(0.3, 6.0)), fm_index_decay=float(rng.uniform(0.05, 2.0)),
        pluck_position=float(rng.uniform(0.05, 0.45)),
        vibrato_hz=float(rng.uniform(4.0, 7.0)),
        vibrato_cents=float(rng.uniform(5.0, 25.0)) if sustained and rng.random() < 0.6 else 0.0,
        noise=float(rng.uniform(0.0, 0.06)) if family in ("pipe", "reed", "strings") else 0.0,
        width=float(rng.uniform(0.0, 1.0)), pan=float(rng.uniform(-0.6, 0.6)),
    )


def _envelope(v: VoiceParams, length: int, held: int, rate: int) -> np.ndarray:
    """ADSR over `length` samples, the note held for `held` samples, then the release."""
    t = np.arange(length) / rate
    attack = np.clip(t / max(v.attack, 1e-4), 0.0, 1.0)
    decay = v.sustain + (1 - v.sustain) * np.exp(-np.maximum(t - v.attack, 0.0) / max(v.decay, 1e-3) * 3)
    env = attack * decay
    off = held / rate
    level_at_off = float(env[min(held, length - 1)]) if length else 0.0
    after = t >= off
    env[after] = level_at_off * np.exp(-(t[after] - off) / max(v.release, 1e-3) * 5)
    return env


#: Times (s after the onset) of the wavetable snapshots a note morphs through: dense where sounds change fast.
SNAPSHOT_TIMES = np.array([0.0, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4])
TABLE_SIZE = 2048


def _harmonic_amplitudes(v: VoiceParams, f0: float, rate: int) -> np.ndarray:
    """Amplitude of each harmonic below Nyquist: waveform or spectral tilt, pluck comb, formant peaks."""
    count = max(1, min(MAX_HARMONICS, int(0.45 * rate / f0)))
    k = np.arange(1, count + 1, dtype=np.float64)
    if v.kind == "subtractive":
        if v.waveform == "saw":
            amps = 1 / k
        elif v.waveform == "square":
            amps = np.where(k % 2 == 1, 1 / k, 0.0)
        else:
            amps = np.abs(np.sin(np.pi * k * v.pulse_width)) / k
    elif v.kind == "pluck":
        amps = np.abs(np.sin(np.pi * k * v.pluck_position)) / k
    else:
        amps = 10 ** (v.tilt_db * np.log2(k) / 20)
    if v.kind in ("additive", "pluck"):
        boost = np.zeros_like(k)
        for centre, gain in zip(v.formants_hz, v.formant_gain_db):
            boost += gain * np.exp(-0.5 * (np.log2(f0 * k / centre) / v.formant_width) ** 2)
        amps = amps * 10 ** (boost / 20)
    return amps


def _harmonic_gains(v: VoiceParams, f0: float, count: int, times: np.ndarray) -> np.ndarray:
    """(snapshots, harmonics) time-varying gain: the resonant low-pass sweep, or upper partials dying first."""
    k = np.arange(1, count + 1, dtype=np.float64)
    if v.kind == "subtractive":
        cutoff = f0 * v.cutoff_ratio * (1 + (v.cutoff_env - 1) * np.exp(-times / v.cutoff_decay))
        x = f0 * k[None, :] / cutoff[:, None]
        return 1 / np.sqrt(1 + x**4) * (1 + v.resonance * 4 * np.exp(-((x - 1) ** 2) / 0.02))
    return np.exp(-np.outer(times, v.partial_damping * (k - 1)))


def _wavetables(v: VoiceParams, f0: float, rate: int, phases: np.ndarray) -> np.ndarray:
    """(snapshots, TABLE_SIZE + 1) one period of the waveform at each snapshot time (wrapped for interpolation)."""
    amps = _harmonic_amplitudes(v, f0, rate)
    gains = _harmonic_gains(v, f0, len(amps), SNAPSHOT_TIMES)
    spectrum = np.zeros((len(SNAPSHOT_TIMES), TABLE_SIZE // 2 + 1), complex)
    spectrum[:, 1: len(amps) + 1] = amps * gains * np.exp(1j * phases[: len(amps)]) * (TABLE_SIZE / 2)
    tables = np.fft.irfft(spectrum, n=TABLE_SIZE, axis=-1)
    return np.concatenate([tables, tables[:, :1]], axis=1)


def _note(v: VoiceParams, pitch: int, velocity: int, held: int, length: int, rate: int,
          rng: np.random.Generator) -> np.ndarray:
    """One note of the voice, mono, `length` samples: FM computed directly, the other kinds as wavetables that
    morph through `SNAPSHOT_TIMES` (the harmonic synthesis they stand for, at a fraction of its cost)."""
    f0 = midi_hz(pitch)
    t = np.arange(length) / rate
    env = _envelope(v, length, held, rate)
    vibrato = 2 ** (v.vibrato_cents / 1200 * np.sin(2 * np.pi * v.vibrato_hz * t) *
                    np.clip(t / 0.3, 0, 1)) if v.vibrato_cents else np.ones(length)
    out = np.zeros(length)
    detunes = np.linspace(-v.detune_cents, v.detune_cents, v.voices) if v.voices > 1 else np.zeros(1)
    snapshot = np.interp(t, SNAPSHOT_TIMES, np.arange(len(SNAPSHOT_TIMES)))
    row = np.minimum(snapshot.astype(int), len(SNAPSHOT_TIMES) - 2)
    morph = snapshot - row
    tables = None
    for cents in detunes:
        f = f0 * 2 ** (cents / 1200)
        cycles = np.cumsum(f * vibrato) / rate + rng.uniform(0, 1)
        if v.kind == "fm":
            index = v.fm_index * (0.3 + 0.7 * np.exp(-t / v.fm_index_decay))
            out += np.sin(2 * np.pi * cycles + index * np.sin(2 * np.pi * v.fm_ratio * cycles))
            continue
        if tables is None:
            tables = _wavetables(v, f0, rate, rng.uniform(0, 2 * np.pi, MAX_HARMONICS))
        position = (cycles % 1.0) * TABLE_SIZE
        index = position.astype(int)
        frac = position - index
        here = tables[row, index] * (1 - frac) + tables[row, index + 1] * frac
        there = tables[row + 1, index] * (1 - frac) + tables[row + 1, index + 1] * frac
        out += here * (1 - morph) + there * morph
    out /= max(len(detunes), 1)
    if v.noise > 0:
        out += v.noise * rng.standard_normal(length) * np.max(np.abs(out) + 1e-9)
    peak = np.max(np.abs(out)) + 1e-9
    return out / peak * env * (velocity / 127) ** 1.5


def render_melodic(part: Part, samples: int, rate: int, v: VoiceParams, rng: np.random.Generator) -> np.ndarray:
    """`part` played by voice `v` into (2, samples) float32."""
    left, right = np.zeros(samples), np.zeros(samples)
    pan_l, pan_r = np.cos((v.pan + 1) * np.pi / 4), np.sin((v.pan + 1) * np.pi / 4)
    for n in part.notes:
        start = int(round(n.start * rate))
        if start >= samples:
            continue
        held = max(1, int(round((n.end - n.start) * rate)))
        length = min(samples - start, held + int(v.release * rate) + 1)
        mono = _note(v, n.pitch, n.velocity, held, length, rate, rng)
        spread = v.width * rng.uniform(-0.3, 0.3)
        left[start: start + length] += mono * (pan_l + spread)
        right[start: start + length] += mono * (pan_r - spread)
    return np.stack([left, right]).astype(np.float32) * 0.3


# -- drums ------------------------------------------------------------------------------------------------------
#: GM drum notes → the kind of drum that plays them.
DRUM_KIND = {35: "kick", 36: "kick", 37: "rim", 38: "snare", 40: "snare", 39: "clap", 42: "hat", 44: "hat",
             46: "open_hat", 41: "tom", 43: "tom", 45: "tom", 47: "tom", 48: "tom", 50: "tom", 49: "cymbal",
             52: "cymbal", 55: "cymbal", 57: "cymbal", 51: "ride", 53: "ride", 59: "ride", 54: "shaker",
             69: "shaker", 70: "shaker", 56: "cowbell", 60: "tom", 61: "tom", 62: "tom", 63: "tom", 64: "tom"}


@dataclass(frozen=True)
class DrumKitVoice:
    """One procedural drum kit: per drum kind its tuning, decay and noise colour."""

    params: dict  # kind → dict of floats

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "DrumKitVoice":
        u = rng.uniform
        return cls({
            "kick": {"f_hi": u(80, 250), "f_lo": u(35, 60), "sweep": u(0.01, 0.08), "decay": u(0.15, 0.6),
                     "click": u(0.0, 0.5), "drive": u(1.0, 4.0)},
            "snare": {"tone": u(150, 280), "tone_decay": u(0.05, 0.2), "noise_decay": u(0.08, 0.35),
                      "noise_lo": u(800, 3000), "noise_hi": u(5000, 14000), "mix": u(0.4, 0.9)},
            "clap": {"bursts": int(rng.integers(2, 5)), "gap": u(0.006, 0.015), "decay": u(0.08, 0.25),
                     "lo": u(700, 1500), "hi": u(2500, 6000)},
            "rim": {"tone": u(400, 1800), "decay": u(0.01, 0.05)},
            "hat": {"lo": u(5000, 9000), "decay": u(0.02, 0.09), "metal": u(0.0, 0.6)},
            "open_hat": {"lo": u(4000, 8000), "decay": u(0.2, 0.7), "metal": u(0.0, 0.6)},
            "cymbal": {"lo": u(2500, 6000), "decay": u(0.8, 2.5), "metal": u(0.2, 0.8)},
            "ride": {"lo": u(3000, 7000), "decay": u(0.6, 1.8), "metal": u(0.4, 1.0)},
            "tom": {"f_base": u(70, 140), "spread": u(1.3, 2.2), "decay": u(0.15, 0.6), "sweep": u(0.1, 0.5)},
            "shaker": {"lo": u(3000, 8000), "decay": u(0.03, 0.12)},
            "cowbell": {"f1": u(500, 900), "ratio": u(1.4, 1.6), "decay": u(0.1, 0.4)},
            "pan": {k: float(u(-0.5, 0.5)) for k in ("hat", "open_hat", "cymbal", "ride", "tom", "shaker")},
        })


def _band_noise(rng: np.random.Generator, length: int, lo: float, hi: float, rate: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(length))
    freqs = np.fft.rfftfreq(length, 1 / rate)
    spectrum[(freqs < lo) | (freqs > min(hi, 0.49 * rate))] = 0
    noise = np.fft.irfft(spectrum, n=length)
    return noise / (np.max(np.abs(noise)) + 1e-9)


def _drum_hit(kit: DrumKitVoice, kind: str, pitch: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    p = kit.params[kind]
    decay = p.get("decay", 0.3)
    length = int(min(3.0, 5 * decay + 0.05) * rate)
    t = np.arange(length) / rate
    if kind == "kick":
        freq = p["f_lo"] + (p["f_hi"] - p["f_lo"]) * np.exp(-t / p["sweep"])
        body = np.tanh(p["drive"] * np.sin(2 * np.pi * np.cumsum(freq) / rate)) * np.exp(-t / p["decay"] * 3)
        return body + p["click"] * _band_noise(rng, length, 1000, 8000, rate) * np.exp(-t / 0.004)
    if kind == "snare":
        length = int(5 * max(p["noise_decay"], p["tone_decay"]) * rate)
        t = np.arange(length) / rate
        tone = np.sin(2 * np.pi * p["tone"] * t) * np.exp(-t / p["tone_decay"] * 3)
        noise = _band_noise(rng, length, p["noise_lo"], p["noise_hi"], rate) * np.exp(-t / p["noise_decay"] * 3)
        return (1 - p["mix"]) * tone + p["mix"] * noise
    if kind == "clap":
        out = np.zeros(length)
        noise = _band_noise(rng, length, p["lo"], p["hi"], rate)
        for burst in range(p["bursts"]):
            start = burst * p["gap"]
            late = t >= start
            out[late] += noise[late] * np.exp(-(t[late] - start) / (decay if burst == p["bursts"] - 1 else 0.01))
        return out
    if kind == "rim":
        return np.sin(2 * np.pi * p["tone"] * t) * np.exp(-t / p["decay"] * 3)
    if kind == "tom":
        base = p["f_base"] * p["spread"] ** ((pitch - 41) / 12)
        freq = base * (1 + p["sweep"] * np.exp(-t / 0.05))
        return np.sin(2 * np.pi * np.cumsum(freq) / rate) * np.exp(-t / p["decay"] * 3)
    if kind == "cowbell":
        tone = np.sign(np.sin(2 * np.pi * p["f1"] * t)) + np.sign(np.sin(2 * np.pi * p["f1"] * p["ratio"] * t))
        return 0.5 * tone * np.exp(-t / p["decay"] * 3)
    noise = _band_noise(rng, length, p["lo"], 16000, rate)
    if p.get("metal"):
        ring = sum(np.sign(np.sin(2 * np.pi * f * t)) for f in (p["lo"] / 12.3, p["lo"] / 9.1, p["lo"] / 7.4))
        noise = (1 - p["metal"]) * noise + p["metal"] * 0.3 * ring * _band_noise(rng, length, p["lo"], 16000, rate)
    return noise * np.exp(-t / decay * 3)


def render_drums(part: Part, samples: int, rate: int, kit: DrumKitVoice, rng: np.random.Generator) -> np.ndarray:
    """A GM drum part on a procedural kit into (2, samples) float32; notes the kit cannot play are left out."""
    out = np.zeros((2, samples))
    cache: dict[int, np.ndarray] = {}
    for n in part.notes:
        kind = DRUM_KIND.get(n.pitch)
        start = int(round(n.start * rate))
        if kind is None or start >= samples:
            continue
        if n.pitch not in cache:  # one sample per drum, as a sampled kit has (varied by velocity only)
            hit = _drum_hit(kit, kind, n.pitch, rate, rng)
            cache[n.pitch] = hit / (np.max(np.abs(hit)) + 1e-9)
        hit = cache[n.pitch][: samples - start] * (n.velocity / 127) ** 1.5
        pan = kit.params["pan"].get(kind, 0.0)
        out[0, start: start + len(hit)] += hit * np.cos((pan + 1) * np.pi / 4)
        out[1, start: start + len(hit)] += hit * np.sin((pan + 1) * np.pi / 4)
    return (out * 0.4).astype(np.float32)


class ProceduralSynth:
    """Renders parts with random voices of `kinds`, one voice per (part, seed): the renderer's synth interface.

    Its "timbre file" is a name, `procedural` (the training kinds) or `procedural-fm` (held out for the
    unseen-timbre validation set); see `PROCEDURAL_TIMBRES`."""

    programs: frozenset[int] = frozenset(range(128))

    def __init__(self, name: str, *, sample_rate: int = 44100) -> None:
        if name not in PROCEDURAL_TIMBRES:
            raise ValueError(f"{name!r} is not a procedural timbre ({', '.join(PROCEDURAL_TIMBRES)})")
        self.name, self.kinds, self.drums = name, *PROCEDURAL_TIMBRES[name]
        self.sample_rate = sample_rate

    def close(self) -> None:
        pass

    def voice_name(self, part: Part, seed: int) -> str:
        """The stem's timbre label: the synth, the voice kind and the seed (so each voice is its own timbre)."""
        rng = np.random.default_rng(seed)
        kind = "drums" if part.is_drum else draw_voice(rng, family_of(part.program), self.kinds).kind
        return f"{self.name}:{kind}:{seed}"

    def render(self, part: Part, samples: int, *, seed: int, **_) -> np.ndarray:
        rng = np.random.default_rng(seed)
        if part.is_drum:
            return render_drums(part, samples, self.sample_rate, DrumKitVoice.draw(rng), rng)
        voice = draw_voice(rng, family_of(part.program), self.kinds)
        return render_melodic(part, samples, self.sample_rate, voice, rng)


#: Procedural timbre sources: name → (voice kinds, whether it plays drums). Training and the unseen-timbre
#: validation set never share a kind.
PROCEDURAL_TIMBRES = {
    "procedural": (("additive", "subtractive", "pluck"), True),
    "procedural-fm": (("fm",), False),
}
