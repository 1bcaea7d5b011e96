"""The engine contract and the name → engine registry.

An engine sees audio at its own sample rate, as torch tensors (channels, samples), one segment at a time.
Validation, resampling, chunking and overlap-add live in `Separator`, so every engine gets them for free.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from stemquery.model.stft import STFT

#: Progress within one engine call, 0..1.
StepProgress = Callable[[float], None]


def no_progress(fraction: float) -> None:
    pass


class Engine(abc.ABC):
    """A query-conditioned separator of one segment. Subclasses register themselves with `@register_engine`."""

    name: ClassVar[str]
    description: ClassVar[str]
    sample_rate: ClassVar[int] = 44100
    #: Segment length for overlap-add: bounds memory whatever the track length.
    segment_seconds: ClassVar[float] = 20.0
    #: Fraction of each segment shared with its neighbour and cross-faded.
    overlap: ClassVar[float] = 0.25
    #: Whether the engine takes `refine=True` (the diffusion refiner after it).
    can_refine: ClassVar[bool] = False

    def __init__(self, *, device: torch.device) -> None:
        self.device = device

    @property
    def label(self) -> str:
        """The name stems are written under: the engine's name, plus how it was run when that changes the sound."""
        return self.name

    @abc.abstractmethod
    def encode_query(self, clips: list[torch.Tensor], progress: StepProgress = no_progress) -> Any:
        """Turn one or more query clips (channels, samples) into whatever `separate_segment` conditions on."""

    @abc.abstractmethod
    def separate_segment(self, mix: torch.Tensor, query: Any, progress: StepProgress = no_progress) -> torch.Tensor:
        """Return the target estimate for one mix segment, same shape as `mix`.

        `progress(fraction)` reports how far through this call the engine is, so long segments still give
        frequent progress to the user.
        """

    def separate_segment_stems(self, mix: torch.Tensor, queries: Sequence[Any],
                               progress: StepProgress = no_progress) -> torch.Tensor:
        """Several stems of one mix segment at once: (stems, channels, samples), one per encoded query.

        Each stem is a share of the mix's STFT (`shares_to_stems`), so where two queries claim the same
        time-frequency point their shares are scaled to sum to at most 1 and no sound is counted twice. This
        fallback runs `separate_segment` once per stem; engines override it to do the shared work (the mix STFT,
        a joint decomposition) once.
        """
        estimates = []
        for index, query in enumerate(queries):
            within = lambda f, i=index: progress((i + f) / len(queries))  # noqa: E731
            estimates.append(self.separate_segment(mix, query, within))
        stft = getattr(self, "stft", None) or STFT()
        spec = stft.forward(mix)
        return shares_to_stems(spec, stft.forward(torch.stack(estimates)).abs(), stft, mix.shape[-1])

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this engine cannot run here (missing weights or packages), or None when it can."""
        return None

    @classmethod
    def refine_unavailable_reason(cls) -> str | None:
        """Why this engine cannot run with its shipped diffusion refiner, or None when it can."""
        return None if cls.can_refine else f"engine {cls.name} has no refiner; the refiner works after bsmamba"


SHARE_EPS = 1e-12


def mix_shares(magnitudes: torch.Tensor, mix_magnitude: torch.Tensor) -> torch.Tensor:
    """Per-stem shares of each time-frequency point of the mix, from the stems' estimated magnitudes
    (stems, ..., bins, frames) and the mix's (..., bins, frames): |estimate| / |mix| clipped to [0, 1], and where
    the shares of one point sum to more than 1, all of them scaled down in proportion."""
    shares = (magnitudes / mix_magnitude.clamp_min(SHARE_EPS)).clamp(0.0, 1.0)
    return shares / shares.sum(dim=0, keepdim=True).clamp_min(1.0)


def shares_to_stems(spec: torch.Tensor, magnitudes: torch.Tensor, stft: STFT, samples: int) -> torch.Tensor:
    """The stems' audio (stems, ..., samples): each stem's share (`mix_shares`) of the mix STFT `spec`."""
    return stft.inverse(mix_shares(magnitudes, spec.abs()) * spec, samples)


@dataclass(frozen=True)
class EngineInfo:
    name: str
    description: str
    sample_rate: int
    available: bool
    reason: str | None


_ENGINES: dict[str, type[Engine]] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    if cls.name in _ENGINES:
        raise ValueError(f"engine name {cls.name!r} registered twice")
    _ENGINES[cls.name] = cls
    return cls


def engine_class(name: str) -> type[Engine]:
    from stemquery.model.errors import StemqueryError

    try:
        return _ENGINES[name]
    except KeyError:
        raise StemqueryError(f"unknown engine {name!r}; installed engines: {', '.join(sorted(_ENGINES))}") from None


def engine_infos() -> list[EngineInfo]:
    infos = []
    for name, cls in _ENGINES.items():
        reason = cls.unavailable_reason()
        infos.append(EngineInfo(name, cls.description, cls.sample_rate, reason is None, reason))
    return infos


ProgressCallback = Callable[[float, str], None]
