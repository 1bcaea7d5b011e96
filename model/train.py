"""The separator's trainer on the rendered corpus, resumable across sessions, with the loop every trainer shares
(`training_loop.TrainingRun`; the refiner's VAE and diffusion model train with it too, in `train_refiner.py`).

    stemquery train separator --config model/configs/bsmamba.toml [--resume runs/bsmamba/last.pt]

Loss: −SI-SDR on the waveform plus 0.5 × a level term, −SNR on the waveform (the default's, from run 6's step
4,900) or L1-SNR on the complex spectrogram (as Banquet; before); for an absent target, the estimate's energy
relative to the mixture (see `separation_loss` for why not a level term alone, and `LEVEL_LOSSES` for why SNR).
With `query_contrastive` (the default's, from run 6's step 9,050), plus that weight × an InfoNCE term on the query
embedding (`query_contrastive_loss`).

Logs: `RUN/log.jsonl` (a JSON object per logged step and per validation), checkpoints `RUN/last.pt` every
`checkpoint_minutes` and at the end; `RUN/curve.json` holds the validation SI-SDR improvement by step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stemquery.model.bsmamba import BSMamba, BSMambaConfig
from stemquery.model.engines.bsmamba import batch_prior, estimate_target, nmf_prior
from stemquery.model.stft import STFT
from stemquery.model.training_loop import RunConfig, TrainingRun, load_partial

log = logging.getLogger(__name__)

#: Parts of the separator that weights from before them lack (the matching path, the NMF prior): starting from such
#: weights (`init_weights`), these keep their initialisation.
ADDED_SINCE_V2 = ("query_frame_mlp.", "prior.", ".match.")  # "prior." also covers "exemplar_prior."


@dataclass(frozen=True)
class SeparatorTrainConfig(RunConfig):
    run_dir: Path = Path("runs/bsmamba")
    train_corpus: Path = Path("data/train")
    val_set: Path = Path("data/eval_val")
    segment_s: float = 3.0
    query_s: float = 3.0
    val_cases: int = 24
    #: Validation cases also run with their clean target as the query (the perfect example: does it match?).
    val_self_cases: int = 8
    protocols: tuple[str, ...] = ("same_stem", "same_stem", "cross_track", "mixture_region")
    absent_target_p: float = 0.05
    #: Share of draws with a hard negative: a stem of the target's family, another instrument, from another track.
    family_negative_p: float = 0.0
    #: Share of draws whose target is 5-15 dB above the rest (so that a dominant target is left in place).
    dominant_p: float = 0.0
    #: Share of draws whose pooled query embedding is zeroed: the matching path must carry the query alone.
    query_embedding_dropout: float = 0.0
    #: Shipped weights to start from (a `train export` output, without suffix); parameters it lacks (a matching
    #: path added since) start as initialised, which leaves the exported model's output unchanged.
    init_weights: Path | None = None
    #: ± dB of the random per-stem EQ that turns the corpus's few SoundFont timbres into many (0: off).
    timbre_eq_db: float = 0.0
    #: ± semitones of a random tape-speed change per draw (pitch, formants and tempo together; 0: off).
    speed_semitones: float = 0.0
    #: The loss's level term, a key of `LEVEL_LOSSES` (run 6 trained with "l1_snr" up to step 4,900).
    level_loss: str = "snr"
    #: Weight of `query_contrastive_loss` (0: off): the query's embedding must pick out the embedding of its own
    #: target's clean segment among the batch's other targets, so that it says which instrument, not which notes.
    query_contrastive: float = 0.0
    contrastive_temperature: float = 0.1
    #: Learning-rate multiplier of the NMF prior's own parameters (its input projections and gate). At the
    #: network's rate, bsmamba-v4's gate stayed within 0.45-0.52 on 80 % of the shipped example's band-frames after
    #: 400 steps: a plain average, not the learned confidence it is meant to be (docs/results.md, session 9).
    prior_lr_scale: float = 1.0
    #: Train only the parameters whose names contain one of these (empty: all); the rest stay frozen, and with
    #: only the gates trainable a step needs no backward pass through the network (bsmamba-v9g: the gates' choice
    #: among fixed candidates, apart from the candidates getting better).
    trainable: tuple[str, ...] = ()
    #: Weight of the same separation loss on the estimate after each blend but the last (0: off). Without it the
    #: learned share's gate learns only where the exemplar gate after it is shut (its gradient is scaled by
    #: 1 − that gate), so where the exemplars are trusted it stays shut even when the learned share is the better one
    #: (0.15 on the README example in v8 and v9g, where that share alone is 1 dB above the exemplar share).
    stage_loss: float = 0.0
    #: Processes that draw the training triples (0: drawn in the training process, one batch per step, the
    #: random stream fixed by the seed). On an accelerator the step is faster than one CPU core draws a batch;
    #: each worker then draws whole batches from a stream of its own (seed, resume step, worker).
    workers: int = 0
    model: BSMambaConfig = field(default_factory=lambda: BSMambaConfig(chunk=32))


def l1_snr(estimate: torch.Tensor, target: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """10·log10((‖target − estimate‖₁ + floor) / (‖target‖₁ + floor)) per example (lower is better)."""
    error = (target - estimate).abs().flatten(1).sum(-1)
    reference = target.abs().flatten(1).sum(-1)
    return 10 * torch.log10((error + floor) / (reference + floor))


def neg_si_sdr(estimate: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """−SI-SDR in dB per example, channels joined (lower is better)."""
    estimate, target = estimate.flatten(1), target.flatten(1)
    scale = (estimate * target).sum(-1, keepdim=True) / (target.pow(2).sum(-1, keepdim=True) + eps)
    projection = scale * target
    return -10 * torch.log10((projection.pow(2).sum(-1) + eps) / ((estimate - projection).pow(2).sum(-1) + eps))


def neg_snr(estimate: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """−SNR in dB per example, channels joined (lower is better)."""
    error = (estimate - target).flatten(1).pow(2).sum(-1)
    return 10 * torch.log10((error + eps) / (target.flatten(1).pow(2).sum(-1) + eps))


def _spectral_l1_snr(estimate_spec, estimate, target, mixture, stft: STFT) -> torch.Tensor:
    floor = 1e-3 * stft.forward(mixture).abs().flatten(1).sum(-1) + 1e-6
    return l1_snr(torch.view_as_real(estimate_spec), torch.view_as_real(stft.forward(target)), floor)


def _waveform_snr(estimate_spec, estimate, target, mixture, stft: STFT) -> torch.Tensor:
    return neg_snr(estimate, target).clamp(-50.0, 50.0)


#: The term that sets the estimate's level (−SI-SDR cannot). Trained with L1-SNR, run 6 (step 3,562) put out its
#: best separations at about half the target's level: on the shipped example a mask of 0.54 where the flute alone
#: fills the bin, SI-SDR 13.2 dB but SNR 5.8; the least-squares gain <e,t>/<e,e> of the best val cases was 1.5 to
#: 2.6. A squared error at its minimum leaves the error orthogonal to the estimate, which is that gain being 1 in
#: expectation; an L1 distance (minimised by medians) promises nothing of the kind.
LEVEL_LOSSES = {"l1_snr": _spectral_l1_snr, "snr": _waveform_snr}


def separation_loss(estimate_spec: torch.Tensor, target: torch.Tensor, mixture: torch.Tensor,
                    stft: STFT, level: str = "snr") -> torch.Tensor:
    """−SI-SDR, plus a level term (`LEVEL_LOSSES`, weight 0.5); for an absent target, the estimate's energy
    relative to the mixture.

    A loss made of level-aware terms alone (L1-SNR, SNR) has silence as an easy minimum at 0 dB, and the first
    run (docs/results.md) fell into it: the mask went to zero. −SI-SDR punishes silence without bound, so the
    model must correlate with the target; the level term then sets the level.
    """
    estimate = stft.inverse(estimate_spec, target.shape[-1])
    present = target.flatten(1).abs().sum(-1) > 0
    level = LEVEL_LOSSES[level](estimate_spec, estimate, target, mixture, stft)
    correlate = neg_si_sdr(estimate, target).clamp(max=50.0)
    silence = 10 * torch.log10((estimate.pow(2).flatten(1).sum(-1) + 1e-8) /
                               (mixture.pow(2).flatten(1).sum(-1) + 1e-8)).clamp(min=-30.0)
    return torch.where(present, correlate + 0.5 * level, silence).mean()


def query_contrastive_loss(queries: torch.Tensor, positives: torch.Tensor, keys: list, *,
                           temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between each query embedding and the embedding of its own target (batch, dim each).

    Other rows of the batch are the negatives, except those of the same instrument (`keys`: `Stem.key`), left out
    rather than pushed away. Why: with a loss on separation alone, the separator's query embedding told the
    instruments of the test set (reserved timbres) apart worse than a contrastively trained one (nearest-neighbour
    same-instrument accuracy 0.17 against 0.46 for the refiner VAE's timbre, benchmarks/query_embeddings.py), and
    its worst test cases were cross-track queries of a timbre it had not learned by heart.
    """
    queries = torch.nn.functional.normalize(queries.float(), dim=-1)
    positives = torch.nn.functional.normalize(positives.float(), dim=-1)
    logits = queries @ positives.T / temperature
    same = torch.tensor([[a == b for b in keys] for a in keys], device=logits.device)
    logits = logits.masked_fill(same & ~torch.eye(len(keys), dtype=torch.bool, device=logits.device), -torch.inf)
    labels = torch.arange(len(keys), device=logits.device)
    return (torch.nn.functional.cross_entropy(logits, labels) +
            torch.nn.functional.cross_entropy(logits.T, labels)) / 2


class SeparatorTrainer(TrainingRun):
    kind = "separator"
    best_metric = "si_sdr_i"
    devices = ("cpu", "cuda")

    def __init__(self, config: SeparatorTrainConfig) -> None:
        from stemquery.model.data.dataset import TripleSampler, load_corpus

        if config.level_loss not in LEVEL_LOSSES:
            raise ValueError(f"level_loss {config.level_loss!r} is not one of {sorted(LEVEL_LOSSES)}")
        torch.manual_seed(config.seed)
        model = BSMamba(config.model)
        if config.init_weights:
            load_partial(model, config.init_weights, added=ADDED_SINCE_V2)
        super().__init__(config, model, self._trainable(model, config.trainable),
                         lr_scales={"prior.": config.prior_lr_scale, "exemplar_prior.": config.prior_lr_scale})
        self.stft = STFT(config.model.n_fft, config.model.hop)
        self.prior = nmf_prior(config.model, self.device)
        self._batches = None  # the workers' batches (`workers` > 0), started at the first step
        tracks = load_corpus(config.train_corpus, config.model.sample_rate)
        log.info("training corpus: %d tracks, %.1f stem-hours", len(tracks),
                 sum(s.audio.shape[1] for t in tracks for s in t.stems) / config.model.sample_rate / 3600)
        self.sampler = TripleSampler(tracks, sample_rate=config.model.sample_rate, segment_s=config.segment_s,
                                     query_s=config.query_s, protocols=config.protocols,
                                     absent_target_p=config.absent_target_p, timbre_eq_db=config.timbre_eq_db,
                                     speed_semitones=config.speed_semitones,
                                     family_negative_p=config.family_negative_p, dominant_p=config.dominant_p)

    def _next_batch(self) -> tuple[tuple[torch.Tensor, ...], list[dict]]:
        """(mixture, target, query) on the training device, and each triple's info."""
        from stemquery.model.data.dataset import stack_triples

        if self.config.workers > 0:
            if self._batches is None:
                self._batches = iter(_worker_loader(self.sampler, self.config, self.step))
            tensors, infos = next(self._batches)
        else:
            triples = [self.sampler.draw(self.rng) for _ in range(self.config.batch)]
            tensors, infos = stack_triples(triples), [t.info for t in triples]
        return tuple(t.to(self.device, non_blocking=True) for t in tensors), infos

    @staticmethod
    def _trainable(model: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Parameter]:
        """The parameters to train (`trainable`); the others are frozen (requires_grad off)."""
        if not names:
            return list(model.parameters())
        chosen = [p for name, p in model.named_parameters() if any(part in name for part in names)]
        if not chosen:
            raise ValueError(f"trainable {list(names)} names none of the model's parameters")
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(any(part in name for part in names))
        log.info("training %d of %d parameter tensors (%s)", len(chosen), len(list(model.parameters())),
                 ", ".join(names))
        return chosen

    def loss(self) -> torch.Tensor:
        (mixture, target, query), infos = self._next_batch()
        mix_spec, query_spec = self.stft.forward(mixture), self.stft.forward(query)
        prior = batch_prior(self.prior, mix_spec, query_spec)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            condition = self.model.embed_queries([query_spec])
            if self.config.query_embedding_dropout > 0:
                keep = torch.rand(len(infos), device=self.device) >= self.config.query_embedding_dropout
                condition = condition._replace(embedding=condition.embedding * keep[:, None].to(condition.embedding))
            stages = [] if self.config.stage_loss else None
            estimate = self.model(mix_spec, condition, prior=prior, stages=stages)
        loss = separation_loss(estimate.to(torch.complex64), target, mixture, self.stft, self.config.level_loss)
        for stage in stages or []:
            loss = loss + self.config.stage_loss * separation_loss(stage.to(torch.complex64), target, mixture,
                                                                   self.stft, self.config.level_loss)
        present = [i for i, info in enumerate(infos) if not info["absent"]]
        if self.config.query_contrastive > 0 and len(present) > 1:
            self.terms.setdefault("separation", []).append(float(loss.detach()))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
                positives = self.model.query_encoder(self.stft.forward(target[present])).embedding
            contrastive = query_contrastive_loss(condition.embedding[present], positives,
                                                 [infos[i]["instrument"] for i in present],
                                                 temperature=self.config.contrastive_temperature)
            self.terms.setdefault("contrastive", []).append(float(contrastive.detach()))
            loss = loss + self.config.query_contrastive * contrastive
        return loss

    def validate(self) -> dict:
        """Mean SI-SDR improvement on the first `val_cases` cases of the val eval set, overall and per protocol,
        the mean SNR improvement (which, unlike SI-SDR, also sees whether the level is right), and on the first
        `val_self_cases` with the clean target as the query (`si_sdr_i_self`: how well the perfect example is
        matched)."""
        from stemquery.model.evaluate import case_folders, read_case

        if not self.config.val_set.exists():
            return {}
        gains, snr_gains, self_gains = {}, [], []
        for index, folder in enumerate(case_folders(self.config.val_set)[: self.config.val_cases]):
            case = read_case(folder)
            gain, snr_gain = self._improvement(case, case.query)
            gains.setdefault(case.meta.get("protocol", ""), []).append(gain)
            snr_gains.append(snr_gain)
            if index < self.config.val_self_cases:
                self_gains.append(self._improvement(case, case.target)[0])
        everything = [g for values in gains.values() for g in values]
        return {"step": self.step, "si_sdr_i": float(np.mean(everything)), "snr_i": float(np.mean(snr_gains)),
                **{f"si_sdr_i_{k}": float(np.mean(v)) for k, v in gains.items()},
                **({"si_sdr_i_self": float(np.mean(self_gains))} if self_gains else {})}

    def _improvement(self, case, query: np.ndarray) -> tuple[float, float]:
        """(SI-SDR improvement, SNR improvement) of the model on `case` with `query`."""
        from stemquery.model.evaluate import si_sdr, snr

        spec = self.stft.forward(torch.from_numpy(case.mixture).to(self.device))[None]
        query_spec = self.stft.forward(torch.from_numpy(query).to(self.device))[None]
        estimate = estimate_target(self.model, self.prior, spec, query_spec)
        estimate = self.stft.inverse(estimate[0], case.mixture.shape[1]).cpu().numpy()
        return (si_sdr(estimate, case.target) - si_sdr(case.mixture, case.target),
                snr(estimate, case.target) - snr(case.mixture, case.target))


class _WorkerBatches(torch.utils.data.IterableDataset):
    """Endless batches from a `TripleSampler`, each worker with a random stream of its own."""

    def __init__(self, sampler, batch: int, seed: int, step: int) -> None:
        self.sampler, self.batch, self.seed, self.step = sampler, batch, seed, step

    def __iter__(self):
        from stemquery.model.data.dataset import stack_triples

        worker = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, self.step, worker.id if worker else 0])
        while True:
            triples = [self.sampler.draw(rng) for _ in range(self.batch)]
            yield stack_triples(triples), [t.info for t in triples]


def _worker_loader(sampler, config: SeparatorTrainConfig, step: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_WorkerBatches(sampler, config.batch, config.seed, step), batch_size=None,
                                       num_workers=config.workers, prefetch_factor=4, persistent_workers=True,
                                       pin_memory=torch.device(config.device).type == "cuda")
