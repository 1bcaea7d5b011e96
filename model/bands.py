"""Musical band split: contiguous STFT bin ranges, narrow at low frequencies and wide at high ones (mel-spaced),
per-band normalisation, level and projection in, and per-band complex mask estimation out."""
from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from torch import nn

from stemquery.model.parallel import SliceParallel


def musical_bands(bins: int, sample_rate: int, count: int, *, min_width: int = 2) -> list[tuple[int, int]]:
    """`count` contiguous (start, stop) bin ranges covering all `bins`, with edges evenly spaced on the mel scale."""
    nyquist = sample_rate / 2

    def mel(hz):
        return 2595 * np.log10(1 + np.asarray(hz) / 700)

    edges_hz = 700 * (10 ** (np.linspace(0, mel(nyquist), count + 1) / 2595) - 1)
    edges = np.round(edges_hz / nyquist * (bins - 1)).astype(int)
    edges[0], edges[-1] = 0, bins
    for i in range(1, count + 1):  # widen the narrow low bands; the rest shift up
        edges[i] = max(edges[i], edges[i - 1] + min_width)
    if edges[-1] > bins:
        raise ValueError(f"{count} bands of at least {min_width} bins do not fit in {bins} bins")
    edges[-1] = bins
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class BandSplit(nn.Module):
    """(batch, channels, bins, frames) complex → (batch, bands, frames, dim): per band, RMSNorm of the real and
    imaginary parts of its bins in every channel, joined by the band's level, then a Linear.

    The norm removes each band's level, so without it the network would see every band's shape but not the spectral
    envelope across bands, the first thing that tells one timbre from another. The level is in dB relative to the
    clip's mean power (so a quieter input gives the same features), over 50, floored at -100 dB.

    `per_bin` extra real features per bin and frame (batch, bins, frames) may join each band's input.
    """

    def __init__(self, bands: list[tuple[int, int]], channels: int, dim: int, per_bin: int = 0) -> None:
        super().__init__()
        self.bands = bands
        self.per_bin = per_bin
        widths = [2 * channels * (stop - start) for start, stop in bands]
        self.norms = nn.ModuleList(nn.RMSNorm(width) for width in widths)
        self.projections = nn.ModuleList(nn.Linear(width + 1 + per_bin * (stop - start), dim)
                                         for width, (start, stop) in zip(widths, bands))

    def forward(self, spec: torch.Tensor, extra: torch.Tensor | None = None,
                parallel: SliceParallel | None = None) -> torch.Tensor:
        if (extra is None) != (self.per_bin == 0):
            raise ValueError(f"this band split takes {self.per_bin} extra feature(s) per bin")
        features = torch.view_as_real(spec)  # (b, c, f, t, 2)
        bands = [rearrange(features[:, :, start:stop], "b c f t z -> b t (c f z)") for start, stop in self.bands]
        power = torch.stack([band.float().pow(2).mean(-1) for band in bands], dim=1)  # (b, k, t)
        reference = power.mean(dim=(1, 2), keepdim=True)
        level = (10 * torch.log10((power + 1e-12) / (reference + 1e-12)) / 50).clamp(min=-2.0)

        def project(index: int) -> torch.Tensor:
            (start, stop), band = self.bands[index], bands[index]
            parts = [self.norms[index](band), level[:, index, :, None].to(band.dtype)]
            if extra is not None:
                parts.append(rearrange(extra[..., start:stop, :], "b e f t -> b t (e f)").to(band.dtype))
            return self.projections[index](torch.cat(parts, dim=-1))

        return torch.stack(list((parallel.map if parallel else map)(project, range(len(bands)))), dim=1)


class MaskEstimator(nn.Module):
    """(batch, bands, frames, dim) → complex mask (batch, channels, bins, frames): a GLU MLP per band."""

    def __init__(self, bands: list[tuple[int, int]], channels: int, dim: int, hidden_factor: int = 2) -> None:
        super().__init__()
        self.bands, self.channels = bands, channels
        self.layers = nn.ModuleList(
            nn.Sequential(nn.RMSNorm(dim), nn.Linear(dim, hidden_factor * dim), nn.Tanh(),
                          nn.Linear(hidden_factor * dim, 2 * 2 * channels * (stop - start)), nn.GLU(dim=-1))
            for start, stop in bands
        )
        for layer in self.layers:
            self._start_as_identity(layer[3])

    @staticmethod
    def _start_as_identity(linear: nn.Linear) -> None:
        """Start near mask = 1 + 0j (the estimate is the mix): SI-SDR improvement 0, not a random mask."""
        half = linear.out_features // 2
        with torch.no_grad():
            linear.weight.mul_(0.1)
            value = linear.bias[:half].view(-1, 2)  # (c·f, z): z = 0 real, 1 imaginary
            value[:, 0], value[:, 1] = 1.0, 0.0
            linear.bias[half:] = 3.0  # GLU gate sigmoid(3) ≈ 0.95

    def forward(self, x: torch.Tensor, parallel: SliceParallel | None = None) -> torch.Tensor:
        def band_mask(index: int) -> torch.Tensor:
            return rearrange(self.layers[index](x[:, index]), "b t (c f z) -> b c f t z", c=self.channels, z=2)

        masks = (parallel.map if parallel else map)(band_mask, range(len(self.layers)))
        return torch.view_as_complex(torch.cat(list(masks), dim=2).float().contiguous())
