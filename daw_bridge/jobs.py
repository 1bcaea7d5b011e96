"""One separation from files to files: the unit of work the CLI runs directly and the server queues.

Reads the inputs, enforces the limits, runs the Separator, writes every stem all-or-nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from stemquery.model import Separator
from stemquery.model.api import DEFAULT_ENGINE, RESIDUAL, StemQuery, Stems, check_query, resolve_device
from stemquery.model.audio import (OutputFormat, check_writable_folder, pcm_codes, pcm_range, read_audio,
                                   temp_pattern, write_audio_files)
from stemquery.model.engines.base import ProgressCallback
from stemquery.model.errors import AudioInputError, OutputError, QueryError, StemqueryError

#: Stored in each stem's metadata, followed by the mix's path: a stem of another mix is never overwritten silently.
PROVENANCE = "stemquery: stems of "
#: The device types a --device may name (torch knows more, but stemquery runs on these).
DEVICE_TYPES = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class Limits:
    """Resource limits for one job; None means unlimited (the CLI), the server sets both."""

    max_duration_s: float | None = None
    max_file_mb: float | None = None


@dataclass
class StemRequest:
    """One stem of a request: its example files (with their windows) and ranges of the mix; neither: the bundled
    examples of the instrument it is named after."""

    name: str
    queries: list[Path] = field(default_factory=list)
    query_windows: list[tuple[float, float] | None] = field(default_factory=list)
    query_ranges: list[tuple[float, float]] = field(default_factory=list)


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
    #: Read a WAV whose data is shorter than its header says (refused by default: a copy may still be running).
    allow_truncated: bool = False
    #: Further stems, separated in the same pass (`queries`/`query_ranges`, when given, are the stem `target`).
    stems: list[StemRequest] = field(default_factory=list)

    @property
    def all_stems(self) -> list[StemRequest]:
        """Every stem asked for, in order: `target` from `queries`/`query_ranges` (when given, or when nothing
        else is), then `stems` (a stem of the same name joins it)."""
        target = StemRequest("target", list(self.queries), list(self.query_windows), list(self.query_ranges))
        joined = {"target": target} if self.queries or self.query_ranges or not self.stems else {}
        for stem in self.stems:
            if stem.name in joined:
                mine = joined[stem.name]
                joined[stem.name] = StemRequest(stem.name, mine.queries + stem.queries,
                                                mine.query_windows + stem.query_windows,
                                                mine.query_ranges + stem.query_ranges)
            else:
                joined[stem.name] = stem
        return list(joined.values())

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
        """python-audio-separator's naming: `<mix>_(target)_<engine>.<ext>`, one per stem, then the residual."""
        ext = self.output_format.extension
        return {stem: Path(self.out_dir) / f"{Path(self.mix).stem}_({stem})_{engine}.{ext}"
                for stem in [*(s.name for s in self.all_stems), RESIDUAL]}


@dataclass(frozen=True)
class SeparationResult:
    #: {'target': path, 'residual': path}, or one path per stem asked for, then the residual
    paths: dict[str, Path]
    #: Things the user should know that did not stop the job (e.g. a stem clipped at an integer bit depth).
    warnings: list[str] = field(default_factory=list)


def range_problem(start: float, end: float) -> str | None:
    """What is wrong with a query range on its face (before the mix's length is known), or None."""
    if not (math.isfinite(start) and math.isfinite(end)):
        return f"query range {start:g}:{end:g} is not a pair of numbers of seconds"
    if start < 0:
        return f"query range {start:g}:{end:g} starts before 0 s (negative); give START:END from the mix's start"
    if end <= start:
        return (f"query range {start:g}:{end:g} is reversed or empty (its end is not after its start); "
                f"give START:END, e.g. {min(start, end):g}:{max(start, end):g}")
    return None


def parse_device(text: str) -> torch.device:
    """--device / the device setting as a torch device, or a StemqueryError saying what to give instead."""
    try:
        device = resolve_device(text)
    except (RuntimeError, ValueError):
        raise StemqueryError(f"device {text!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES or (device.type == "mps" and not torch.backends.mps.is_available()):
        raise StemqueryError(f"device {text!r} is not available to stemquery here; use auto, cpu, cuda or cuda:N")
    return device


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
) -> SeparationResult:
    """Run one request. Nothing is written unless both stems are; a failure removes the folders it created."""
    created = _missing_folders(Path(request.out_dir))
    try:
        return _run(separator, request, progress, limits)
    except BaseException:
        for folder in created:  # deepest first; only if still empty
            _remove_empty(folder)
        raise


def _run(separator: Separator, request: SeparationRequest, progress: ProgressCallback | None,
         limits: Limits) -> SeparationResult:
    fmt = request.output_format
    stems_asked = request.all_stems
    for start, end in (r for stem in stems_asked for r in stem.query_ranges):
        if problem := range_problem(start, end):
            raise QueryError(problem)
    for path in [request.mix, *(q for stem in stems_asked for q in stem.queries)]:
        check_limits(Path(path), limits)
    mix, rate = read_audio(request.mix, allow_truncated=request.allow_truncated)
    mix = cut_window(mix, rate, request.mix_window, request.mix)
    check_headroom(mix, fmt, request.mix)
    queries = {stem.name: StemQuery(_read_queries(request, stem, rate), stem.query_ranges) for stem in stems_asked}
    out_dir = check_writable_folder(request.out_dir)
    paths = {name: out_dir / path.name for name, path in request.output_paths(separator.engine.label).items()}
    for path in paths.values():
        check_not_another_mixes_stem(path, request.mix)
    stems = separator.separate_stems(mix, rate, queries, progress=progress)
    arrays, warnings = stems_to_write(mix, stems, fmt)
    write_audio_files({paths[name]: audio for name, audio in arrays.items()}, rate, fmt,
                      comment=PROVENANCE + str(Path(request.mix).resolve()))
    return SeparationResult(paths, warnings)


def _read_queries(request: SeparationRequest, stem: StemRequest, rate: int) -> list:
    queries = []
    windows = stem.query_windows or [None] * len(stem.queries)
    for path, window in zip(stem.queries, windows):
        clip, clip_rate = read_audio(path, allow_truncated=request.allow_truncated)
        clip = cut_window(clip, clip_rate, window, path)
        if clip_rate != rate:
            raise QueryError(f"{path}: query is at {clip_rate} Hz but the mix {request.mix} is at {rate} Hz; "
                             f"resample the query to {rate} Hz")
        check_query(clip, rate, name=f"{path}: query")
        queries.append(clip)
    return queries


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for candidate in [folder, *folder.parents]:
        if candidate.exists() or candidate.is_symlink():
            break
        missing.append(candidate)
    return missing


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty, or gone: leave it


def check_headroom(mix: np.ndarray, fmt: OutputFormat, path: Path) -> None:
    """Refuse, before any work, to write integer stems of a mix that goes over full scale: they would clip."""
    if fmt.subtype == "FLOAT":
        return
    peak = float(np.abs(mix).max(initial=0.0))
    if peak > 1.0:
        raise OutputError(
            f"{path}: peaks at {peak:.2f} ({20 * math.log10(peak):+.1f} dBFS), over full scale: "
            f"{fmt.bit_depth}-bit {fmt.container.upper()} stems would clip; write 32-bit float WAV "
            "(--format wav --bit-depth 32, or bit_depth 32) or lower the mix's level")


def stems_to_write(mix: np.ndarray, stems: Stems | dict[str, np.ndarray],
                   fmt: OutputFormat) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays to write, and warnings. For integer formats: each stem quantised, and the residual the quantised
    mix minus them, so the stems and the residual sum to the mix sample for sample whenever the mix was integer PCM
    at this depth (and otherwise the mix quantised). Codes past full scale are clipped, with a warning."""
    stems = dict(stems.items())
    if fmt.subtype == "FLOAT":
        return stems, []
    codes = {name: pcm_codes(audio, fmt.bit_depth) for name, audio in stems.items() if name != RESIDUAL}
    codes[RESIDUAL] = pcm_codes(mix, fmt.bit_depth) - np.sum(list(codes.values()), axis=0)
    warnings = []
    low, high = pcm_range(fmt.bit_depth)
    for name, stem in codes.items():
        over = int(np.count_nonzero((stem < low) | (stem > high)))
        if over:
            peak = float(np.abs(stem).max()) / (high + 1)
            warnings.append(
                f"the {name} stem peaks at {peak:.2f} ({20 * math.log10(max(peak, 1e-9)):+.1f} dBFS): {over} "
                f"sample(s) clipped at {fmt.bit_depth} bits, so {' + '.join(codes)} differs from the mix there; "
                "write 32-bit float WAV to keep them")
    return codes, warnings


def check_not_another_mixes_stem(path: Path, mix: Path) -> None:
    """Refuse to overwrite a stem written from another mix (e.g. song.wav's, when separating song.flac)."""
    if not path.is_file():
        return
    try:
        comment = sf.SoundFile(str(path)).comment or ""
    except (sf.LibsndfileError, RuntimeError, OSError):
        return  # not a stem we wrote: the rename replaces it, as any writer would
    source = comment[len(PROVENANCE):]
    if comment.startswith(PROVENANCE) and source != str(Path(mix).resolve()):
        raise OutputError(f"{path}: holds a stem of {source}, another mix with the same name; separate into "
                          "another output folder (-o, out_dir) or rename one of the mixes")


def clean_orphan_parts(request: SeparationRequest, engine_label: str) -> list[Path]:
    """Remove the temp files a killed run of this request left beside its stems (`.NAME.RANDOM.part`)."""
    removed = []
    for path in request.output_paths(engine_label).values():
        if path.parent.is_dir():
            for orphan in path.parent.glob(temp_pattern(path)):
                orphan.unlink(missing_ok=True)
                removed.append(orphan)
    return removed
