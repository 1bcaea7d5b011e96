"""The engine-agnostic Separator API (after demucs' `api.Separator` and `apply_model`).

    sep = Separator("nmf")
    stems = sep.separate(mix, 44100, [query], progress=lambda f, stage: ...)
    stems.target + stems.residual == mix   # always, sample for sample
    stems = sep.separate_stems(mix, 44100, {"guitar": [clip], "bass": StemQuery()})  # several stems, one pass
    stems["guitar"] + stems["bass"] + stems["residual"] == mix   # to float rounding

Everything shared by engines happens here: input checks, resampling to the engine's rate and back to the
caller's exact length, and chunked overlap-add so memory does not grow with track length.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np
import torch

from stemquery.model.audio import check_audio, fit_length, resample
from stemquery.model.engines import engine_class, engine_infos
from stemquery.model.engines.base import EngineInfo, ProgressCallback
from stemquery.model.errors import AudioInputError, QueryError, StemqueryError

log = logging.getLogger(__name__)

#: The engine used when none is named: the trained separator, since it beat `nmf` on the val set (docs/results.md).
DEFAULT_ENGINE = "bsmamba"
MIN_QUERY_SECONDS = 0.5
#: A query quieter than this (RMS, dBFS) carries no sound to look for.
SILENCE_DBFS = -80.0
#: Share of the progress bar given to encoding the query.
QUERY_SHARE = 0.1

#: A query clip: samples at the mix's rate, or (samples, sample_rate) to have its rate checked.
QueryClip = Union[np.ndarray, tuple[np.ndarray, int]]
#: The stem every residual is "everything else" of; no query may take its name.
RESIDUAL = "residual"


@dataclass(frozen=True)
class StemQuery:
    """What one wanted stem sounds like: example clips and/or (start, end) seconds of the mix where it is exposed.
    Neither: the bundled example clips of the instrument the stem is named after (`stemquery instruments`)."""

    clips: Sequence[QueryClip] = ()
    ranges: Sequence[tuple[float, float]] = ()


@dataclass(frozen=True)
class Stems:
    """The query's sound (`target`) and everything else (`residual = mix - target`), at the mix's rate and length."""

    target: np.ndarray
    residual: np.ndarray
    sample_rate: int
    engine: str

    def items(self) -> list[tuple[str, np.ndarray]]:
        return [("target", self.target), ("residual", self.residual)]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StemqueryError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device


def available_engines() -> list[EngineInfo]:
    return engine_infos()


def check_query(clip: np.ndarray, sample_rate: int, *, name: str) -> None:
    """A query must be usable audio, at least MIN_QUERY_SECONDS long, and not silent."""
    check_audio(clip, sample_rate, name=name)
    seconds = clip.shape[1] / sample_rate
    if seconds < MIN_QUERY_SECONDS:
        raise QueryError(f"{name} is {seconds:.2f} s long; give at least {MIN_QUERY_SECONDS} s of the sound you want")
    rms = float(np.sqrt(np.mean(np.square(clip, dtype=np.float64))))
    if rms == 0.0 or 20 * math.log10(rms) < SILENCE_DBFS:
        raise QueryError(f"{name} is silent; choose a clip or range where the wanted sound plays")


def _as_2d(audio: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    array = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise AudioInputError(f"{name}: expected (channels, samples) audio, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _segment_weight(length: int, fade: int) -> torch.Tensor:
    """Trapezoid cross-fade weight, strictly positive so overlap-add never divides by zero."""
    weight = torch.ones(length)
    if fade > 0:
        ramp = torch.arange(1, fade + 1, dtype=torch.float32) / (fade + 1)
        weight[:fade] = ramp
        weight[-fade:] = ramp.flip(0)
    return weight


class Separator:
    """Separate the sound a query describes from a mix, with any registered engine."""

    def __init__(self, engine: str = DEFAULT_ENGINE, *, device: str | torch.device = "auto", **options) -> None:
        cls = engine_class(engine)
        if options.get("refine") and not cls.can_refine:
            raise StemqueryError(cls.refine_unavailable_reason())
        self.device = resolve_device(device)
        self.engine = cls(device=self.device, **options)
        log.info("engine %s ready on %s", engine, self.device)

    @property
    def engine_name(self) -> str:
        return self.engine.name

    def separate(
        self,
        mix: np.ndarray | torch.Tensor,
        sample_rate: int,
        queries: Sequence[QueryClip] | QueryClip = (),
        *,
        query_ranges: Sequence[tuple[float, float]] | None = None,
        progress: ProgressCallback | None = None,
    ) -> Stems:
        """Return target and residual stems for `mix` (channels, samples) at `sample_rate`.

        `queries` are example clips of the wanted sound; `query_ranges` are (start, end) seconds of the mix itself
        where the sound is exposed. At least one of the two is needed. `progress(fraction, stage)` is called as
        work advances; an exception raised inside it aborts the separation and propagates.
        """
        mix_2d = _as_2d(mix, "mix")
        check_audio(mix_2d, sample_rate, name="mix")
        clips = {"target": self._query_clips(mix_2d, sample_rate, queries, query_ranges or [])}
        stems = self._separate(mix_2d, sample_rate, clips, progress)
        return Stems(target=stems["target"], residual=stems[RESIDUAL], sample_rate=sample_rate,
                     engine=self.engine.label)

    def separate_stems(
        self,
        mix: np.ndarray | torch.Tensor,
        sample_rate: int,
        stems: Mapping[str, StemQuery | Sequence[QueryClip]],
        *,
        progress: ProgressCallback | None = None,
    ) -> dict[str, np.ndarray]:
        """Every stem asked for and the residual in one pass (demucs-style): {name: (channels, samples), ...,
        "residual": mix - the stems}, at the mix's rate and length.

        `stems` maps each stem's name to a `StemQuery` (or a plain list of clips). Where two stems claim the same
        time-frequency point their shares are scaled to sum to at most 1, so the stems and the residual sum to the
        mix and no sound is counted twice. One stem gives exactly what `separate` gives. Progress and abort as in
        `separate`.
        """
        if not stems:
            raise QueryError("no stem asked for: name at least one stem and its query")
        if RESIDUAL in stems:
            raise QueryError(f"a stem may not be called {RESIDUAL!r}: that name is everything else; rename it")
        mix_2d = _as_2d(mix, "mix")
        check_audio(mix_2d, sample_rate, name="mix")
        clips = {}
        for name, query in stems.items():
            query = query if isinstance(query, StemQuery) else StemQuery(clips=query)
            label = "" if len(stems) == 1 else f"stem {name!r}: "
            clips[name] = self._query_clips(mix_2d, sample_rate, query.clips, query.ranges, label=label) \
                if query.clips or query.ranges else self._instrument_clips(name, sample_rate)
        return self._separate(mix_2d, sample_rate, clips, progress)

    @staticmethod
    def _instrument_clips(name: str, sample_rate: int) -> list[np.ndarray]:
        from stemquery.model.instruments import example_clips

        try:
            return example_clips(name, sample_rate)
        except QueryError as exc:
            raise QueryError(f"no query given for stem {name!r}, and {exc}") from None

    def _separate(self, mix: np.ndarray, sample_rate: int, clips: dict[str, list[np.ndarray]],
                  progress: ProgressCallback | None) -> dict[str, np.ndarray]:
        """The stems of checked clips, one encoded query per stem; the residual is the mix minus their sum."""
        report = progress or (lambda fraction, stage: None)
        report(0.0, "query")
        rate, count = self.engine.sample_rate, len(clips)
        with torch.inference_mode():
            states = []
            for index, stem_clips in enumerate(clips.values()):
                states.append(self.engine.encode_query(
                    [torch.from_numpy(resample(c, sample_rate, rate)) for c in stem_clips],
                    lambda f, i=index: report(QUERY_SHARE * (i + f) / count, "query"),
                ))
            report(QUERY_SHARE, "separating")
            engine_mix = torch.from_numpy(resample(mix, sample_rate, rate))
            if count == 1:  # the one-stem path of old: the engine's estimate itself, no shares
                run = lambda chunk, p: self.engine.separate_segment(chunk, states[0], p)[None]  # noqa: E731
            else:
                run = lambda chunk, p: self.engine.separate_segment_stems(chunk, states, p)  # noqa: E731
            estimates = self._overlap_add(
                engine_mix, run, count, lambda f: report(QUERY_SHARE + (0.99 - QUERY_SHARE) * f, "separating")
            )
        out = {name: fit_length(resample(estimate.numpy(), rate, sample_rate), mix.shape[1])
               for name, estimate in zip(clips, estimates)}
        out[RESIDUAL] = _residual(mix, list(out.values()))
        report(1.0, "done")
        return out

    def _query_clips(
        self,
        mix: np.ndarray,
        sample_rate: int,
        queries: Sequence[QueryClip] | QueryClip,
        ranges: Sequence[tuple[float, float]],
        *,
        label: str = "",
    ) -> list[np.ndarray]:
        if isinstance(queries, (np.ndarray, torch.Tensor)) or (
            isinstance(queries, tuple) and len(queries) == 2 and isinstance(queries[1], (int, np.integer))
        ):
            queries = [queries]
        clips: list[tuple[str, np.ndarray]] = []
        for index, query in enumerate(queries):
            name = f"{label}query {index + 1}"
            if isinstance(query, tuple):
                samples, rate = query
                if int(rate) != sample_rate:
                    raise QueryError(
                        f"{name} is at {rate} Hz but the mix is at {sample_rate} Hz; "
                        f"resample the query to {sample_rate} Hz"
                    )
                query = samples
            clips.append((name, _as_2d(query, name)))
        duration = mix.shape[1] / sample_rate
        for start, end in ranges:
            if not (0.0 <= start < end <= duration + 1e-6):
                raise QueryError(
                    f"{label}query range {start:g}-{end:g} s is outside the mix (0-{duration:.2f} s); "
                    "choose a range inside the mix"
                )
            clips.append((f"{label}query range {start:g}-{end:g} s",
                          mix[:, int(round(start * sample_rate)): int(round(end * sample_rate))]))
        if not clips:
            raise QueryError(f"{label}no query given: pass a query clip or a time range of the mix")
        for name, clip in clips:
            check_query(clip, sample_rate, name=name)
        return [clip for _, clip in clips]

    def _overlap_add(self, mix: torch.Tensor, run, stems: int, progress) -> torch.Tensor:
        """`run(segment, progress)` → (stems, channels, samples) per segment, cross-faded into (stems, channels,
        samples) for the whole mix."""
        total = mix.shape[-1]
        segment = int(self.engine.segment_seconds * self.engine.sample_rate)
        if total <= segment:
            out = run(mix.to(self.device), progress).float().cpu()
            progress(1.0)
            return out
        fade = int(segment * self.engine.overlap)
        stride = segment - fade
        starts = list(range(0, total - fade, stride))
        out = torch.zeros(stems, *mix.shape)
        weights = torch.zeros(total)
        for index, start in enumerate(starts):
            chunk = mix[:, start: start + segment]
            within = lambda f, i=index: progress((i + f) / len(starts))  # noqa: E731
            estimate = run(chunk.to(self.device), within).float().cpu()
            weight = _segment_weight(chunk.shape[-1], min(fade, chunk.shape[-1] // 2))
            out[..., start: start + chunk.shape[-1]] += estimate * weight
            weights[start: start + chunk.shape[-1]] += weight
            progress((index + 1) / len(starts))
        return out.div_(weights)  # in place: at 10 minutes of stereo each copy is 200 MB


def _residual(mix: np.ndarray, stems: list[np.ndarray]) -> np.ndarray:
    """Everything the stems leave: mix - Σ stems, summed in float64 so stems + residual give the mix back to float32
    rounding (one stem: the plain float32 difference, as `separate` always gave)."""
    if len(stems) == 1:
        return mix - stems[0]
    return (mix.astype(np.float64) - np.sum(stems, axis=0, dtype=np.float64)).astype(np.float32)
