"""The training loop every trainer shares (`TrainingRun`, `RunConfig`): learning-rate schedule, skipped non-finite
steps, logs, periodic validation, checkpoints, resume and a clean stop on SIGTERM; and the validation curves' plot.

The separator's trainer is `train.py`, the refiner's VAE and diffusion model's `train_refiner.py`; shipping a
checkpoint as weights is `export.py`.
"""
from __future__ import annotations

import json
import logging
import signal
import time
import tomllib
import typing
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path

import numpy as np
import torch

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
    #: The torch device the model trains on ("cuda" on an accelerator, for the trainers whose `devices` have it:
    #: the separator's); data is drawn on the CPU.
    device: str = "cpu"

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


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16 among its Linux /proc/cpuinfo flags).
    Without them bf16 autocast is emulated and slower than float32; where the flags cannot be read, assume not."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
    #: The device types this trainer moves its batches to (`RunConfig.device`).
    devices: tuple[str, ...] = ("cpu",)

    def __init__(self, config: RunConfig, model: torch.nn.Module, trainable: list[torch.nn.Parameter],
                 lr_scales: dict[str, float] | None = None) -> None:
        """`lr_scales`: a learning-rate multiplier for the trainable parameters whose names (in `model`) start with
        a key; the rest train at the schedule's rate."""
        self.device = torch.device(config.device)
        if self.device.type not in self.devices:
            raise ValueError(f"device {config.device!r}: the {self.kind} trainer runs on {', '.join(self.devices)} "
                             "only; set device = \"cpu\" in its config")
        if config.bf16 and self.device.type == "cpu" and not cpu_has_bf16():
            log.warning("bf16 autocast off: this CPU has no bfloat16 instructions (avx512_bf16, amx_bf16), where "
                        "torch emulates it (a separator step took twice as long as in float32)")
            config = replace(config, bf16=False)
        self.config = config
        self.model = model.to(self.device)
        self.trainable = trainable
        # fused: one kernel for all the (many, small, per-band) parameter tensors instead of a loop over them
        self.optimizer = torch.optim.AdamW(self._param_groups(trainable, lr_scales or {}), lr=config.lr,
                                           weight_decay=config.weight_decay, fused=True)
        self.step = 0
        self.curve: list[dict] = []
        self.best: float | None = None
        #: The step the learning rate was last warmed up from (0, or a resume from weights alone).
        self.warm_from = 0
        self.rng = np.random.default_rng(config.seed)
        #: A loss's parts, logged as their means beside the loss (a subclass appends to them in `loss`).
        self.terms: dict[str, list[float]] = {}
        config.run_dir.mkdir(parents=True, exist_ok=True)

    def _param_groups(self, trainable: list[torch.nn.Parameter], lr_scales: dict[str, float]) -> list[dict]:
        names = {id(p): name for name, p in self.model.named_parameters()}
        scale_of = {id(p): next((v for k, v in lr_scales.items() if names.get(id(p), "").startswith(k)), 1.0)
                    for p in trainable}
        return [{"params": [p for p in trainable if scale_of[id(p)] == scale], "lr_scale": scale}
                for scale in sorted(set(scale_of.values()))]

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
        """Continue from a checkpoint (`last.pt`: weights, optimiser, random state), or from a weights export that
        a run committed (`.safetensors` + `.json`, see `export.py`): its weights, step and curve, with a fresh
        optimiser warmed up again and the random streams reseeded from the step."""
        if Path(path).suffix == ".safetensors":
            self._resume_from_export(Path(path))
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("kind", "separator") != self.kind:
            raise ValueError(f"{path} is a {state.get('kind', 'separator')} checkpoint, not a {self.kind} one")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.curve, self.best = state["step"], state["curve"], state.get("best")
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s at step %d", path, self.step)

    def _resume_from_export(self, path: Path) -> None:
        from safetensors.torch import load_file

        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("kind", self.kind) != self.kind:
            raise ValueError(f"{path} holds a {meta['kind']} model, not a {self.kind} one")
        self.model.load_state_dict(load_file(str(path)))
        self.step = self.warm_from = int(meta["step"])
        self.curve, self.best = meta.get("curve", []), meta.get("best")
        self.rng = np.random.default_rng([self.config.seed, self.step])
        torch.manual_seed(self.config.seed + self.step)
        log.info("resumed from the weights %s at step %d (fresh optimiser, warmed up again)", path, self.step)

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
        """Linear warm-up, then halving every `lr_half_life` steps; warmed up again after a resume that brought no
        optimiser state (`warm_from`)."""
        c = self.config
        ramp = min(1.0, (self.step - self.warm_from + 1) / c.warmup_steps)
        return c.lr * ramp * 0.5 ** (max(0, self.step - c.warmup_steps) / c.lr_half_life)

    def train_step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate() * group.get("lr_scale", 1.0)
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
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 products: the NMF prior's and the network's
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


def load_partial(model: torch.nn.Module, weights: Path, *, added: tuple[str, ...],
                 skip: tuple[str, ...] = ()) -> None:
    """Load shipped weights (path without suffix) into `model`, which may have parts the weights lack: parameters
    whose names contain one of `added` (parts introduced since) keep their initialisation, and so do those whose
    names start with one of `skip` (parts to start afresh). Anything else that does not fit is an error."""
    from safetensors.torch import load_file

    state = {name: value for name, value in load_file(str(Path(weights).with_suffix(".safetensors"))).items()
             if not name.startswith(skip)}
    added = added + skip
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ
        raise ValueError(f"{weights}: weights do not fit this model ({str(exc).splitlines()[1].strip()})") from None
    unexpected = result.unexpected_keys
    foreign = [k for k in result.missing_keys if not any(part in k for part in added)]
    if unexpected or foreign:
        raise ValueError(f"{weights}: weights do not fit this model (unexpected {unexpected[:3]}, missing "
                         f"{foreign[:3]})")
    log.info("started from %s (%d new parameter tensors)", weights, len(result.missing_keys))
