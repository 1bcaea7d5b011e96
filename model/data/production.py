"""Production chains per stem (pedalboard): how real guitars, keys and synths reach a mix.

A SoundFont renders an instrument as it sounds dry in a quiet room; in a record it has been through an amp, a
pedal or two, a compressor, filters and a reverb. A chain is drawn per stem (family-aware: guitars are driven more
often, pads get modulation and space), recorded in the track's meta.json, and applied to the whole stem before the
renderer's room; query and target cut from that stem carry the same chain, as in a real song.
"""
from __future__ import annotations

import numpy as np

#: Chance that a stem gets a chain at all.
CHAIN_P = 0.6
#: Chance of each effect by family ("*" for any family not listed), in chain order.
EFFECT_P = {
    "distortion": {"guitar": 0.45, "bass": 0.15, "synth_lead": 0.3, "organ": 0.25, "*": 0.05},
    "compressor": {"*": 0.5},
    "highpass": {"bass": 0.0, "drums": 0.1, "*": 0.25},
    "lowpass": {"*": 0.2},
    "ladder": {"synth_lead": 0.35, "synth_pad": 0.35, "bass": 0.2, "*": 0.05},
    "chorus": {"guitar": 0.3, "synth_pad": 0.4, "piano": 0.2, "strings": 0.2, "*": 0.1},
    "phaser": {"guitar": 0.15, "piano": 0.15, "synth_pad": 0.2, "organ": 0.2, "*": 0.05},
    "delay": {"guitar": 0.15, "synth_lead": 0.2, "*": 0.05},
    "bitcrush": {"drums": 0.08, "synth_lead": 0.08, "*": 0.02},
    "reverb": {"*": 0.3},
}


def _chance(effect: str, family: str) -> float:
    table = EFFECT_P[effect]
    return table.get(family, table["*"])


def _params(effect: str, rng: np.random.Generator) -> dict:
    u = rng.uniform
    if effect == "distortion":
        return {"drive_db": u(6, 30)}
    if effect == "compressor":
        return {"threshold_db": u(-30, -8), "ratio": u(2, 8), "attack_ms": u(1, 30), "release_ms": u(40, 300)}
    if effect == "highpass":
        return {"cutoff_frequency_hz": float(np.exp(u(np.log(60), np.log(600))))}
    if effect == "lowpass":
        return {"cutoff_frequency_hz": float(np.exp(u(np.log(1500), np.log(12000))))}
    if effect == "ladder":
        return {"cutoff_hz": float(np.exp(u(np.log(300), np.log(6000)))), "resonance": u(0.0, 0.7),
                "drive": u(1.0, 3.0)}
    if effect == "chorus":
        return {"rate_hz": u(0.2, 3.0), "depth": u(0.1, 0.5), "mix": u(0.3, 0.7)}
    if effect == "phaser":
        return {"rate_hz": u(0.1, 2.0), "depth": u(0.3, 0.9), "mix": u(0.3, 0.7)}
    if effect == "delay":
        return {"delay_seconds": u(0.08, 0.5), "feedback": u(0.1, 0.5), "mix": u(0.1, 0.35)}
    if effect == "bitcrush":
        return {"bit_depth": u(6, 10)}
    if effect == "reverb":
        return {"room_size": u(0.2, 0.9), "damping": u(0.2, 0.8), "wet_level": u(0.1, 0.4), "dry_level": 0.8}
    raise ValueError(effect)


def draw_chain(rng: np.random.Generator, family: str) -> list[tuple[str, dict]]:
    """A random chain for a stem of `family` (maybe empty): [(effect, parameters), ...] in processing order."""
    if rng.random() >= CHAIN_P:
        return []
    chain = [(effect, _params(effect, rng)) for effect in EFFECT_P if rng.random() < _chance(effect, family)]
    return chain


def _plugin(effect: str, params: dict):
    import pedalboard

    kinds = {"distortion": pedalboard.Distortion, "compressor": pedalboard.Compressor,
             "highpass": pedalboard.HighpassFilter, "lowpass": pedalboard.LowpassFilter,
             "ladder": pedalboard.LadderFilter, "chorus": pedalboard.Chorus, "phaser": pedalboard.Phaser,
             "delay": pedalboard.Delay, "bitcrush": pedalboard.Bitcrush, "reverb": pedalboard.Reverb}
    return kinds[effect](**params)


def apply_chain(audio: np.ndarray, chain: list[tuple[str, dict]], sample_rate: int) -> np.ndarray:
    """`audio` (channels, samples) float32 through `chain`, level matched to the input's RMS (a drive stage
    must not make the stem 20 dB louder than the mix planned it), same length."""
    if not chain or not np.any(audio):
        return audio
    import pedalboard

    board = pedalboard.Pedalboard([_plugin(effect, params) for effect, params in chain])
    out = board(np.ascontiguousarray(audio, dtype=np.float32), sample_rate, reset=True)
    out = np.nan_to_num(out[:, : audio.shape[1]])
    rms_in, rms_out = np.sqrt(np.mean(audio**2)), np.sqrt(np.mean(out**2))
    return (out * (rms_in / rms_out if rms_out > 1e-9 else 0.0)).astype(np.float32)
