"""Shared fixtures: synthetic sources with known ground truth, written as real audio files."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

RATE = 44100


def tone_sequence(pitches, note_seconds: float, *, harmonics: str, rate: int = RATE) -> np.ndarray:
    """Decaying harmonic notes: 'saw' (all harmonics, 1/k) or 'hollow' (odd harmonics, 1/k²)."""
    ks = range(1, 30) if harmonics == "saw" else (1, 3, 5, 7)
    power = 1 if harmonics == "saw" else 2
    t = np.arange(int(note_seconds * rate)) / rate
    envelope = np.exp(-3 * t) * (1 - np.exp(-200 * t))
    notes = []
    for pitch in pitches:
        f0 = 440.0 * 2 ** ((pitch - 69) / 12)
        wave = sum(np.sin(2 * np.pi * k * f0 * t) / k**power for k in ks if k * f0 < rate / 2)
        notes.append(wave * envelope)
    signal = np.concatenate(notes)
    return (0.3 * signal / np.abs(signal).max()).astype(np.float32)


def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    estimate, reference = estimate.ravel().astype(np.float64), reference.ravel().astype(np.float64)
    scale = estimate @ reference / (reference @ reference)
    projection = scale * reference
    return float(10 * np.log10(np.sum(projection**2) / np.sum((estimate - projection) ** 2)))


@pytest.fixture(scope="session")
def two_sources():
    """(mix, target, query) mono at 44.1 kHz: a low saw-like line (target) under a high hollow line."""
    rng = np.random.default_rng(7)
    target = tone_sequence(rng.integers(40, 55, 16), 0.5, harmonics="saw")
    other = tone_sequence(rng.integers(65, 80, 20), 0.4, harmonics="hollow")
    length = min(len(target), len(other))
    target, other = target[:length], other[:length]
    query = tone_sequence(rng.integers(40, 55, 6), 0.5, harmonics="saw") * 0.5
    return (target + other)[None], target[None], query[None]


@pytest.fixture()
def write_audio(tmp_path):
    """write_audio(name, samples (C, N) or (N,), rate=44100, subtype='FLOAT') → path of a real file."""

    def write(name: str, samples, rate: int = RATE, subtype: str = "FLOAT"):
        samples = np.asarray(samples, np.float32)
        if samples.ndim == 1:
            samples = samples[None]
        path = tmp_path / name
        sf.write(path, samples.T, rate, subtype=subtype)
        return path

    return write


# -- tiny untrained learned engines, shipped into a temporary weights folder ---------------------------------------
TINY_VAE = dict(bands=32, block_channels=(8, 16, 16), pitches=128)
TINY_REFINER = dict(block_channels=(16, 32), cross_attention_dim=16, steps=3, residual=True)
TINY_SEPARATOR = dict(dim=16, layers=1, bands=8, d_state=8, headdim=16, query_dim=16, chunk=16)


def tiny_refiner(seed: int = 0):
    import torch

    from stemquery.model.refiner import LatentRefiner, RefinerConfig
    from stemquery.model.vae import TimbrePitchVAE, VAEConfig

    torch.manual_seed(seed)
    return LatentRefiner(RefinerConfig(**TINY_REFINER), TimbrePitchVAE(VAEConfig(**TINY_VAE))).eval()


@pytest.fixture()
def tiny_shipped(tmp_path, monkeypatch):
    """Untrained tiny separator and refiner as shipped files in a temporary weights folder (for tests); returns
    the refiner."""
    import torch

    from stemquery.model.bsmamba import BSMamba, BSMambaConfig
    from stemquery.model.engines import bsmamba as engine_module
    from stemquery.model.refiner import save_refiner

    torch.manual_seed(0)
    engine_module.save_weights(BSMamba(BSMambaConfig(**TINY_SEPARATOR)), tmp_path / engine_module.WEIGHTS_NAME,
                               extra={"note": "untrained"})
    refiner = tiny_refiner()
    save_refiner(refiner, tmp_path / engine_module.REFINER_NAME, extra={"note": "untrained"})
    monkeypatch.setattr(engine_module, "WEIGHTS_DIR", tmp_path)
    return refiner
