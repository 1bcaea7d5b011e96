"""Audio files in and out: float32 (channels, samples) arrays, exact-length resampling, atomic writes."""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from stemquery.model.errors import AudioInputError, OutputError

log = logging.getLogger(__name__)

MAX_CHANNELS = 2


@dataclass(frozen=True)
class OutputFormat:
    """How stems are written: WAV (16/24/32-bit float) or FLAC (16/24-bit)."""

    container: str = "wav"
    bit_depth: int = 32

    _SUBTYPES = {
        ("wav", 16): "PCM_16",
        ("wav", 24): "PCM_24",
        ("wav", 32): "FLOAT",
        ("flac", 16): "PCM_16",
        ("flac", 24): "PCM_24",
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "container", self.container.lower())
        object.__setattr__(self, "bit_depth", int(self.bit_depth))
        if self.container not in ("wav", "flac"):
            raise OutputError(f"output format {self.container!r} is not supported: use wav or flac")
        if (self.container, self.bit_depth) not in self._SUBTYPES:
            raise OutputError(
                f"{self.container.upper()} cannot be written at {self.bit_depth} bits: "
                f"use 16, 24{' or 32' if self.container == 'wav' else ' (FLAC has no float format)'}"
            )

    @property
    def subtype(self) -> str:
        return self._SUBTYPES[(self.container, self.bit_depth)]

    @property
    def extension(self) -> str:
        return self.container


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read any file libsndfile reads into float32 (channels, samples), checked for use as input."""
    path = Path(path)
    if not path.exists():
        raise AudioInputError(f"{path}: file not found; check the path")
    if path.is_dir():
        raise AudioInputError(f"{path}: is a folder, not an audio file; give the path of a file inside it")
    try:
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioInputError(
            f"{path}: not a readable audio file ({exc}); export it as WAV, FLAC, AIFF or OGG"
        ) from None
    audio = np.ascontiguousarray(data.T)
    check_audio(audio, sample_rate, name=str(path))
    return audio, int(sample_rate)


def check_audio(audio: np.ndarray, sample_rate: int, *, name: str) -> None:
    """Refuse what no engine can use: no samples, more than two channels, NaN/Inf, a silly rate."""
    if audio.ndim != 2:
        raise AudioInputError(f"{name}: expected (channels, samples) audio, got shape {audio.shape}")
    channels, samples = audio.shape
    if samples == 0:
        raise AudioInputError(f"{name}: contains no samples; export the audio again")
    if channels == 0 or channels > MAX_CHANNELS:
        raise AudioInputError(
            f"{name}: has {channels} channels; stemquery takes mono or stereo, so downmix or export a stereo file"
        )
    if not 1000 <= sample_rate <= 384000:
        raise AudioInputError(f"{name}: sample rate {sample_rate} Hz is not supported (1 kHz to 384 kHz)")
    if not np.isfinite(audio).all():
        raise AudioInputError(f"{name}: contains NaN or infinite samples; re-render or re-export the file")


def resampled_length(samples: int, rate_in: int, rate_out: int) -> int:
    return int(round(samples * rate_out / rate_in))


def fit_length(audio: np.ndarray, samples: int) -> np.ndarray:
    """Trim or zero-pad the last axis to exactly `samples`."""
    have = audio.shape[-1]
    if have == samples:
        return audio
    if have > samples:
        return audio[..., :samples]
    pad = [(0, 0)] * (audio.ndim - 1) + [(0, samples - have)]
    return np.pad(audio, pad)


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """soxr (VHQ) resampling of (channels, samples) to exactly round(samples * rate_out / rate_in) samples."""
    if rate_in == rate_out:
        return audio.astype(np.float32, copy=False)
    out = soxr.resample(np.ascontiguousarray(audio.T), rate_in, rate_out, quality="VHQ").T
    return np.ascontiguousarray(fit_length(out, resampled_length(audio.shape[-1], rate_in, rate_out)), np.float32)


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and prove that a file can be written there, before any work is done."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".stemquery-probe-", delete=True):
            pass
    except OSError as exc:
        raise OutputError(
            f"{folder}: cannot write there ({exc.strerror or exc}); choose another output folder with -o"
        ) from None
    return folder


def write_audio_files(
    outputs: dict[Path, np.ndarray], sample_rate: int, fmt: OutputFormat = OutputFormat()
) -> list[Path]:
    """Write several files all-or-nothing: each goes to a temp file beside its target, then all are renamed.

    A failure at any point removes every temp file, so no half-written or half-complete set is left.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, audio in outputs.items():
            path = Path(path)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".part")
            os.close(fd)
            temps.append((Path(tmp), path))
            clipped = audio if fmt.subtype == "FLOAT" else np.clip(audio, -1.0, 1.0)
            sf.write(tmp, np.ascontiguousarray(clipped.T), sample_rate, subtype=fmt.subtype,
                     format=fmt.container.upper())
        for tmp, path in temps:
            os.replace(tmp, path)
    except OSError as exc:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise OutputError(f"{exc.filename or 'output'}: could not write ({exc.strerror or exc}); check the folder")
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    return [path for _, path in temps]
