"""A small VAE over band magnitudes whose latent splits into a time-invariant timbre part and a time-varying
pitch/content part: the refiner's feature space and the query's timbre embedding.

    complex STFT (the separator's: 2048 / hop 1024) → 64 musical bands, log magnitude → diffusers AutoencoderKL
    (×4 down in frequency and time) → latent (4, 16, frames/4):
        channels [0, timbre_channels): pooled over time before decoding → timbre (a vector per clip)
        the other channels: content, from which a head predicts the MIDI piano roll (pitch supervision)

The decoder sees the timbre channels only as their time average, so anything time-varying must go through the
content channels; the piano-roll head makes the content carry pitch; a contrastive term on the pooled timbre makes
clips of one instrument close and of different instruments far. Features are band magnitudes, not a mel
spectrogram to be vocoded: no vocoder can be downloaded here, and a band magnitude turns back into a gain on the
separator's complex estimate (see `refiner.py`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from einops import rearrange
from torch import nn

from stemquery.model.bands import musical_bands
from stemquery.model.weights_io import load_state, read_meta, save_module

#: log10 magnitude → feature: (log10(|X|) − OFFSET) / SCALE keeps audio in about [−1, 1.5]; the floor is −1.
LOG_OFFSET, LOG_SCALE = -1.0, 2.0
POWER_FLOOR = 1e-6
#: The autoencoder halves frequency and time this many times.
DOWNSAMPLING = 4


@dataclass(frozen=True)
class VAEConfig:
    sample_rate: int = 44100
    n_fft: int = 2048
    hop: int = 1024
    bands: int = 64
    block_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    timbre_channels: int = 2
    pitches: int = 128

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VAEConfig":
        return cls(**{**data, "block_channels": tuple(data.get("block_channels", cls.block_channels))})

    @property
    def latent_bands(self) -> int:
        return self.bands // DOWNSAMPLING

    @property
    def timbre_dim(self) -> int:
        return self.timbre_channels * self.latent_bands


class BandMagnitude(nn.Module):
    """Complex STFT (batch, channels, bins, frames) ↔ features (batch, 1, bands, frames), and band gains → bins."""

    def __init__(self, bins: int, sample_rate: int, bands: int) -> None:
        super().__init__()
        edges = musical_bands(bins, sample_rate, bands)
        index = torch.zeros(bins, dtype=torch.long)
        for band, (start, stop) in enumerate(edges):
            index[start:stop] = band
        self.register_buffer("band_of_bin", index, persistent=False)
        self.register_buffer("width", torch.tensor([b - a for a, b in edges], dtype=torch.float32), persistent=False)

    def power(self, spec: torch.Tensor) -> torch.Tensor:
        """Mean power of each band over its bins and the channels: (batch, bands, frames)."""
        power = spec.abs().pow(2).mean(dim=1)  # (b, f, t)
        summed = torch.zeros(power.shape[0], len(self.width), power.shape[-1], dtype=power.dtype, device=power.device)
        summed.index_add_(1, self.band_of_bin, power)
        return summed / self.width[:, None]

    def features(self, spec: torch.Tensor) -> torch.Tensor:
        log_magnitude = 0.5 * torch.log10(self.power(spec) + POWER_FLOOR)
        return ((log_magnitude - LOG_OFFSET) / LOG_SCALE)[:, None]

    @staticmethod
    def magnitude(features: torch.Tensor) -> torch.Tensor:
        """Features → band magnitudes (batch, bands, frames)."""
        return 10 ** (features[:, 0] * LOG_SCALE + LOG_OFFSET)

    def to_bins(self, band_values: torch.Tensor) -> torch.Tensor:
        """(batch, bands, frames) → (batch, 1, bins, frames): each bin takes its band's value."""
        return band_values[:, None, self.band_of_bin]


def pad_frames(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the last axis to a multiple, repeating the edge (a silent pad would be a step the model has to draw)."""
    extra = -x.shape[-1] % multiple
    return F.pad(x, (0, extra, 0, 0), mode="replicate") if extra else x


class TimbrePitchVAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.bands = BandMagnitude(config.n_fft // 2 + 1, config.sample_rate, config.bands)
        blocks = len(config.block_channels)
        if 2 ** (blocks - 1) != DOWNSAMPLING:
            raise ValueError(f"{blocks} blocks downsample by {2 ** (blocks - 1)}, the latent grid needs {DOWNSAMPLING}")
        self.autoencoder = AutoencoderKL(
            in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=config.block_channels,
            layers_per_block=1, latent_channels=config.latent_channels,
            norm_num_groups=min(16, config.block_channels[0]), mid_block_add_attention=False,
        )
        content = (config.latent_channels - config.timbre_channels) * config.latent_bands
        self.pitch_head = nn.Sequential(nn.Conv1d(content, 128, 3, padding=1), nn.SiLU(),
                                        nn.Conv1d(128, config.pitches, 1))

    # -- latent layout -------------------------------------------------------------------------------------------
    def split(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, latent_channels, latent_bands, t) → timbre (b, timbre_channels, latent_bands) and content
        (b, latent_channels − timbre_channels, latent_bands, t)."""
        timbre_channels = self.config.timbre_channels
        return latent[:, :timbre_channels].mean(dim=-1), latent[:, timbre_channels:]

    @staticmethod
    def join(timbre: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        return torch.cat([timbre[..., None].expand(*timbre.shape, content.shape[-1]), content], dim=1)

    # -- encode / decode -------------------------------------------------------------------------------------------
    def posterior(self, features: torch.Tensor):
        """Features (b, 1, bands, frames; frames a multiple of 4) → diffusers' DiagonalGaussianDistribution."""
        return self.autoencoder.encode(features).latent_dist

    def encode(self, spec: torch.Tensor, multiple: int = DOWNSAMPLING) -> torch.Tensor:
        """Complex STFT → the posterior mean latent (deterministic), frames padded to a multiple of `multiple`."""
        return self.posterior(pad_frames(self.bands.features(spec), multiple)).mean

    def decode(self, latent: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """Latent → features (b, 1, bands, frames); the timbre channels are pooled over time first."""
        features = self.autoencoder.decode(self.join(*self.split(latent))).sample
        return features[..., :frames] if frames is not None else features

    def timbre_embedding(self, spec: torch.Tensor) -> torch.Tensor:
        """A query clip's timbre: (b, timbre_dim)."""
        timbre, _ = self.split(self.encode(spec))
        return timbre.flatten(1)

    def pitch_logits(self, content: torch.Tensor) -> torch.Tensor:
        """Content latent (b, c, latent_bands, t) → piano-roll logits (b, pitches, t)."""
        return self.pitch_head(rearrange(content, "b c k t -> b (c k) t"))


def save_vae(vae: TimbrePitchVAE, path: Path, extra: dict | None = None) -> None:
    """A VAE on its own (before a refiner is trained over it): safetensors, and its config in the JSON beside."""
    save_module(vae, path, {"kind": "vae", "vae": vae.config.to_dict(), **(extra or {})})


def load_vae(path: Path) -> TimbrePitchVAE:
    return load_state(TimbrePitchVAE(VAEConfig.from_dict(read_meta(path)["vae"])), path).eval()
