"""`bsmamba`: the trained query-conditioned band-split Mamba, as an engine of the Separator API, optionally
followed by the latent diffusion refiner (`refine=True`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from stemquery.model.bsmamba import BSMamba, BSMambaConfig, Prior, QueryCondition
from stemquery.model.engines.base import Engine, StepProgress, no_progress, register_engine, shares_to_stems
from stemquery.model.engines.nmf import NMFConfig, QueryNMF, channel_magnitude
from stemquery.model.errors import StemqueryError
from stemquery.model.parallel import SliceParallel
from stemquery.model.stft import STFT
from stemquery.model.weights_io import load_state, read_meta, save_module

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
WEIGHTS_NAME = "bsmamba-v6"
REFINER_NAME = "refiner-v3"


def weights_paths(name: str = WEIGHTS_NAME, folder: Path | None = None) -> tuple[Path, Path]:
    folder = folder or WEIGHTS_DIR
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def save_weights(model: BSMamba, path: Path, extra: dict | None = None) -> None:
    """Weights as safetensors + the config (and provenance) as JSON beside them."""
    save_module(model, path, {"config": model.config.to_dict(), **(extra or {})})


def load_model(path: Path, device: torch.device | str = "cpu") -> BSMamba:
    model = BSMamba(BSMambaConfig.from_dict(read_meta(path)["config"]))
    return load_state(model, path).to(device).eval()


class QueryPrior:
    """The query-NMF prior of a model with `nmf_prior_iterations`: on the network's own STFT, fewer iterations and
    pitch shifts than the `nmf` engine (with 30 iterations, on 12 val_unseen cases: about 0.6 s a 10 s case on one
    core, mean SI-SDRi +0.18 dB against the engine's +0.59; docs/results.md, session 8). One share of the mix per
    kind of bases: the query's learned bases, and with `nmf_prior_exemplars` its own frames
    (`QueryNMF.exemplars`)."""

    def __init__(self, config: BSMambaConfig, device: torch.device | str = "cpu") -> None:
        self.nmf = QueryNMF(NMFConfig(n_fft=config.n_fft, hop=config.hop,
                                      query_iterations=config.nmf_prior_query_iterations or config.nmf_prior_iterations,
                                      mix_iterations=config.nmf_prior_iterations, query_shifts=tuple(range(-2, 3)),
                                      max_query_frames=1000), device)
        self.exemplars = config.nmf_prior_exemplars
        self.match = config.nmf_prior_match
        self.match_sources = config.nmf_prior_match_sources

    def bases(self, magnitudes: list[torch.Tensor]) -> list[torch.Tensor]:
        """One query's clips (each a magnitude (bins, frames)) → its bases, one tensor per share."""
        return self.batch_bases(torch.cat(magnitudes, dim=-1))

    def batch_bases(self, magnitudes: torch.Tensor) -> list[torch.Tensor]:
        """Bases of a magnitude (bins, frames), or of each clip of a batch (batch, bins, frames) in one go (the same
        as `bases` of each): one tensor per share."""
        learned = self.nmf.batch_bases(magnitudes)
        return [learned, self.nmf.exemplars(magnitudes, self.exemplars)] if self.exemplars else [learned]

    @torch.no_grad()
    def shares(self, mix_magnitude: torch.Tensor, bases: list[torch.Tensor]) -> torch.Tensor:
        """The mix's magnitude (…, bins, frames) and its query's bases (as `bases` or `batch_bases` give them) → the
        target's share of each bin by each kind of bases (…, shares, bins, frames), 0 to 1."""
        return torch.stack([self.nmf.target_share(mix_magnitude, kind) for kind in bases], dim=-3)

    @torch.no_grad()
    def prior(self, mix_magnitude: torch.Tensor, bases: list[torch.Tensor]) -> Prior:
        """What the network reads: the shares, and with `nmf_prior_match` how closely the exemplar share's estimate
        of each frame matches a query frame (…, frames); with `nmf_prior_match_sources` also the learned share's
        estimate and the mix itself (…, 2, frames)."""
        shares = self.shares(mix_magnitude, bases)
        if not self.match:
            return Prior(shares)
        magnitude = mix_magnitude.float()
        estimates = [shares[..., -1, :, :] * magnitude]
        if self.match_sources:
            estimates += [shares[..., 0, :, :] * magnitude, magnitude]
        matches = self.nmf.exemplar_match(torch.stack(estimates, dim=-3), bases[-1][..., None, :, :])
        return Prior(shares, matches[..., 0, :], matches[..., 1:, :] if self.match_sources else None)


def nmf_prior(config: BSMambaConfig, device: torch.device | str = "cpu") -> QueryPrior | None:
    """The prior a model reads (None for a model without one)."""
    return QueryPrior(config, device) if config.nmf_prior_iterations else None


def prior_shares(prior: QueryPrior, mix_specs: torch.Tensor, bases: list[list[torch.Tensor]]) -> Prior:
    """The prior of each mix (batch, channels, bins, frames) for its own query's bases: shares (batch, shares,
    bins, frames), match (batch, frames) where the model reads it."""
    each = [prior.prior(channel_magnitude(spec), kinds) for spec, kinds in zip(mix_specs, bases)]
    return Prior(*(None if parts[0] is None else torch.stack(parts) for parts in zip(*each)))


def batch_prior(prior: QueryPrior | None, mix_spec: torch.Tensor, query_spec: torch.Tensor) -> Prior | None:
    """The prior of each mix for its own query clip (both (batch, channels, bins, frames)); None without.

    On an accelerator, one batched decomposition for the whole batch (the same shares as one at a time: a few
    large products instead of thousands of small kernel launches); on the CPU one at a time, which is faster there
    (8 training examples: 1.0 s against 1.9 s at one thread; batched products lose MKL's single-matrix path)."""
    if prior is None:
        return None
    if mix_spec.device.type == "cpu":
        return prior_shares(prior, mix_spec, [prior.bases([channel_magnitude(spec)]) for spec in query_spec])
    return prior.prior(channel_magnitude(mix_spec), prior.batch_bases(channel_magnitude(query_spec)))


def estimate_target(model: BSMamba, prior: QueryPrior | None, mix_spec: torch.Tensor, query_spec: torch.Tensor,
                    parallel: SliceParallel | None = None) -> torch.Tensor:
    """The model's target STFT for each mix and its query clip, with the NMF prior where the model takes one
    (`prior`: `nmf_prior(model.config)`): for the trainers' validation and the refiner's frozen separator."""
    return model(mix_spec, model.embed_queries([query_spec]), prior=batch_prior(prior, mix_spec, query_spec),
                 parallel=parallel)


@dataclass(frozen=True)
class QueryState:
    condition: QueryCondition  # what the separator is conditioned on
    timbre: torch.Tensor | None  # the refiner's VAE timbre embedding (None without the refiner)
    nmf_bases: list[torch.Tensor] | None = None  # the query's bases for the prior, one per share (None without)


@register_engine
class BSMambaEngine(Engine):
    name = "bsmamba"
    description = "query-conditioned band-split Mamba-2 network (trained here)"
    # Long segments with a 1 s cross-fade: every overlap is computed twice, and the network's quality does not
    # depend on the segment length (val SI-SDRi within 0.1 dB for 4, 8 and 20 s: docs/performance.md).
    segment_seconds = 20.0
    overlap = 0.05
    can_refine = True

    def __init__(self, *, device: torch.device, weights: str | Path | None = None, refine: bool = False,
                 steps: int | None = None, blend: float | None = None, refiner_weights: str | Path | None = None,
                 seed: int = 0) -> None:
        super().__init__(device=device)
        if blend is not None and not refine:
            raise StemqueryError("blend only applies with refine; add refine=1 or leave blend out")
        if blend is not None and not 0.0 <= float(blend) <= 1.0:
            raise StemqueryError(f"blend must be between 0 and 1 (the share of the refiner's correction), got {blend}")
        path = Path(weights) if weights else weights_paths()[0]
        if not path.with_suffix(".safetensors").exists() or not path.with_suffix(".json").exists():
            raise StemqueryError(f"engine bsmamba: weights {path.with_suffix('.safetensors')} (and its .json) "
                                 "not found; train them with `stemquery train separator` or use --engine nmf")
        self.weights_path = path.with_suffix(".safetensors")
        self.model = load_model(path, device)
        threads = torch.get_num_threads()
        self.parallel = SliceParallel(threads) if self.device.type == "cpu" and threads > 1 else None
        self.stft = STFT(self.model.config.n_fft, self.model.config.hop)
        self.prior = nmf_prior(self.model.config, self.device)
        self.sample_rate = self.model.config.sample_rate
        self.refiner_path: Path | None = None
        self.refiner = self._load_refiner(refiner_weights, steps) if refine else None
        self.steps = (steps or self.refiner.config.steps) if self.refiner else None
        self.blend = (self.refiner.config.blend if blend is None else float(blend)) if self.refiner else None
        self.seed = seed

    def _load_refiner(self, weights: str | Path | None, steps: int | None):
        from stemquery.model.refiner import load_refiner

        path = Path(weights) if weights else weights_paths(REFINER_NAME)[0]
        if not path.with_suffix(".safetensors").exists() or not path.with_suffix(".json").exists():
            raise StemqueryError(f"refiner weights {path.with_suffix('.safetensors')} (and its .json) not found; "
                                 "train them with `stemquery train vae` and `stemquery train refiner`, or run "
                                 "without --refine")
        if steps is not None and steps < 1:
            raise StemqueryError(f"--steps must be at least 1, got {steps}")
        refiner = load_refiner(path, self.device)
        self.refiner_path = path.with_suffix(".safetensors")
        vae = refiner.vae.config
        if (vae.n_fft, vae.hop, vae.sample_rate) != (self.stft.n_fft, self.stft.hop, self.sample_rate):
            raise StemqueryError(f"refiner {path.name} was trained for another STFT than separator "
                                 f"{self.weights_path.name}; ship them together")
        return refiner

    @property
    def label(self) -> str:
        if self.refiner is None:
            return "bsmamba"
        return f"bsmamba-refined{self.steps}" + ("" if self.blend == 1.0 else f"-blend{self.blend:g}")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        weights, config = weights_paths()
        if not weights.exists() or not config.exists():
            return f"no trained weights shipped yet ({weights.name})"
        return None

    @classmethod
    def refine_unavailable_reason(cls) -> str | None:
        weights, config = weights_paths(REFINER_NAME)
        if not weights.exists() or not config.exists():
            return f"no trained refiner shipped yet ({weights.name}); run without refine"
        return cls.unavailable_reason()

    def _stereo_spec(self, audio: torch.Tensor) -> torch.Tensor:
        audio = audio.to(self.device, torch.float32)
        if audio.shape[0] == 1:
            audio = audio.expand(2, -1)
        return self.stft.forward(audio)[None]

    def encode_query(self, clips: list[torch.Tensor], progress: StepProgress = no_progress) -> QueryState:
        specs = [self._stereo_spec(clip) for clip in clips]
        timbre = None
        if self.refiner is not None:
            timbre = torch.stack([self.refiner.vae.timbre_embedding(spec) for spec in specs]).mean(dim=0)
        bases = None if self.prior is None else self.prior.bases([channel_magnitude(spec[0]) for spec in specs])
        progress(1.0)
        return QueryState(self.model.embed_queries(specs), timbre, bases)

    def separator_estimate(self, spec: torch.Tensor, query: QueryState,
                           progress: StepProgress = no_progress) -> torch.Tensor:
        """The network's complex STFT estimate of the target for the mix STFT `spec` (1, 2, bins, frames), before
        any refiner (its blocks report progress as they finish)."""
        prior = None if self.prior is None else prior_shares(self.prior, spec, [query.nmf_bases])
        return self.model(spec, query.condition, prior=prior, parallel=self.parallel, progress=progress)

    def _estimate(self, spec: torch.Tensor, query: QueryState, progress: StepProgress) -> torch.Tensor:
        """The target's complex STFT estimate for the mix STFT `spec` (1, 2, bins, frames)."""
        # the separator's blocks report as they finish (a 20 s segment would otherwise be one step of progress)
        share = 0.2 if self.refiner is not None else 0.95
        estimate = self.separator_estimate(spec, query, lambda f: progress(share * f))
        if self.refiner is not None:
            generator = torch.Generator().manual_seed(self.seed)  # the same sound every run
            estimate = self.refiner.refine(spec, estimate, query.timbre, steps=self.steps, blend=self.blend,
                                           generator=generator)
        return estimate

    @staticmethod
    def _channels_of(audio: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """Stereo network output back to the mix's channel count (a mono mix went in as two equal channels)."""
        return audio.mean(dim=-2, keepdim=True) if mix.shape[0] == 1 else audio

    def separate_segment(self, mix: torch.Tensor, query: QueryState,
                         progress: StepProgress = no_progress) -> torch.Tensor:
        spec = self._stereo_spec(mix)
        target = self.stft.inverse(self._estimate(spec, query, progress)[0], mix.shape[-1])
        progress(1.0)
        return self._channels_of(target, mix)

    def oracle_refinement(self, mix: torch.Tensor, query_clips: list[torch.Tensor], target: torch.Tensor,
                          kind: str) -> torch.Tensor:
        """The separator's estimate corrected by the refiner towards the true `target` (`LatentRefiner.oracle_gain`:
        the bounds `stemquery eval` sets beside the refiner's real runs), for audio of one segment's length."""
        if self.refiner is None:
            raise StemqueryError("an oracle refinement needs the refiner: add refine=1")
        with torch.inference_mode():
            spec = self._stereo_spec(mix)
            estimate = self.separator_estimate(spec, self.encode_query(query_clips))
            gain = self.refiner.oracle_gain(kind, estimate, self._stereo_spec(target))
            audio = self.stft.inverse(self.refiner.apply_gain(estimate, gain, 1.0)[0], mix.shape[-1])
        return self._channels_of(audio, mix)

    def separate_segment_stems(self, mix: torch.Tensor, queries: list[QueryState],
                               progress: StepProgress = no_progress) -> torch.Tensor:
        """The mix STFT once, the network once per stem on it, then each stem's share of the mix STFT."""
        spec = self._stereo_spec(mix)
        magnitudes = []
        for index, query in enumerate(queries):
            within = lambda f, i=index: progress((i + f) / len(queries))  # noqa: E731
            magnitudes.append(self._estimate(spec, query, within)[0].abs())
            within(1.0)
        stems = shares_to_stems(spec[0], torch.stack(magnitudes), self.stft, mix.shape[-1])
        return self._channels_of(stems, mix)
