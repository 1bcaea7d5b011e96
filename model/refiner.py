"""Latent diffusion refiner: corrects the separator's estimate in the VAE's latent space.

    z_mix, z_est = VAE(mix), VAE(separator estimate), each channel divided by its spread over training targets;
    timbre = VAE timbre embedding of the query
    z_0 ~ UNet2DConditionModel denoising [z_t ‖ z_mix ‖ z_est], cross-attending to the timbre, from z_est noised to
          `strength` (StoRM's lesson: a predictive estimate first, diffusion to correct it, not generation from noise);
          with `residual`, the diffusion is over the correction z_0 − z_est, from zero
    gain = VAE.decode(z_0) / VAE.decode(z_est), per band (clamped): the VAE's own error cancels
    g = gate([z_mix ‖ z_est ‖ z_0 − z_est]) per latent cell, 0 to 1 (with `gate`; else 1)
    refined STFT = estimate STFT × (1 + blend × g × (gain − 1))      (the estimate's phase, no vocoder)

With `gate`, training adds the one-step refinement's own loss (`refinement_loss`: the SNR of the refined estimate,
through one sampler step, the decodings and the gate), so the model learns the correction as inference applies it
and where to leave the estimate alone (a consistency-style few-step refiner rather than a denoiser sampled in 10).

Schedulers are diffusers': DDPM's noise schedule for training, DDIM or DPM-Solver++ for few-step sampling.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from torch import nn
from torch.nn import functional as F

from stemquery.model.vae import DOWNSAMPLING, TimbrePitchVAE, VAEConfig
from stemquery.model.weights_io import load_state, read_meta, save_module

SCHEDULERS = {"ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}
#: The refined band gain is kept in [0, GAIN_MAX]: the refiner may remove a lot, but add back only so much.
GAIN_MAX = 2.0
#: The one-step refinement loss counts SNR up to this (dB).
SNR_CAP_DB = 30.0
#: The oracle corrections (`LatentRefiner.oracle_gain`), which are given the target.
ORACLES = ("latent", "band_gain", "vae_roundtrip")


@dataclass(frozen=True)
class RefinerConfig:
    block_channels: tuple[int, ...] = (48, 96)
    cross_attention_dim: int = 64
    train_timesteps: int = 1000
    prediction_type: str = "v_prediction"
    scheduler: str = "ddim"
    steps: int = 10
    #: How far the estimate is noised before denoising (1.0: from pure noise, as plain generation).
    strength: float = 0.6
    #: Share of the refined gain applied (0: the separator alone).
    blend: float = 1.0
    #: Standard deviation of each VAE latent channel over training targets: the diffusion runs on the latent
    #: divided by it (unit variance, what the noise schedule assumes; diffusers' `scaling_factor`, per channel).
    #: Empty: not standardised. `stemquery train refiner` measures it when the config leaves it empty.
    latent_std: tuple[float, ...] = ()
    #: Diffuse the correction (target latent − estimate latent) rather than the target latent: "no change" is
    #: then the zero the model starts near, not an identity it has to learn (StoRM's predictive-then-corrective
    #: split). Without it, 440 steps in, the sampled target latent was worse than the estimate's own.
    residual: bool = False
    #: A learned gate on the correction, per latent cell, from the mix, the estimate and the proposed correction:
    #: where the refiner is unsure, the estimate stays as it was. It starts half open (v1's fixed blend 0.5).
    gate: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RefinerConfig":
        return cls(**{**data, "block_channels": tuple(data.get("block_channels", cls.block_channels)),
                      "latent_std": tuple(data.get("latent_std", ()))})


class LatentRefiner(nn.Module):
    def __init__(self, config: RefinerConfig, vae: TimbrePitchVAE) -> None:
        super().__init__()
        self.config = config
        self.vae = vae
        latent = vae.config.latent_channels
        levels = len(config.block_channels)
        self.unet = UNet2DConditionModel(
            in_channels=3 * latent, out_channels=latent, block_out_channels=config.block_channels,
            down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (levels - 1),
            up_block_types=("UpBlock2D",) * (levels - 1) + ("CrossAttnUpBlock2D",),
            layers_per_block=1, cross_attention_dim=config.cross_attention_dim, attention_head_dim=8,
            norm_num_groups=16,
        )
        self.timbre_tokens = nn.Linear(vae.config.timbre_dim, config.cross_attention_dim)
        self.gate = CorrectionGate(latent) if config.gate else None
        self.noise_schedule = DDPMScheduler(num_train_timesteps=config.train_timesteps,
                                            prediction_type=config.prediction_type, beta_schedule="squaredcos_cap_v2")

    @property
    def frame_multiple(self) -> int:
        """Spectrogram frames must be a multiple of this for the latent to pass the UNet's downsampling."""
        return DOWNSAMPLING * 2 ** (len(self.config.block_channels) - 1)

    def _latent_scale(self, latent: torch.Tensor) -> torch.Tensor:
        if not self.config.latent_std:
            return torch.ones((), dtype=latent.dtype, device=latent.device)
        return torch.tensor(self.config.latent_std, dtype=latent.dtype, device=latent.device)[:, None, None]

    def encode(self, spec: torch.Tensor) -> torch.Tensor:
        """Complex STFT → the standardised VAE latent the diffusion works on."""
        latent = self.vae.encode(spec, self.frame_multiple)
        return latent / self._latent_scale(latent)

    def band_magnitude(self, latent: torch.Tensor, frames: int) -> torch.Tensor:
        """A standardised latent decoded to band magnitudes (batch, bands, frames)."""
        return self.vae.bands.magnitude(self.vae.decode(latent * self._latent_scale(latent), frames))

    def denoise(self, noisy: torch.Tensor, timestep: torch.Tensor, z_mix: torch.Tensor, z_estimate: torch.Tensor,
                timbre: torch.Tensor) -> torch.Tensor:
        """The UNet's output (noise, or v, by `prediction_type`) for a noisy target latent."""
        tokens = self.timbre_tokens(timbre)[:, None]
        return self.unet(torch.cat([noisy, z_mix, z_estimate], dim=1), timestep, encoder_hidden_states=tokens).sample

    def training_loss(self, z_target: torch.Tensor, z_mix: torch.Tensor, z_estimate: torch.Tensor,
                      timbre: torch.Tensor) -> torch.Tensor:
        clean = z_target - z_estimate if self.config.residual else z_target
        noise = torch.randn_like(clean)
        timestep = torch.randint(0, self.config.train_timesteps, (clean.shape[0],), device=clean.device)
        noisy = self.noise_schedule.add_noise(clean, noise, timestep)
        if self.config.prediction_type == "v_prediction":
            goal = self.noise_schedule.get_velocity(clean, noise, timestep)
        else:
            goal = noise
        return (self.denoise(noisy, timestep, z_mix, z_estimate, timbre) - goal).pow(2).mean()

    def refinement_loss(self, z_mix: torch.Tensor, z_estimate: torch.Tensor, timbre: torch.Tensor,
                        estimate_spec: torch.Tensor, target_spec: torch.Tensor, *,
                        gate_open: bool = False) -> torch.Tensor:
        """Negative SNR (dB, STFT domain, mean over the batch) of the estimate refined in one sampler step at the
        configured strength: the path inference takes, trained end to end through the UNet, the frozen VAE's
        decodings and the gate. The denoising loss alone left that path worse than the estimate (refiner-v1).

        `gate_open` applies the correction in full (the gate bypassed and untrained): a run that starts this way
        makes the UNet learn a correction worth applying before the gate may learn to shut (refiner-v3's gate
        shut within 250 steps and left the correction untrained)."""
        timestep = self.one_step_timestep(self.config.strength)
        start = torch.zeros_like(z_estimate) if self.config.residual else z_estimate
        t = torch.full((len(start),), timestep, device=start.device, dtype=torch.long)
        noisy = self.noise_schedule.add_noise(start, torch.randn_like(start), t)
        latent = self.predicted_clean(noisy, self.denoise(noisy, t, z_mix, z_estimate, timbre), timestep)
        if self.config.residual:
            latent = z_estimate + latent
        frames = estimate_spec.shape[-1]
        gate = None if gate_open else self.gate_of(z_mix, z_estimate, latent, frames)
        refined = self.apply_gain(estimate_spec, self.latent_gain(latent, z_estimate, frames), 1.0, gate)
        error = (refined - target_spec).abs().pow(2).sum(dim=(1, 2, 3))
        energy = target_spec.abs().pow(2).sum(dim=(1, 2, 3))
        # Capped at SNR_CAP_DB: an estimate already near perfect stops pulling the batch's gradient to itself.
        return (10 * torch.log10((error + 10 ** (-SNR_CAP_DB / 10) * energy + 1e-8) / (energy + 1e-8))).mean()

    def one_step_timestep(self, strength: float) -> int:
        """The timestep a one-step `sample` at this strength starts from."""
        if strength >= 1:
            return self.config.train_timesteps - 1
        scheduler = self.sampler()
        total = max(1, round(1 / strength))
        scheduler.set_timesteps(total)
        return int(scheduler.timesteps[-1])

    def predicted_clean(self, noisy: torch.Tensor, output: torch.Tensor, timestep: int) -> torch.Tensor:
        """The clean sample implied by the UNet's output at `timestep` (what one DDIM step to the end returns)."""
        alpha = self.noise_schedule.alphas_cumprod[timestep].to(noisy.dtype)
        if self.config.prediction_type == "v_prediction":
            return alpha.sqrt() * noisy - (1 - alpha).sqrt() * output
        return (noisy - (1 - alpha).sqrt() * output) / alpha.sqrt()

    def gate_of(self, z_mix: torch.Tensor, z_estimate: torch.Tensor, latent: torch.Tensor,
                frames: int) -> torch.Tensor | None:
        """The gate per band and frame (batch, bands, frames), or None without one."""
        if self.gate is None:
            return None
        return self.gate(z_mix, z_estimate, latent, (self.vae.config.bands, frames))

    def sampler(self):
        """A few-step scheduler sharing the training noise schedule, its steps spaced from the end ("trailing"):
        with the default "leading" spacing the last step is t = 0, so one step at any strength was a no-op."""
        return SCHEDULERS[self.config.scheduler].from_config(self.noise_schedule.config, timestep_spacing="trailing")

    def sample(self, z_mix: torch.Tensor, z_estimate: torch.Tensor, timbre: torch.Tensor, *, steps: int,
               strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoise from the estimate (or, `residual`, a zero correction) noised to `strength` of the schedule,
        in `steps` scheduler steps; returns the refined target latent."""
        scheduler = self.sampler()
        total = max(1, round(steps / strength)) if strength > 0 else steps
        scheduler.set_timesteps(total)
        timesteps = scheduler.timesteps[total - steps:] if strength < 1 else scheduler.timesteps
        noise = torch.randn(z_estimate.shape, generator=generator, dtype=z_estimate.dtype).to(z_estimate.device)
        start = torch.zeros_like(z_estimate) if self.config.residual else z_estimate
        latent = scheduler.add_noise(start, noise, timesteps[:1]) if strength < 1 else noise
        for timestep in timesteps:
            output = self.denoise(latent, timestep.expand(latent.shape[0]).to(latent.device), z_mix, z_estimate,
                                  timbre)
            latent = scheduler.step(output, timestep, latent).prev_sample
        return z_estimate + latent if self.config.residual else latent

    def refine(self, mix_spec: torch.Tensor, estimate_spec: torch.Tensor, timbre: torch.Tensor, *,
               steps: int | None = None, strength: float | None = None, blend: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The separator's complex estimate (batch, channels, bins, frames) → the refined one, same shape."""
        c = self.config
        steps, strength, blend = steps or c.steps, c.strength if strength is None else strength, \
            c.blend if blend is None else blend
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        z_mix, z_estimate = self.encode(mix_spec), self.encode(estimate_spec)
        latent = self.sample(z_mix, z_estimate, timbre, steps=steps, strength=strength, generator=generator)
        frames = mix_spec.shape[-1]
        return self.apply_gain(estimate_spec, self.latent_gain(latent, z_estimate, frames), blend,
                               self.gate_of(z_mix, z_estimate, latent, frames))

    def latent_gain(self, latent: torch.Tensor, z_estimate: torch.Tensor, frames: int) -> torch.Tensor:
        """Band gains (batch, bands, frames) that take the estimate's decoding to the refined latent's.

        A ratio of two decodings, not the refined decoding over the estimate's own band magnitudes: the VAE's
        reconstruction error, common to both decodings, cancels (a latent left as it was changes nothing). Against
        the estimate itself, the VAE's round trip alone cost 0.8 dB SNR on the validation cases (docs/results.md).
        """
        return (self.band_magnitude(latent, frames) + 1e-4) / (self.band_magnitude(z_estimate, frames) + 1e-4)

    def apply_gain(self, estimate_spec: torch.Tensor, gain: torch.Tensor, blend: float,
                   gate: torch.Tensor | None = None) -> torch.Tensor:
        """The estimate with each band scaled by its (clamped) gain, `blend` × `gate` of the way."""
        share = blend if gate is None else blend * gate
        return estimate_spec * self.vae.bands.to_bins(1 + share * (gain.clamp(0.0, GAIN_MAX) - 1))

    def oracle_gain(self, kind: str, estimate_spec: torch.Tensor, target_spec: torch.Tensor) -> torch.Tensor:
        """Band gains that need the target, the bounds a refinement is measured against (`ORACLES`):
        "latent", towards the target's latent (what a perfect diffusion model would give: this VAE's ceiling);
        "band_gain", towards the target's band magnitudes (a perfect VAE too: the ceiling of any band-gain
        correction); "vae_roundtrip", towards the estimate's own decoding (what the VAE's error costs where it
        does not cancel)."""
        frames, z_estimate = estimate_spec.shape[-1], self.encode(estimate_spec)
        if kind == "latent":
            return self.latent_gain(self.encode(target_spec), z_estimate, frames)
        if kind == "band_gain":
            return self.band_gain_to(estimate_spec, self.vae.bands.power(target_spec).sqrt())
        if kind == "vae_roundtrip":
            return self.band_gain_to(estimate_spec, self.band_magnitude(z_estimate, frames))
        raise ValueError(f"oracle must be one of {', '.join(ORACLES)}, not {kind!r}")

    def band_gain_to(self, estimate_spec: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """Band gains that give the estimate these band magnitudes (batch, bands, frames)."""
        return magnitude / (self.vae.bands.power(estimate_spec).sqrt() + 1e-4)


class CorrectionGate(nn.Module):
    """How much of the proposed correction to apply, per latent cell: two convolutions over [z_mix ‖ z_est ‖
    z_0 − z_est], a sigmoid, upsampled to the VAE's bands and the STFT's frames. The last layer starts at zero
    weight and bias, so the gate starts at 0.5 everywhere."""

    def __init__(self, latent_channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3 * latent_channels, hidden, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(hidden, 1, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z_mix: torch.Tensor, z_estimate: torch.Tensor, latent: torch.Tensor,
                size: tuple[int, int]) -> torch.Tensor:
        logit = self.net(torch.cat([z_mix, z_estimate, latent - z_estimate], dim=1))
        frames = logit.shape[-1] * DOWNSAMPLING
        gate = F.interpolate(torch.sigmoid(logit), size=(size[0], frames), mode="nearest")
        return gate[:, 0, :, : size[1]]


def save_refiner(refiner: LatentRefiner, path: Path, extra: dict | None = None) -> None:
    """VAE and UNet in one safetensors file, both configs in the JSON beside it."""
    save_module(refiner, path, {"vae": refiner.vae.config.to_dict(), "refiner": refiner.config.to_dict(),
                                **(extra or {})})


def load_refiner(path: Path, device: torch.device | str = "cpu") -> LatentRefiner:
    meta = read_meta(path)
    refiner = LatentRefiner(RefinerConfig.from_dict(meta["refiner"]), TimbrePitchVAE(VAEConfig.from_dict(meta["vae"])))
    return load_state(refiner, path).to(device).eval()
