"""Training the refiner's two models with the shared loop (`training_loop.TrainingRun`), resumable like the separator's.

    stemquery train vae --config model/configs/vae.toml          VAE: band magnitudes ↔ timbre + content latent
    stemquery train refiner --config model/configs/refiner.toml  diffusion UNet over the frozen VAE's latents,
                                                                 conditioned on the frozen separator's estimate

VAE loss: L1 reconstruction of the features + kl_weight × KL + pitch_weight × BCE(piano roll from the content part)
+ contrastive_weight × InfoNCE(the pooled timbre of two clips of one stem against the other stems in the batch).
Refiner loss: diffusers' DDPM objective (v-prediction) on the target's latent, or (`residual`) on its correction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stemquery.model.engines.bsmamba import estimate_target
from stemquery.model.parallel import SliceParallel
from stemquery.model.refiner import ORACLES, LatentRefiner, RefinerConfig, load_refiner
from stemquery.model.stft import STFT
from stemquery.model.training_loop import RunConfig, TrainingRun, load_partial
from stemquery.model.vae import DOWNSAMPLING, TimbrePitchVAE, VAEConfig, load_vae, pad_frames
from stemquery.model.weights_io import read_meta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VAETrainConfig(RunConfig):
    run_dir: Path = Path("runs/vae")
    train_corpus: Path = Path("data/train")
    val_corpus: Path = Path("data/val")
    clip_s: float = 3.0
    val_pairs: int = 32
    kl_weight: float = 1e-4
    pitch_weight: float = 0.1
    contrastive_weight: float = 0.1
    temperature: float = 0.1
    model: VAEConfig = field(default_factory=VAEConfig)


@dataclass(frozen=True)
class RefinerTrainConfig(RunConfig):
    run_dir: Path = Path("runs/refiner")
    train_corpus: Path = Path("data/train")
    val_set: Path = Path("data/eval_val")
    #: The frozen parts: the VAE (a `stemquery train vae` checkpoint, or shipped refiner weights, whose VAE is
    #: taken) and the separator's shipped weights (paths without suffix for shipped weights).
    vae_checkpoint: Path = Path("runs/vae/last.pt")
    separator_weights: Path = Path("model/weights/bsmamba-v6")
    #: Shipped refiner weights to start from (parts they lack, such as the gate, keep their initialisation).
    init_weights: Path | None = None
    #: Parameters whose names start with one of these keep their initialisation rather than `init_weights`'
    #: (e.g. "gate." to start a shut gate half open again).
    init_skip: tuple[str, ...] = ()
    #: Weight of the one-step refinement loss (`LatentRefiner.refinement_loss`, dB) beside the denoising loss.
    refine_weight: float = 0.0
    #: Weight of the denoising (DDPM) loss. 0 trains the UNet by the one-step refinement loss alone: a
    #: deterministic-in-spirit one-step corrector (the denoising objective has produced no useful correction in
    #: three runs), which then serves only the one-step sampler the shipped default uses.
    denoise_weight: float = 1.0
    #: For this many steps the refinement loss applies the correction in full (the gate bypassed), so the UNet
    #: learns a correction worth applying before the gate may learn to leave it out.
    gate_open_steps: int = 0
    segment_s: float = 3.0
    query_s: float = 3.0
    val_cases: int = 12
    protocols: tuple[str, ...] = ("same_stem", "same_stem", "cross_track", "mixture_region")
    model: RefinerConfig = field(default_factory=RefinerConfig)

    def __post_init__(self) -> None:
        if self.denoise_weight <= 0 and self.refine_weight <= 0:
            raise ValueError("denoise_weight and refine_weight are both 0: nothing would train the UNet")
        if self.model.gate and self.refine_weight <= 0:
            raise ValueError("the refiner's gate learns only from the one-step refinement loss: with gate = true, "
                             "set refine_weight above 0 (model/configs/refiner.toml uses 1.0)")


def latent_channel_std(vae: TimbrePitchVAE, stft: STFT, sampler, rng: np.random.Generator,
                       clips: int = 32) -> tuple[float, ...]:
    """Standard deviation of each VAE latent channel over `clips` training targets."""
    from stemquery.model.data.dataset import stack_triples

    _, target, _ = stack_triples([sampler.draw(rng) for _ in range(clips)])
    with torch.no_grad():
        latent = torch.cat([vae.encode(stft.forward(part)) for part in target.split(8)])
    return tuple(round(float(v), 4) for v in latent.std(dim=(0, 2, 3)))


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` should match row i of `b` and no other."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def vae_losses(vae: TimbrePitchVAE, specs: torch.Tensor, rolls: torch.Tensor, config: VAETrainConfig,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """specs (2·n, channels, bins, frames), clips 2i and 2i+1 from one stem; rolls (2·n, pitches, frames / 4)."""
    features = pad_frames(vae.bands.features(specs), DOWNSAMPLING)
    posterior = vae.posterior(features)
    latent = posterior.sample(generator)
    reconstruction = vae.decode(latent)
    timbre, content = vae.split(latent)
    logits = vae.pitch_logits(content)[..., : rolls.shape[-1]]
    pooled = timbre.flatten(1)
    return {
        "reconstruction": (reconstruction - features).abs().mean(),
        "kl": posterior.kl().mean() / latent[0].numel(),
        "pitch": F.binary_cross_entropy_with_logits(logits, rolls),
        "contrastive": info_nce(pooled[0::2], pooled[1::2], config.temperature),
    }


class VAETrainer(TrainingRun):
    kind = "vae"
    best_metric, higher_is_better = "total", False

    def __init__(self, config: VAETrainConfig) -> None:
        from stemquery.model.data.dataset import load_corpus

        torch.manual_seed(config.seed)
        model = TimbrePitchVAE(config.model)
        super().__init__(config, model, list(model.parameters()))
        self.stft = STFT(config.model.n_fft, config.model.hop)
        self.sampler = self._sampler(load_corpus(config.train_corpus, config.model.sample_rate))
        self.val_sampler = (self._sampler(load_corpus(config.val_corpus, config.model.sample_rate))
                            if config.val_corpus.exists() else None)

    def _sampler(self, tracks):
        from stemquery.model.data.dataset import ClipPairSampler

        c = self.config
        frames = self.stft.frames(int(c.clip_s * c.model.sample_rate))
        latent_frames = -(-frames // DOWNSAMPLING)
        return ClipPairSampler(tracks, sample_rate=c.model.sample_rate, clip_s=c.clip_s,
                               roll_frame_s=c.model.hop * DOWNSAMPLING / c.model.sample_rate,
                               roll_frames=latent_frames)

    def _batch(self, sampler, rng, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        drawn = [sampler.draw(rng) for _ in range(pairs)]
        clips = torch.from_numpy(np.concatenate([p.clips for p in drawn]))
        rolls = torch.from_numpy(np.concatenate([p.rolls for p in drawn]))
        return self.stft.forward(clips), rolls

    def _total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        return (losses["reconstruction"] + c.kl_weight * losses["kl"] + c.pitch_weight * losses["pitch"]
                + c.contrastive_weight * losses["contrastive"])

    def loss(self) -> torch.Tensor:
        specs, rolls = self._batch(self.sampler, self.rng, self.config.batch)
        return self._total(vae_losses(self.model, specs, rolls, self.config))

    def validate(self) -> dict:
        """Each loss term on a fixed set of val clip pairs (seen timbres, unseen music), the posterior mean."""
        if self.val_sampler is None:
            return {}
        rng = np.random.default_rng(12345)
        specs, rolls = self._batch(self.val_sampler, rng, self.config.val_pairs)
        generator = torch.Generator().manual_seed(0)
        losses = vae_losses(self.model, specs, rolls, self.config, generator)
        return {"step": self.step, "total": float(self._total(losses)), **{k: float(v) for k, v in losses.items()}}


def load_vae_checkpoint(path: Path) -> TimbrePitchVAE:
    """A VAE from a `stemquery train vae` checkpoint (.pt), its export (`stemquery train export`), or shipped
    refiner weights (their `vae.*`), so a refiner can be trained on a new machine from what is committed."""
    path = Path(path)
    if path.suffix != ".pt":
        if read_meta(path).get("kind") == "vae":
            return load_vae(path)
        return load_refiner(path).vae
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("kind") != "vae":
        raise ValueError(f"{path}: not a VAE checkpoint (kind {state.get('kind')!r})")
    vae = TimbrePitchVAE(VAEConfig.from_dict(state["config"]["model"]))
    vae.load_state_dict(state["model"])
    return vae


class RefinerTrainer(TrainingRun):
    kind = "refiner"
    best_metric = "snr_refined"

    def __init__(self, config: RefinerTrainConfig) -> None:
        from stemquery.model.data.dataset import TripleSampler, load_corpus
        from stemquery.model.engines.bsmamba import load_model, nmf_prior

        torch.manual_seed(config.seed)
        vae = load_vae_checkpoint(config.vae_checkpoint).requires_grad_(False).eval()
        separator = load_model(config.separator_weights.with_suffix(".safetensors")).requires_grad_(False)
        if (separator.config.n_fft, separator.config.hop) != (vae.config.n_fft, vae.config.hop):
            raise ValueError("the VAE and the separator must share their STFT (n_fft, hop)")
        stft = STFT(vae.config.n_fft, vae.config.hop)
        tracks = load_corpus(config.train_corpus, vae.config.sample_rate)
        sampler = TripleSampler(tracks, sample_rate=vae.config.sample_rate, segment_s=config.segment_s,
                                query_s=config.query_s, protocols=config.protocols, absent_target_p=0.0)
        if not config.model.latent_std:
            config = replace(config, model=replace(config.model, latent_std=latent_channel_std(
                vae, stft, sampler, np.random.default_rng(config.seed + 1))))
            log.info("VAE latent channel std over training targets: %s", config.model.latent_std)
        model = LatentRefiner(config.model, vae)
        if config.init_weights:
            load_partial(model, config.init_weights, added=("gate.",), skip=config.init_skip)
        trainable = [p for name, p in model.named_parameters() if not name.startswith("vae.")]
        super().__init__(config, model, trainable)
        self.separator, self.stft, self.sampler = separator, stft, sampler
        self.separator_prior = nmf_prior(separator.config)
        # The frozen separator runs without autograd: on CPU its fast inference path applies (model/parallel.py).
        self.parallel = SliceParallel(config.threads) if config.threads > 1 else None

    def loss(self) -> torch.Tensor:
        from stemquery.model.data.dataset import stack_triples

        mixture, target, query = stack_triples([self.sampler.draw(self.rng) for _ in range(self.config.batch)])
        self.model.vae.eval()
        self.separator.eval()
        with torch.no_grad():  # the frozen separator and VAE encoder
            mix_spec, target_spec, query_spec = (self.stft.forward(audio) for audio in (mixture, target, query))
            estimate = estimate_target(self.separator, self.separator_prior, mix_spec, query_spec, self.parallel)
            z_target, z_mix, z_estimate = (self.model.encode(spec) for spec in (target_spec, mix_spec, estimate))
            timbre = self.model.vae.timbre_embedding(query_spec)
        c = self.config
        loss = torch.zeros(())
        if c.denoise_weight:
            loss = c.denoise_weight * self.model.training_loss(z_target, z_mix, z_estimate, timbre)
        if c.refine_weight:
            loss = loss + c.refine_weight * self.model.refinement_loss(
                z_mix, z_estimate, timbre, estimate, target_spec, gate_open=self.step < c.gate_open_steps)
        return loss

    def validate(self) -> dict:
        """Mean SNR on the first `val_cases` val cases of: the separator alone, separator + refiner (default
        steps), and three references that need no diffusion: the estimate given the band magnitudes of its own
        VAE round trip (`vae_roundtrip`: what the VAE's error costs where it does not cancel), the correction
        towards the target's latent (`oracle_latent`: a perfect diffusion model), and towards the target's band
        magnitudes (`oracle_band_gain`: a perfect VAE too; the ceiling of a band-gain correction)."""
        from stemquery.model.evaluate import case_folders, read_case, snr

        if not self.config.val_set.exists():
            return {}
        refiner, vae = self.model, self.model.vae
        scores: dict[str, list[float]] = {}
        for folder in case_folders(self.config.val_set)[: self.config.val_cases]:
            case = read_case(folder)
            mix_spec, query_spec, target_spec = (self.stft.forward(torch.from_numpy(audio))[None]
                                                 for audio in (case.mixture, case.query, case.target))
            estimate = estimate_target(self.separator, self.separator_prior, mix_spec, query_spec, self.parallel)
            gains = {"vae_roundtrip" if kind == "vae_roundtrip" else f"oracle_{kind}":
                     refiner.oracle_gain(kind, estimate, target_spec) for kind in ORACLES}
            candidates = {
                "separator": estimate,
                "refined": refiner.refine(mix_spec, estimate, vae.timbre_embedding(query_spec),
                                          generator=torch.Generator().manual_seed(0)),
                **{name: refiner.apply_gain(estimate, gain, 1.0) for name, gain in gains.items()},
            }
            samples = case.mixture.shape[1]
            for name, spec in candidates.items():
                scores.setdefault(name, []).append(snr(self.stft.inverse(spec[0], samples).numpy(), case.target))
        return {"step": self.step, **{f"snr_{name}": float(np.mean(values)) for name, values in scores.items()}}

    def extra_state(self) -> dict:
        return {"vae_config": self.model.vae.config.to_dict()}


# -- shipped weights -------------------------------------------------------------------------------------------------
def refiner_from_state(state: dict) -> LatentRefiner:
    """A refiner checkpoint (its weights hold the frozen VAE as `vae.*`, its extra state the VAE's config)."""
    refiner = LatentRefiner(RefinerConfig.from_dict(state["config"]["model"]),
                            TimbrePitchVAE(VAEConfig.from_dict(state["vae_config"])))
    refiner.load_state_dict(state["model"])
    return refiner
