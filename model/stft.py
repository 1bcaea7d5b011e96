"""STFT / iSTFT over (..., samples) tensors with torch.stft (no torchaudio on this platform)."""
from __future__ import annotations

from dataclasses import dataclass
import torch


def _window(n_fft: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    # Not cached: a window made under inference_mode could not be used in a training graph later.
    return torch.hann_window(n_fft, device=device, dtype=dtype)


@dataclass(frozen=True)
class STFT:
    n_fft: int = 2048
    hop: int = 512

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1

    def frames(self, samples: int) -> int:
        return samples // self.hop + 1

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(..., samples) real → (..., bins, frames) complex, centred frames."""
        lead = audio.shape[:-1]
        flat = audio.reshape(-1, audio.shape[-1])
        spec = torch.stft(
            flat, self.n_fft, self.hop, window=_window(self.n_fft, str(audio.device), audio.dtype),
            center=True, pad_mode="constant", return_complex=True,  # constant: inputs shorter than n_fft work
        )
        return spec.reshape(*lead, *spec.shape[-2:])

    def inverse(self, spec: torch.Tensor, samples: int) -> torch.Tensor:
        """(..., bins, frames) complex → (..., samples) real of exactly `samples`."""
        lead = spec.shape[:-2]
        flat = spec.reshape(-1, *spec.shape[-2:])
        real_dtype = torch.float32 if flat.dtype == torch.complex64 else torch.float64
        audio = torch.istft(
            flat, self.n_fft, self.hop, window=_window(self.n_fft, str(spec.device), real_dtype),
            center=True, length=samples,
        )
        return audio.reshape(*lead, samples)
