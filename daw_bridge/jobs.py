"""One separation from files to files: the unit of work the CLI runs directly and the server queues.

Reads the inputs, enforces the limits, runs the Separator, writes both stems all-or-nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from stemquery.model import Separator
from stemquery.model.api import DEFAULT_ENGINE, check_query
from stemquery.model.audio import OutputFormat, check_writable_folder, read_audio, write_audio_files
from stemquery.model.engines.base import ProgressCallback
from stemquery.model.errors import AudioInputError, QueryError


@dataclass(frozen=True)
class Limits:
    """Resource limits for one job; None means unlimited (the CLI), the server sets both."""

    max_duration_s: float | None = None
    max_file_mb: float | None = None


@dataclass
class SeparationRequest:
    mix: Path
    queries: list[Path] = field(default_factory=list)
    query_ranges: list[tuple[float, float]] = field(default_factory=list)
    out_dir: Path = Path(".")
    engine: str = DEFAULT_ENGINE
    container: str = "wav"
    #: None: 32-bit float for WAV, 24-bit for FLAC.
    bit_depth: int | None = None
    #: (start, length) seconds of the mix file to use (a DAW item's audible part); None: the whole file.
    mix_window: tuple[float, float] | None = None
    #: One (start, length) or None per query file.
    query_windows: list[tuple[float, float] | None] = field(default_factory=list)
    #: Run the diffusion refiner after the separator (bsmamba only), with this many steps (None: its default).
    refine: bool = False
    steps: int | None = None

    @property
    def engine_options(self) -> dict:
        """What the Separator is built with for this request (a refined engine is another warm instance)."""
        if self.steps is not None and not self.refine:
            raise QueryError("steps only applies with refine; add --refine (refine 1) or leave steps out")
        return {"refine": True, "steps": self.steps} if self.refine else {}

    @property
    def output_format(self) -> OutputFormat:
        depth = self.bit_depth or (32 if self.container == "wav" else 24)
        return OutputFormat(self.container, depth)

    def output_paths(self, engine: str) -> dict[str, Path]:
        """python-audio-separator's naming: `<mix>_(target)_<engine>.<ext>`."""
        ext = self.output_format.extension
        return {stem: Path(self.out_dir) / f"{Path(self.mix).stem}_({stem})_{engine}.{ext}"
                for stem in ("target", "residual")}


def check_limits(path: Path, limits: Limits) -> None:
    """Refuse files over the size or duration limits before decoding them."""
    if limits.max_file_mb is not None and path.is_file():
        size_mb = path.stat().st_size / 1e6
        if size_mb > limits.max_file_mb:
            raise AudioInputError(f"{path}: {size_mb:.1f} MB is over the {limits.max_file_mb:g} MB limit; "
                                  "trim the file or raise --max-file-mb")
    if limits.max_duration_s is not None and path.is_file():
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError):
            return  # read_audio gives the specific error
        if info.duration > limits.max_duration_s:
            raise AudioInputError(f"{path}: {info.duration:.0f} s is over the {limits.max_duration_s:g} s limit; "
                                  "trim the file or raise --max-duration")


def cut_window(audio, rate: int, window: tuple[float, float] | None, path: Path):
    """The (start, length) seconds window of a (channels, samples) array, checked against the file's length."""
    if window is None:
        return audio
    start, length = window
    first, count = int(round(start * rate)), int(round(length * rate))
    if start < 0 or count <= 0 or first + count > audio.shape[1] + 1:
        raise AudioInputError(f"{path}: window {start:g}+{length:g} s is outside the file "
                              f"({audio.shape[1] / rate:.3f} s); the item may loop or extend past its source")
    return audio[:, first: first + count]


def run_separation(
    separator: Separator,
    request: SeparationRequest,
    *,
    progress: ProgressCallback | None = None,
    limits: Limits = Limits(),
) -> dict[str, Path]:
    """Run one request; return {'target': path, 'residual': path}. Nothing is written unless both stems are."""
    fmt = request.output_format
    for path in [request.mix, *request.queries]:
        check_limits(Path(path), limits)
    mix, rate = read_audio(request.mix)
    mix = cut_window(mix, rate, request.mix_window, request.mix)
    queries = []
    windows = request.query_windows or [None] * len(request.queries)
    for path, window in zip(request.queries, windows):
        clip, clip_rate = read_audio(path)
        clip = cut_window(clip, clip_rate, window, path)
        if clip_rate != rate:
            raise QueryError(f"{path}: query is at {clip_rate} Hz but the mix {request.mix} is at {rate} Hz; "
                             f"resample the query to {rate} Hz")
        check_query(clip, rate, name=f"{path}: query")
        queries.append(clip)
    out_dir = check_writable_folder(request.out_dir)
    stems = separator.separate(mix, rate, queries, query_ranges=request.query_ranges, progress=progress)
    paths = {name: out_dir / path.name for name, path in request.output_paths(stems.engine).items()}
    write_audio_files({paths[name]: audio for name, audio in stems.items()}, rate, fmt)
    return paths
