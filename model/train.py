"""Training on the rendered corpus, resumable across sessions: the loop every trainer shares (`TrainingRun`) and
the separator's trainer. The refiner's VAE and diffusion model train with the same loop (`train_refiner.py`).

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

import json
import logging
import signal
import time
import tomllib
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import numpy as np
import torch

from stemquery.model.bsmamba import BSMamba, BSMambaConfig
from stemquery.model.stft import STFT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """What every training run has: where it writes, its seed, optimiser schedule, logging and time budget."""

    run_dir: Path = Path("runs/run")
    seed: int = 0
    batch: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 200
    #: Learning rate halves every this many steps after warm-up (several resumed sessions, no fixed end).
    lr_half_life: int = 4000
    max_steps: int = 100_000
    #: Stop after this many minutes in this run (a session is 180 min; leave time to commit).
    minutes: float = 120.0
    grad_clip: float = 5.0
    log_every: int = 10
    validate_every: int = 250
    checkpoint_minutes: float = 5.0
    bf16: bool = True
    threads: int = 2

    @classmethod
    def load(cls, path: Path):
        """A TOML file: this run's settings at the top level, nested model configs as tables."""
        data = tomllib.loads(Path(path).read_text())
        hints = typing.get_type_hints(cls)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown training setting(s) {sorted(unknown)}")
        for name, value in data.items():
            kind = hints[name]
            if is_dataclass(kind):
                data[name] = kind.from_dict(value)
            elif kind is Path or kind == Path | None:
                data[name] = Path(value)
            elif typing.get_origin(kind) is tuple:
                data[name] = tuple(value)
        return cls(**data)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


@dataclass(frozen=True)
class SeparatorTrainConfig(RunConfig):
    run_dir: Path = Path("runs/bsmamba")
    train_corpus: Path = Path("data/train")
    val_set: Path = Path("data/eval_val")
    segment_s: float = 3.0
    query_s: float = 3.0
    val_cases: int = 24
    protocols: tuple[str, ...] = ("same_stem", "same_stem", "cross_track", "mixture_region")
    absent_target_p: float = 0.05
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


class TrainingRun:
    """The loop every trainer shares: learning-rate schedule, skipped non-finite steps, logs, periodic validation,
    checkpoints (`RUN/last.pt`, the previous one kept as `last.prev.pt`), resume, and a clean stop on SIGTERM.

    A subclass builds `self.model` (what the checkpoint holds) and says what it trains (`trainable`), how a step's
    loss is computed (`loss`) and how it is validated (`validate`: a dict with "step" and its figures).
    """

    kind: str = ""
    #: The validation figure that picks `RUN/best.pt`, and whether higher is better. Validation on a couple of
    #: dozen cases is noisy and the curve is not monotone: the last checkpoint is not always the one to ship.
    best_metric: str = ""
    higher_is_better: bool = True

    def __init__(self, config: RunConfig, model: torch.nn.Module, trainable: list[torch.nn.Parameter]) -> None:
        self.config = config
        self.model = model
        self.trainable = trainable
        # fused: one kernel for all the (many, small, per-band) parameter tensors instead of a loop over them
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, fused=True)
        self.step = 0
        self.curve: list[dict] = []
        self.best: float | None = None
        self.rng = np.random.default_rng(config.seed)
        #: A loss's parts, logged as their means beside the loss (a subclass appends to them in `loss`).
        self.terms: dict[str, list[float]] = {}
        config.run_dir.mkdir(parents=True, exist_ok=True)

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def validate(self) -> dict:
        raise NotImplementedError

    def extra_state(self) -> dict:
        """What else a checkpoint must hold to rebuild the model on its own."""
        return {}

    # -- state ----------------------------------------------------------------------------------------------------
    def save(self, path: Path | None = None) -> Path:
        """Write the checkpoint (the previous last.pt is kept as last.prev.pt). Refuses non-finite weights."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise RuntimeError(f"step {self.step}: the weights are not finite; not overwriting the checkpoint")
        path = path or self.config.run_dir / "last.pt"
        if path.exists() and path.name == "last.pt":
            path.replace(path.with_suffix(".prev.pt"))
        tmp = path.with_suffix(".tmp")
        torch.save({"kind": self.kind, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "step": self.step, "curve": self.curve, "best": self.best, "rng": self.rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "config": self.config.to_dict(), **self.extra_state()}, tmp)
        tmp.replace(path)
        (self.config.run_dir / "curve.json").write_text(json.dumps(self.curve, indent=1))
        return path

    def resume(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("kind", "separator") != self.kind:
            raise ValueError(f"{path} is a {state.get('kind', 'separator')} checkpoint, not a {self.kind} one")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.curve, self.best = state["step"], state["curve"], state.get("best")
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s at step %d", path, self.step)

    # -- steps ----------------------------------------------------------------------------------------------------
    def _keep_if_best(self, result: dict) -> None:
        value = result.get(self.best_metric)
        if value is None:
            return
        if self.best is None or (value > self.best if self.higher_is_better else value < self.best):
            self.best = value
            self.save(self.config.run_dir / "best.pt")
            log.info("best %s so far (%.3f): %s", self.best_metric, value, self.config.run_dir / "best.pt")

    def learning_rate(self) -> float:
        c = self.config
        if self.step < c.warmup_steps:
            return c.lr * (self.step + 1) / c.warmup_steps
        return c.lr * 0.5 ** ((self.step - c.warmup_steps) / c.lr_half_life)

    def train_step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if not torch.isfinite(loss):
            log.warning("step %d: non-finite loss, batch skipped", self.step)
            return float("nan")
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)
        if not torch.isfinite(norm):
            log.warning("step %d: non-finite gradient, update skipped", self.step)
            return float("nan")
        self.optimizer.step()
        return float(loss.detach())

    def run(self) -> None:
        """Train until max_steps, `minutes`, or SIGTERM/SIGINT (then the checkpoint is written first)."""
        torch.set_num_threads(self.config.threads)
        started = time.monotonic()
        log_file = (self.config.run_dir / "log.jsonl").open("a")
        stop: list[bool] = []
        previous = {signum: signal.signal(signum, lambda *_: stop.append(True))
                    for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._loop(started, log_file, stop)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.save()
            log_file.close()
        log.info("stopped at step %d after %.1f min", self.step, (time.monotonic() - started) / 60)

    def _loop(self, started: float, log_file, stop: list[bool]) -> None:
        c = self.config
        last_checkpoint, losses = started, []
        self.model.train()
        while not stop and self.step < c.max_steps and (time.monotonic() - started) / 60 < c.minutes:
            step_started = time.monotonic()
            losses.append(self.train_step())
            if self.step % c.log_every == 0:
                record = {"step": self.step, "loss": float(np.nanmean(losses)) if not np.isnan(losses).all() else None,
                          "skipped": int(np.isnan(losses).sum()), "lr": self.learning_rate(),
                          "step_s": time.monotonic() - step_started, "time": time.time(),
                          **{name: float(np.mean(values)) for name, values in self.terms.items() if values}}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                log.info("step %d loss %s", self.step, record["loss"])
                losses = []
                self.terms = {}
            if self.step % c.validate_every == 0:
                self.model.eval()
                with torch.no_grad():
                    result = self.validate()
                self.model.train()
                if result:
                    self.curve.append(result)
                    log_file.write(json.dumps({"validation": result}) + "\n")
                    log_file.flush()
                    log.info("validation at step %d: %s", self.step,
                             ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k != "step"))
                    self._keep_if_best(result)
            if (time.monotonic() - last_checkpoint) / 60 >= c.checkpoint_minutes:
                self.save()
                last_checkpoint = time.monotonic()


class SeparatorTrainer(TrainingRun):
    kind = "separator"
    best_metric = "si_sdr_i"

    def __init__(self, config: SeparatorTrainConfig) -> None:
        from stemquery.model.data.dataset import TripleSampler, load_corpus

        if config.level_loss not in LEVEL_LOSSES:
            raise ValueError(f"level_loss {config.level_loss!r} is not one of {sorted(LEVEL_LOSSES)}")
        torch.manual_seed(config.seed)
        model = BSMamba(config.model)
        super().__init__(config, model, list(model.parameters()))
        self.stft = STFT(config.model.n_fft, config.model.hop)
        tracks = load_corpus(config.train_corpus, config.model.sample_rate)
        log.info("training corpus: %d tracks, %.1f stem-hours", len(tracks),
                 sum(s.audio.shape[1] for t in tracks for s in t.stems) / config.model.sample_rate / 3600)
        self.sampler = TripleSampler(tracks, sample_rate=config.model.sample_rate, segment_s=config.segment_s,
                                     query_s=config.query_s, protocols=config.protocols,
                                     absent_target_p=config.absent_target_p, timbre_eq_db=config.timbre_eq_db,
                                     speed_semitones=config.speed_semitones)

    def loss(self) -> torch.Tensor:
        from stemquery.model.data.dataset import stack_triples

        triples = [self.sampler.draw(self.rng) for _ in range(self.config.batch)]
        mixture, target, query = stack_triples(triples)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):
            condition = self.model.embed_queries([self.stft.forward(query)])
            estimate = self.model(self.stft.forward(mixture), condition)
        loss = separation_loss(estimate.to(torch.complex64), target, mixture, self.stft, self.config.level_loss)
        present = [i for i, t in enumerate(triples) if not t.info["absent"]]
        if self.config.query_contrastive > 0 and len(present) > 1:
            self.terms.setdefault("separation", []).append(float(loss.detach()))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):
                positives = self.model.query_encoder(self.stft.forward(target[present])).embedding
            contrastive = query_contrastive_loss(condition.embedding[present], positives,
                                                 [triples[i].info["instrument"] for i in present],
                                                 temperature=self.config.contrastive_temperature)
            self.terms.setdefault("contrastive", []).append(float(contrastive.detach()))
            loss = loss + self.config.query_contrastive * contrastive
        return loss

    def validate(self) -> dict:
        """Mean SI-SDR improvement on the first `val_cases` cases of the val eval set, overall and per protocol,
        and the mean SNR improvement (which, unlike SI-SDR, also sees whether the level is right)."""
        from stemquery.model.evaluate import case_folders, read_case, si_sdr, snr

        if not self.config.val_set.exists():
            return {}
        gains, snr_gains = {}, []
        for folder in case_folders(self.config.val_set)[: self.config.val_cases]:
            case = read_case(folder)
            spec = self.stft.forward(torch.from_numpy(case.mixture))[None]
            condition = self.model.embed_queries([self.stft.forward(torch.from_numpy(case.query))[None]])
            estimate = self.stft.inverse(self.model(spec, condition)[0], case.mixture.shape[1]).numpy()
            gain = si_sdr(estimate, case.target) - si_sdr(case.mixture, case.target)
            gains.setdefault(case.meta.get("protocol", ""), []).append(gain)
            snr_gains.append(snr(estimate, case.target) - snr(case.mixture, case.target))
        everything = [g for values in gains.values() for g in values]
        return {"step": self.step, "si_sdr_i": float(np.mean(everything)), "snr_i": float(np.mean(snr_gains)),
                **{f"si_sdr_i_{k}": float(np.mean(v)) for k, v in gains.items()}}


def _export_separator(state: dict, out: Path, provenance: dict) -> None:
    from stemquery.model.engines.bsmamba import save_weights

    model = BSMamba(BSMambaConfig(**state["config"]["model"]))
    model.load_state_dict(state["model"])
    save_weights(model, out, extra=provenance)


def _export_refiner(state: dict, out: Path, provenance: dict) -> None:
    from stemquery.model.refiner import save_refiner
    from stemquery.model.train_refiner import refiner_from_state

    save_refiner(refiner_from_state(state), out, extra=provenance)


EXPORTERS = {"separator": _export_separator, "refiner": _export_refiner}


def export(checkpoint: Path, out: Path) -> None:
    """Write a checkpoint's model as shipped weights (safetensors + config JSON with its training provenance)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    kind = state.get("kind", "separator")
    if kind not in EXPORTERS:
        raise ValueError(f"{checkpoint}: a {kind} checkpoint is not shipped on its own (the refiner's export holds "
                         "its VAE); export a separator or refiner checkpoint")
    curve = state["curve"]
    EXPORTERS[kind](state, out, {"step": state["step"], "validation": curve[-1] if curve else None,
                                 "train_config": state["config"]})


def plot_curves(runs: list[Path], metric: str, out: Path) -> None:
    """Validation `metric` against steps for each run directory (its curve.json), one line each (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for run in runs:
        curve = [point for point in json.loads((Path(run) / "curve.json").read_text()) if metric in point]
        if not curve:
            raise ValueError(f"{run}/curve.json has no {metric!r} values")
        axis.plot([p["step"] for p in curve], [p[metric] for p in curve], "o-", label=Path(run).name)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set(xlabel="training step", ylabel=metric, title="validation")
    axis.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
