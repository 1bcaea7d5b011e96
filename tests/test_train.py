"""Training: a few real steps on a small synthetic corpus, checkpoint, resume, export, use."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import tone_sequence
from stemquery.model import Separator
from stemquery.model.bsmamba import BSMambaConfig
from stemquery.model.evaluate import build_evalset
from stemquery.model.data.dataset import load_corpus, piano_roll
from stemquery.model.engines.bsmamba import save_weights
from stemquery.model.bsmamba import BSMamba
from stemquery.model.refiner import RefinerConfig, load_refiner
from stemquery.model.export import export
from stemquery.model.train import SeparatorTrainConfig, SeparatorTrainer, query_contrastive_loss
from stemquery.model.train_refiner import (RefinerTrainConfig, RefinerTrainer, VAETrainConfig, VAETrainer,
                                          load_vae_checkpoint)
from stemquery.model.vae import VAEConfig
from conftest import TINY_REFINER, TINY_SEPARATOR, TINY_VAE

RATE = 44100


def make_corpus(root: Path) -> Path:
    """Three tracks in the renderer's layout, each with three differently-timbred synthetic stems."""
    rng = np.random.default_rng(0)
    for index in range(3):
        folder = root / f"t{index:06d}"
        (folder / "stems").mkdir(parents=True)
        stems = []
        for position, (low, high, timbre, program) in enumerate([(40, 52, "saw", 33), (60, 72, "hollow", 73),
                                                                  (52, 64, "saw", 0)]):
            pitches = rng.integers(low, high, 12)
            audio = tone_sequence(pitches, 0.5, harmonics=timbre)
            name = f"stems/{position:02d}_part{position}.flac"
            sf.write(folder / name, np.stack([audio, audio * 0.9]).T, RATE, subtype="PCM_16")
            notes = [[0.5 * i, 0.5 * (i + 1), int(pitch), 90] for i, pitch in enumerate(pitches)]
            stems.append({"file": name, "part": f"part{position}", "program": program, "family": "synthetic",
                          "is_drum": False, "timbre": "synthetic.sf2", "notes": notes})
        (folder / "meta.json").write_text(json.dumps({"track": folder.name, "stems": stems}))
    return root


def test_train_checkpoint_resume_export(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    build_evalset(corpus, tmp_path / "val", cases=2, seed=0, segment_s=2.0, query_s=1.0, protocols=("same_stem",))
    config = SeparatorTrainConfig(run_dir=tmp_path / "run", train_corpus=corpus, val_set=tmp_path / "val",
                                  batch=2, segment_s=1.0, query_s=1.0, max_steps=3, validate_every=2, val_cases=2,
                                  log_every=1, warmup_steps=2, model=BSMambaConfig(**TINY_SEPARATOR))
    trainer = SeparatorTrainer(config)
    trainer.run()
    assert trainer.step == 3 and (tmp_path / "run" / "last.pt").exists()
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert best["step"] == 2 and best["best"] == trainer.curve[0]["si_sdr_i"] == trainer.best
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    # resumed with the query-contrastive term on (a design change mid-run, as run 6 had): both parts logged
    resumed = SeparatorTrainer(dataclasses.replace(config, max_steps=5, query_contrastive=0.5))
    resumed.resume(tmp_path / "run" / "last.pt")
    assert resumed.step == 3 and resumed.curve == trainer.curve and resumed.curve[0]["step"] == 2
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    resumed.run()
    assert resumed.step == 5
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    assert [r["validation"]["step"] for r in log if "validation" in r] == [2, 4]
    assert all("contrastive" not in r for r in log if r.get("step", 9) <= 3)
    late = [r for r in log if r.get("step", 0) > 3]
    assert all(np.isfinite(r["contrastive"]) and np.isfinite(r["separation"]) for r in late)

    export(tmp_path / "run" / "last.pt", tmp_path / "weights" / "model")
    meta = json.loads((tmp_path / "weights" / "model.json").read_text())
    assert meta["step"] == 5 and meta["config"]["dim"] == 16
    mix, _ = sf.read(corpus / "t000000" / "stems" / "00_part0.flac", dtype="float32")
    stems = Separator("bsmamba", device="cpu", weights=tmp_path / "weights" / "model").separate(
        mix.T, RATE, [mix.T[:, :RATE]])
    assert stems.target.shape == mix.T.shape

    # a new machine continues from the committed weights alone: same weights, step and curve, the learning rate
    # warmed up again from there (no optimiser state), and it trains on
    again = SeparatorTrainer(dataclasses.replace(config, max_steps=7, query_contrastive=0.5))
    again.resume(tmp_path / "weights" / "model.safetensors")
    assert again.step == again.warm_from == 5 and again.curve == resumed.curve and again.best == resumed.best
    for key, value in again.model.state_dict().items():
        torch.testing.assert_close(value, resumed.model.state_dict()[key])
    assert again.learning_rate() == pytest.approx(resumed.learning_rate() / config.warmup_steps)
    again.run()
    assert again.step == 7


@pytest.mark.parametrize("added", [dict(match_heads=2),
                                   dict(match_heads=2, nmf_prior_iterations=3, nmf_prior_confidence=True)])
def test_new_paths_fine_tune_from_weights_without_them(tmp_path, added):
    """`init_weights`: the shipped model without a matching path (or NMF prior) starts the run; the new paths'
    parameters are the only ones it did not bring, and the run trains and validates (the design steps from
    bsmamba-v2 to v3 and v4). The prior's own parameters, and only they, train at `prior_lr_scale` × the rate."""
    corpus = make_corpus(tmp_path / "corpus")
    build_evalset(corpus, tmp_path / "val", cases=2, seed=0, segment_s=2.0, query_s=1.0, protocols=("same_stem",))
    old = SeparatorTrainer(SeparatorTrainConfig(run_dir=tmp_path / "old", train_corpus=corpus, val_set=tmp_path / "none",
                                                model=BSMambaConfig(**TINY_SEPARATOR)))
    from stemquery.model.engines.bsmamba import save_weights

    save_weights(old.model, tmp_path / "v2")
    config = SeparatorTrainConfig(run_dir=tmp_path / "run", train_corpus=corpus, val_set=tmp_path / "val",
                                  batch=2, segment_s=1.0, query_s=1.0, max_steps=2, log_every=1, warmup_steps=2,
                                  validate_every=2, val_cases=2, val_self_cases=1,
                                  init_weights=tmp_path / "v2", query_embedding_dropout=0.5,
                                  protocols=("same_stem", "overlap", "cross_source"), family_negative_p=0.5,
                                  dominant_p=0.5, prior_lr_scale=10.0,
                                  model=BSMambaConfig(**TINY_SEPARATOR, **added))
    trainer = SeparatorTrainer(config)
    for key, value in old.model.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[key], value)
    trainer.run()
    assert trainer.step == 2
    validation = trainer.curve[-1]
    assert validation["step"] == 2 and np.isfinite(validation["si_sdr_i"]) and np.isfinite(validation["si_sdr_i_self"])
    groups = {group["lr_scale"]: group for group in trainer.optimizer.param_groups}
    scaled = {id(p) for p in trainer.model.prior.parameters()} if trainer.model.prior is not None else set()
    assert {id(p) for p in groups.get(10.0, {"params": []})["params"]} == scaled
    assert len(groups[1.0]["params"]) + len(scaled) == len(list(trainer.model.parameters()))
    if scaled:
        assert groups[10.0]["lr"] == pytest.approx(10 * groups[1.0]["lr"]) and groups[1.0]["lr"] > 0


def test_trainable_trains_the_named_gates_alone(tmp_path):
    """`trainable`: a run of a model whose gates read every source's match (bsmamba-v9g; with the loss on the
    estimate between the blends too, v9s) changes the gates' parameters and leaves every other one as it started;
    a name that matches nothing is refused."""
    corpus = make_corpus(tmp_path / "corpus")
    gates = ("prior.gate", "prior.match_weight", "prior.source_weight")
    config = SeparatorTrainConfig(run_dir=tmp_path / "run", train_corpus=corpus, val_set=tmp_path / "none",
                                  batch=2, segment_s=1.0, query_s=1.0, max_steps=2, log_every=1, warmup_steps=1,
                                  validate_every=100, trainable=gates, prior_lr_scale=10.0, stage_loss=1.0,
                                  model=BSMambaConfig(**TINY_SEPARATOR, nmf_prior_iterations=3,
                                                      nmf_prior_confidence=True, nmf_prior_exemplars=8,
                                                      nmf_prior_match=True, nmf_prior_match_sources=True))
    trainer = SeparatorTrainer(config)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(any(part in k for part in gates) for k in changed)
    assert any("source_weight" in k for k in changed) and any(k.startswith("exemplar_prior.") for k in changed)
    with pytest.raises(ValueError, match="names none"):
        SeparatorTrainer(dataclasses.replace(config, trainable=("nothing.",)))


def test_query_contrastive_loss_rewards_matching_and_spares_same_instrument():
    rng = np.random.default_rng(0)
    embeddings = torch.from_numpy(rng.standard_normal((4, 32))).float()
    keys = [(1, "a"), (2, "a"), (3, "a"), (4, "a")]
    matched = query_contrastive_loss(embeddings, embeddings, keys, temperature=0.05)
    shuffled = query_contrastive_loss(embeddings, embeddings[[1, 2, 3, 0]], keys, temperature=0.05)
    assert matched < 0.05 and shuffled > 10 * matched
    # rows 0 and 1 the same instrument with one embedding: without the mask each is as near the other's positive
    # as its own (loss ≥ ln 2 on those rows); with it, they are not each other's negatives
    twins = embeddings.clone()
    twins[1] = twins[0]
    spared = query_contrastive_loss(twins, twins, [(1, "a"), (1, "a"), (3, "a"), (4, "a")], temperature=0.05)
    confused = query_contrastive_loss(twins, twins, keys, temperature=0.05)
    assert spared < 0.05 and confused > 0.3


def test_piano_roll_marks_sounding_notes_per_frame():
    notes = np.array([[0.0, 0.25, 60, 90], [0.5, 1.2, 64, 80], [3.0, 4.0, 70, 90]])
    roll = piano_roll(notes, start_s=0.2, frames=10, frame_s=0.1)
    assert roll.shape == (128, 10) and roll.sum() == roll[[60, 64]].sum()
    assert roll[60].tolist() == [1] + [0] * 9  # 0.2-0.25 s
    assert roll[64].tolist() == [0, 0, 0] + [1] * 7  # from 0.5 s on


def test_vae_and_refiner_train_resume_and_export(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    assert load_corpus(corpus, RATE)[0].stems[0].notes.shape == (12, 4)
    build_evalset(corpus, tmp_path / "val", cases=1, seed=0, segment_s=2.0, query_s=1.0, protocols=("same_stem",))
    vae_config = VAETrainConfig(run_dir=tmp_path / "vae", train_corpus=corpus, val_corpus=corpus, batch=2,
                                clip_s=1.0, max_steps=2, validate_every=2, val_pairs=2, log_every=1,
                                model=VAEConfig(**TINY_VAE))
    with pytest.raises(ValueError, match="vae trainer runs on cpu only"):  # its batches stay on the CPU
        VAETrainer(dataclasses.replace(vae_config, device="cuda"))
    VAETrainer(vae_config).run()
    curve = json.loads((tmp_path / "vae" / "curve.json").read_text())
    assert curve[0]["step"] == 2 and all(np.isfinite(curve[0][k]) for k in ("reconstruction", "pitch", "contrastive"))
    # a VAE is committed on its own (before a refiner is trained over it): exported, it loads and resumes
    export(tmp_path / "vae" / "last.pt", tmp_path / "weights" / "vae-v1")
    trained = torch.load(tmp_path / "vae" / "last.pt", weights_only=False)["model"]
    for key, value in load_vae_checkpoint(tmp_path / "weights" / "vae-v1").state_dict().items():
        torch.testing.assert_close(value, trained[key])
    again = VAETrainer(dataclasses.replace(vae_config, max_steps=3, run_dir=tmp_path / "vae2"))
    again.resume(tmp_path / "weights" / "vae-v1.safetensors")
    again.run()
    assert again.step == 3

    torch.manual_seed(0)
    save_weights(BSMamba(BSMambaConfig(**TINY_SEPARATOR)), tmp_path / "sep" / "bsmamba-v1")
    config = RefinerTrainConfig(run_dir=tmp_path / "refiner", train_corpus=corpus, val_set=tmp_path / "val",
                                vae_checkpoint=tmp_path / "weights" / "vae-v1",
                                separator_weights=tmp_path / "sep" / "bsmamba-v1", batch=2, segment_s=1.0,
                                query_s=1.0, max_steps=2, validate_every=2, val_cases=1, log_every=1,
                                model=RefinerConfig(**TINY_REFINER))
    trainer = RefinerTrainer(config)
    # the diffusion's latent is standardised per channel by the spread measured over training targets
    latent_std = trainer.model.config.latent_std
    assert len(latent_std) == VAEConfig().latent_channels and min(latent_std) > 0
    spec = trainer.stft.forward(torch.from_numpy(trainer.sampler.draw(np.random.default_rng(3)).target))[None]
    z = trainer.model.encode(spec)
    assert not torch.allclose(z, trainer.model.vae.encode(spec, trainer.model.frame_multiple))
    frames = spec.shape[-1]
    torch.testing.assert_close(trainer.model.band_magnitude(z, frames), trainer.model.vae.bands.magnitude(
        trainer.model.vae.decode(trainer.model.vae.encode(spec, trainer.model.frame_multiple), frames)), rtol=1e-4,
        atol=1e-6)  # undone exactly before decoding, to float rounding
    vae_before = {k: v.clone() for k, v in trainer.model.vae.state_dict().items()}
    trainer.run()
    for key, value in trainer.model.vae.state_dict().items():
        assert torch.equal(value, vae_before[key]), f"the VAE is frozen, but {key} changed"
    resumed = RefinerTrainer(dataclasses.replace(config, max_steps=3))
    resumed.resume(tmp_path / "refiner" / "last.pt")
    resumed.run()
    bounds = resumed.curve[0]
    assert resumed.step == 3 and {"snr_separator", "snr_refined", "snr_vae_roundtrip", "snr_oracle_latent",
                                  "snr_oracle_band_gain"} <= set(bounds)
    # the target's own band magnitudes put on the estimate: the ceiling of the band-gain correction, far above it
    assert bounds["snr_oracle_band_gain"] > bounds["snr_separator"] + 3.0

    export(tmp_path / "refiner" / "last.pt", tmp_path / "weights" / "refiner-v1")
    refiner = load_refiner(tmp_path / "weights" / "refiner-v1")
    assert json.loads((tmp_path / "weights" / "refiner-v1.json").read_text())["step"] == 3
    mix, _ = sf.read(corpus / "t000000" / "stems" / "00_part0.flac", dtype="float32")
    stems = Separator("bsmamba", device="cpu", weights=tmp_path / "sep" / "bsmamba-v1", refine=True, steps=2,
                      refiner_weights=tmp_path / "weights" / "refiner-v1").separate(mix.T, RATE, [mix.T[:, :RATE]])
    assert stems.target.shape == mix.T.shape and stems.engine == "bsmamba-refined2"
    assert refiner.config.steps == TINY_REFINER["steps"] and refiner.config.latent_std == latent_std


def test_curve_plot_of_runs(tmp_path):
    from click.testing import CliRunner

    from stemquery.daw_bridge.cli import main

    for name, values in (("a", [-0.2, 0.1, 0.5]), ("b", [0.0, 0.3])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "curve.json").write_text(json.dumps(
            [{"step": 200 * (i + 1), "si_sdr_i": v} for i, v in enumerate(values)]))
    out = tmp_path / "curve.png"
    result = CliRunner().invoke(main, ["train", "curve", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = CliRunner().invoke(main, ["train", "curve", str(tmp_path / "a"), "--metric", "snr", "--out", str(out)])
    assert result.exit_code == 1 and "no 'snr' values" in result.output


def test_batched_nmf_prior_equals_one_clip_at_a_time():
    """The accelerator's batched prior (`QueryPrior.batch_bases` and batched shares) is the CPU's per-example one,
    for each example with its own query, for the learned bases' share and the exemplars' alike."""
    from stemquery.model.engines.bsmamba import nmf_prior, prior_shares
    from stemquery.model.engines.nmf import channel_magnitude

    prior = nmf_prior(BSMambaConfig(**TINY_SEPARATOR, nmf_prior_iterations=5, nmf_prior_exemplars=8,
                                    nmf_prior_match=True, nmf_prior_match_sources=True))
    generator = torch.Generator().manual_seed(0)
    mix = torch.rand(3, 2, 65, 20, generator=generator) * torch.exp(2j * torch.pi * torch.rand(3, 2, 65, 20))
    query = torch.rand(3, 2, 65, 30, generator=generator).to(torch.complex64)
    one_at_a_time = prior_shares(prior, mix, [prior.bases([channel_magnitude(q)]) for q in query])
    batched = prior.prior(channel_magnitude(mix), prior.batch_bases(channel_magnitude(query)))
    assert batched.shares.shape == (3, 2, 65, 20) and batched.match.shape == (3, 20)
    assert batched.sources.shape == (3, 2, 20)
    torch.testing.assert_close(batched.shares, one_at_a_time.shares, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batched.match, one_at_a_time.match, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.sources, one_at_a_time.sources, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched.shares[0], batched.shares[1], atol=1e-3)  # each with its own query's bases
    assert not torch.allclose(batched.shares[:, 0], batched.shares[:, 1], atol=1e-3)  # two kinds, two shares


def test_worker_processes_draw_the_batches(tmp_path):
    """`workers`: batches drawn by worker processes train like the in-process ones (shapes, finite losses),
    and a resumed run draws from a stream of its own (seed, step) rather than replaying the first one."""
    from stemquery.model.train import _WorkerBatches

    corpus = make_corpus(tmp_path / "corpus")
    config = SeparatorTrainConfig(run_dir=tmp_path / "run", train_corpus=corpus, val_set=tmp_path / "none",
                                  batch=2, segment_s=1.0, query_s=1.0, max_steps=3, log_every=1, warmup_steps=2,
                                  workers=2, model=BSMambaConfig(**TINY_SEPARATOR))
    trainer = SeparatorTrainer(config)
    trainer.run()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    first = next(iter(_WorkerBatches(trainer.sampler, 2, seed=0, step=0)))
    again = next(iter(_WorkerBatches(trainer.sampler, 2, seed=0, step=0)))
    later = next(iter(_WorkerBatches(trainer.sampler, 2, seed=0, step=3)))
    (mixture, target, query), infos = first
    assert mixture.shape == target.shape == (2, 2, RATE) and query.shape == (2, 2, RATE) and len(infos) == 2
    torch.testing.assert_close(again[0][0], mixture)
    assert not torch.equal(later[0][0], mixture)


@pytest.mark.parametrize("flags, native", [("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_bf16 amx_tile", True),
                                           ("fpu avx2 fma", False), ("fpu avx2 avx512f avx512bw", False)])
def test_bf16_autocast_only_where_the_cpu_has_bf16_instructions(tmp_path, monkeypatch, flags, native):
    """`cpu_has_bf16` reads /proc/cpuinfo's flags; a run asked for bf16 on a CPU without them trains in float32
    (emulated bf16 made a separator step twice as slow on an AVX2-only CPU)."""
    from stemquery.model import training_loop
    from stemquery.model.training_loop import RunConfig, TrainingRun, cpu_has_bf16

    cpuinfo = f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert cpu_has_bf16(cpuinfo) is native
    assert cpu_has_bf16("processor\t: 0\n") is False  # no flags line (not Linux x86): float32
    monkeypatch.setattr(training_loop, "cpu_has_bf16", lambda: native)
    model = torch.nn.Linear(2, 2)
    run = TrainingRun(RunConfig(run_dir=tmp_path, bf16=True), model, list(model.parameters()))
    assert run.config.bf16 is native
