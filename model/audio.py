"""Audio files in and out: float32 (channels, samples) arrays, exact-length resampling, atomic writes."""
from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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


@dataclass(frozen=True)
class WavLength:
    """What a WAV file's header promises against what the file holds, in seconds (header_s None: the header
    gives no length yet, as a streaming writer leaves it until it closes the file)."""

    header_s: float | None
    data_s: float

    @property
    def complete(self) -> bool:
        return self.header_s is not None and self.data_s >= self.header_s

    def describe(self) -> str:
        if self.header_s is None:
            return f"unfinished: the header gives no length yet, data holds {self.data_s:.1f} s"
        return f"truncated: header says {self.header_s:.1f} s, data holds {self.data_s:.1f} s"


#: Data sizes a streaming writer leaves in the header until it closes the file.
_OPEN_DATA_SIZES = (0, 0xFFFFFFFF)


def wav_length(path: str | os.PathLike) -> WavLength | None:
    """The header's and the data's length of a RIFF/RIFX WAV file, or None when it is not one (or has no data
    chunk yet). libsndfile silently reads a truncated WAV as a shorter file; this is how to tell."""
    try:
        with open(path, "rb") as handle:
            return _riff_data_length(handle, os.fstat(handle.fileno()).st_size)
    except (OSError, struct.error):
        return None


def _riff_data_length(handle: IO[bytes], size: int) -> WavLength | None:
    head = handle.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return None
    order = "<" if head[:4] == b"RIFF" else ">"
    block_align, rate, offset = 0, 0, 12
    while offset + 8 <= size:
        handle.seek(offset)
        chunk, length = struct.unpack(order + "4sI", handle.read(8))
        if chunk == b"fmt ":
            _, _, rate, _, block_align = struct.unpack(order + "HHIIH", handle.read(14))
        elif chunk == b"data":
            if not block_align or not rate:
                return None
            held = size - offset - 8
            if length in _OPEN_DATA_SIZES and held > 0:
                return WavLength(None, held // block_align / rate)
            return WavLength(length // block_align / rate, min(held, length) // block_align / rate)
        offset += 8 + length + (length & 1)
    return None


def read_audio(path: str | os.PathLike, *, allow_truncated: bool = False) -> tuple[np.ndarray, int]:
    """Read any file libsndfile reads into float32 (channels, samples), checked for use as input.

    A WAV whose data is shorter than its header says (a copy still running, or cut short) is refused unless
    `allow_truncated`: libsndfile would read it as a shorter file without a word."""
    path = Path(path)
    if not path.exists():
        raise AudioInputError(f"{path}: file not found; check the path")
    if path.is_dir():
        raise AudioInputError(f"{path}: is a folder, not an audio file; give the path of a file inside it")
    if not stat.S_ISREG(path.stat().st_mode):
        raise AudioInputError(f"{path}: not a regular file (a pipe or device); give the path of an audio file")
    length = wav_length(path)
    if length is not None and not length.complete:
        if not allow_truncated:
            raise AudioInputError(f"{path}: {length.describe()}; wait for the copy to finish or export it again "
                                  "(--allow-truncated reads what is there)")
        log.warning("%s: %s; reading the %.1f s that are there", path, length.describe(), length.data_s)
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
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file, not a folder; give a folder for the stems with -o (out_dir)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".stemquery-probe-", delete=True):
            pass
    except OSError as exc:
        raise OutputError(
            f"{folder}: cannot write there ({exc.strerror or exc}); choose another output folder with -o"
        ) from None
    return folder


def temp_pattern(path: Path, suffix: str = ".part") -> str:
    """A glob pattern matching the temp files `create_temp_beside(path, suffix)` makes, and those of earlier
    versions (`.STEM.RANDOM.part`), to clean up after a crash."""
    return f".{glob_escape(path.stem)}.*{suffix}"


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def create_temp_beside(path: Path, suffix: str = ".part") -> tuple[int, Path]:
    """A new empty file `.NAME.RANDOM<suffix>` beside `path` (same folder: the final rename is atomic), open for
    writing. Its mode is 0666 less the umask, like any other writer's file (mkstemp's 0600 would make the stems
    private to whoever ran the server)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


def pcm_range(bits: int) -> tuple[int, int]:
    """The lowest and highest integer code of `bits`-bit PCM."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def pcm_codes(audio: np.ndarray, bits: int) -> np.ndarray:
    """float samples → `bits`-bit PCM codes (int32), rounded to nearest and clipped to the format's range.

    The scale is 2^(bits-1), the one libsndfile reads integer files with, so a file read as float and quantised
    again gives back its own codes."""
    low, high = pcm_range(bits)  # float32 is exact here: scaling by a power of two, codes below 2^24
    return np.clip(np.rint(np.asarray(audio, np.float32) * np.float32(high + 1)), low, high).astype(np.int32)


def _samples_for(audio: np.ndarray, fmt: OutputFormat) -> np.ndarray:
    """(samples, channels) in the dtype libsndfile writes unscaled: float32 for float, int16/int32 codes for PCM
    (libsndfile truncates floats to WAV PCM but rounds them to FLAC: quantising here is the same for both)."""
    if fmt.subtype == "FLOAT":
        return np.ascontiguousarray(audio.T, np.float32)
    codes = audio if np.issubdtype(audio.dtype, np.integer) else pcm_codes(audio, fmt.bit_depth)
    low, high = pcm_range(fmt.bit_depth)
    codes = np.clip(codes, low, high)
    if fmt.bit_depth == 16:
        return np.ascontiguousarray(codes.T, np.int16)
    return np.ascontiguousarray(codes.T, np.int32) << (32 - fmt.bit_depth)


def _write_one(fd: int, tmp: Path, audio: np.ndarray, sample_rate: int, fmt: OutputFormat,
               comment: str | None) -> None:
    samples = _samples_for(audio, fmt)
    with sf.SoundFile(fd, "w", sample_rate, samples.shape[1], fmt.subtype, format=fmt.container.upper(),
                      closefd=False) as handle:
        if comment:
            handle.comment = comment
        handle.write(samples)
    os.fsync(fd)
    written = sf.info(str(tmp)).frames
    if written != samples.shape[0]:  # libsndfile can drop frames on a full disk without raising
        raise OSError(errno.ENOSPC, f"only {written} of {samples.shape[0]} frames were written", str(tmp))


def _write_failure(folder: Path, exc: Exception, needed: int) -> OutputError:
    """One line: the folder, the reason (libsndfile says only "System error" for a full disk), what to do."""
    if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        reason = exc.strerror or str(exc)
    else:
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if free is not None and free < needed:
            reason = f"disk full: {free / 1e6:.1f} MB free, the stems need up to {needed / 1e6:.1f} MB"
        else:
            reason = (getattr(exc, "strerror", None) or getattr(exc, "error_string", None) or str(exc)).strip()
    return OutputError(f"{folder}: could not write the stems there ({reason}); nothing was written: "
                       "free some space or choose another output folder")


def write_audio_files(
    outputs: dict[Path, np.ndarray], sample_rate: int, fmt: OutputFormat = OutputFormat(), *,
    comment: str | None = None,
) -> list[Path]:
    """Write several files all-or-nothing: each goes to a temp file beside its target, then all are renamed.

    Float arrays are written as they are (float WAV) or quantised by rounding; integer arrays are taken as PCM
    codes at `fmt.bit_depth`. `comment` is stored in the file's metadata. A failure at any point removes every
    temp file, so no half-written or half-complete set is left, and is raised as one OutputError naming the folder.
    """
    temps: list[tuple[Path, Path]] = []
    folder = Path(next(iter(outputs), ".")).parent
    try:
        for path, audio in outputs.items():
            path = Path(path)
            folder = path.parent
            fd, tmp = create_temp_beside(path)
            temps.append((tmp, path))
            try:
                _write_one(fd, tmp, audio, sample_rate, fmt, comment)
            finally:
                os.close(fd)
        for tmp, path in temps:
            os.replace(tmp, path)
    except (OSError, sf.LibsndfileError, RuntimeError) as exc:
        _remove(tmp for tmp, _ in temps)
        needed = sum(audio.size * (4 if fmt.bit_depth == 32 else fmt.bit_depth // 8) for audio in outputs.values())
        raise _write_failure(folder, exc, needed) from None
    except BaseException:
        _remove(tmp for tmp, _ in temps)
        raise
    return [path for _, path in temps]


def _remove(paths) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
