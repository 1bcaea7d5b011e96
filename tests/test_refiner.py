"""The refiner: VAE reconstruction and its latent layout, deterministic sampling, odd lengths, and refine on/off
through the API, the CLI and the job spec."""
import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from conftest import RATE, TINY_REFINER, TINY_VAE, tiny_refiner, tone_sequence
from stemquery.daw_bridge.cli import main
from stemquery.daw_bridge.spec import SpecError, validate_spec
from stemquery.model import Separator, StemqueryError
from stemquery.model.engines.bsmamba import REFINER_NAME
from stemquery.model.refiner import LatentRefiner, RefinerConfig, load_refiner, save_refiner
from stemquery.model.stft import STFT
from stemquery.model.train_refiner import RefinerTrainConfig, VAETrainConfig, vae_losses
from stemquery.model.vae import TimbrePitchVAE, VAEConfig

def clip(seed: int, seconds: float = 1.5) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    wave = tone_sequence(rng.integers(45, 75, int(seconds / 0.25)), 0.25, harmonics=["saw", "hollow"][seed % 2])
    return torch.from_numpy(np.stack([wave, 0.8 * wave]))


def test_vae_learns_to_reconstruct_a_held_out_clip():
    """300 steps on 16 synthetic clips: a clip it never saw comes back within 0.2 feature units (mean L1; the
    features span about 2.5 units) and at least 3× closer than before training."""
    torch.manual_seed(0)
    vae = TimbrePitchVAE(VAEConfig(**TINY_VAE))
    stft = STFT(2048, 1024)
    config = VAETrainConfig(kl_weight=1e-5)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    pool = stft.forward(torch.stack([clip(seed) for seed in range(16)]))[..., :64]
    held_out = stft.forward(clip(99)[None])[..., :64]

    def error() -> float:
        with torch.no_grad():
            features = vae.bands.features(held_out)
            return float((vae.decode(vae.posterior(features).mean) - features).abs().mean())

    before = error()
    for _ in range(300):
        losses = vae_losses(vae, pool[torch.randint(0, 16, (4,))], torch.zeros(4, 128, 16), config)
        optimizer.zero_grad()
        (losses["reconstruction"] + config.kl_weight * losses["kl"]).backward()
        optimizer.step()
    after = error()
    assert after < 0.2 and after < before / 3, (before, after)


def test_timbre_part_is_time_invariant_and_pitch_head_sees_every_frame():
    vae = TimbrePitchVAE(VAEConfig(**TINY_VAE)).eval()
    spec = STFT(2048, 1024).forward(clip(1, 3.0)[None])
    with torch.no_grad():
        latent = vae.encode(spec)
        timbre, content = vae.split(latent)
        joined = vae.join(timbre, content)
        logits = vae.pitch_logits(content)
    assert latent.shape[-1] * 4 >= spec.shape[-1] and timbre.shape == (1, 2, 8)
    assert torch.equal(joined[:, :2, :, 0], joined[:, :2, :, -1])  # timbre channels: one value over time
    assert logits.shape == (1, 128, latent.shape[-1])
    assert vae.timbre_embedding(spec).shape == (1, vae.config.timbre_dim)


@pytest.mark.parametrize("frames", [1, 7, 37, 64])
def test_refine_keeps_the_shape_of_odd_lengths(frames):
    refiner = tiny_refiner()
    spec = torch.randn(1, 2, 1025, frames, dtype=torch.complex64)
    with torch.no_grad():
        timbre = refiner.vae.timbre_embedding(spec)
        out = refiner.refine(spec, 0.5 * spec, timbre, steps=2)
    assert out.shape == spec.shape and torch.isfinite(torch.view_as_real(out)).all()


def test_a_latent_left_as_it_was_changes_nothing():
    """The correction is a ratio of two decodings, so the VAE's own reconstruction error cancels."""
    refiner = LatentRefiner(RefinerConfig(**{**TINY_REFINER, "latent_std": (2.0, 1.0, 3.0, 0.5)}),
                            TimbrePitchVAE(VAEConfig(**TINY_VAE)))
    spec = STFT(2048, 1024).forward(clip(3)[None])
    with torch.no_grad():
        z = refiner.encode(spec)
        kept = refiner.apply_gain(spec, refiner.latent_gain(z, z, spec.shape[-1]), 1.0)
        roundtrip = refiner.apply_gain(spec, refiner.band_gain_to(spec, refiner.band_magnitude(z, spec.shape[-1])),
                                       1.0)
    torch.testing.assert_close(kept, spec, rtol=1e-4, atol=1e-5)
    assert (roundtrip - spec).abs().mean() > 0.1 * spec.abs().mean()  # what an untrained VAE's round trip does


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_residual_sampling_with_an_oracle_of_no_correction_returns_the_estimate(monkeypatch, strength):
    """With `residual`, the diffusion is over the correction: a denoiser whose answer is always "no correction"
    (the exact v of a zero clean sample, standing in for the UNet) must leave the estimate's latent as it was."""
    refiner = LatentRefiner(RefinerConfig(**{**TINY_REFINER, "residual": True}), TimbrePitchVAE(VAEConfig(**TINY_VAE)))
    alphas = refiner.noise_schedule.alphas_cumprod

    def oracle_of_no_correction(noisy, timestep, z_mix, z_estimate, timbre):
        alpha = alphas[timestep].view(-1, 1, 1, 1)
        return alpha.sqrt() * noisy / (1 - alpha).sqrt()

    monkeypatch.setattr(refiner, "denoise", oracle_of_no_correction)
    z_estimate = torch.randn(1, refiner.vae.config.latent_channels, 16, 8, generator=torch.Generator().manual_seed(0))
    out = refiner.sample(torch.randn_like(z_estimate), z_estimate, torch.zeros(1, refiner.vae.config.timbre_dim),
                         steps=5, strength=strength, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, z_estimate, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("steps", "strength", "first"), [(1, 0.6, 499), (1, 1.0, 999), (10, 0.6, 587)])
def test_sampling_starts_at_the_noise_level_of_its_strength(monkeypatch, steps, strength, first):
    refiner = tiny_refiner()
    seen = []
    monkeypatch.setattr(refiner, "denoise", lambda noisy, timestep, *rest: seen.append(int(timestep[0])) or noisy)
    z = torch.zeros(1, refiner.vae.config.latent_channels, 16, 8)
    refiner.sample(z, z, torch.zeros(1, refiner.vae.config.timbre_dim), steps=steps, strength=strength)
    assert len(seen) == steps and seen[0] == first and seen == sorted(seen, reverse=True)


def test_sampling_is_deterministic_for_a_seed():
    refiner = tiny_refiner()
    spec = STFT(2048, 1024).forward(clip(3)[None])
    with torch.no_grad():
        timbre = refiner.vae.timbre_embedding(spec)
        run = lambda seed, scheduler="ddim": refiner.refine(  # noqa: E731
            spec, 0.5 * spec, timbre, steps=3, generator=torch.Generator().manual_seed(seed))
        first, again, other = run(1), run(1), run(2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_dpm_solver_and_strength_one_run():
    refiner = LatentRefiner(RefinerConfig(**{**TINY_REFINER, "scheduler": "dpmsolver++", "strength": 1.0}),
                            TimbrePitchVAE(VAEConfig(**TINY_VAE))).eval()
    spec = STFT(2048, 1024).forward(clip(4)[None])
    with torch.no_grad():
        out = refiner.refine(spec, spec, refiner.vae.timbre_embedding(spec), steps=4)
    assert out.shape == spec.shape and torch.isfinite(torch.view_as_real(out)).all()


def perfect_estimates(refiner: LatentRefiner, seeds) -> tuple[torch.Tensor, ...]:
    """Mix and target STFTs and their latents for clips whose estimate is the target itself."""
    stft = STFT(2048, 1024)
    target = stft.forward(torch.stack([clip(seed) for seed in seeds]))
    mix = target + stft.forward(torch.stack([0.7 * clip(seed + 50) for seed in seeds]))
    with torch.no_grad():
        return mix, target, refiner.encode(mix), refiner.encode(target), refiner.vae.timbre_embedding(target)


def test_one_step_refinement_loss_takes_the_path_inference_takes(monkeypatch):
    """`refinement_loss` denoises once, at the timestep a one-step `sample` starts from, and scores what `refine`
    would return: with a denoiser that always proposes the same correction, the loss is minus the refined
    SNR (capped at 30 dB)."""
    refiner = LatentRefiner(RefinerConfig(**{**TINY_REFINER, "gate": True, "strength": 0.6}),
                            TimbrePitchVAE(VAEConfig(**TINY_VAE))).eval()
    assert refiner.one_step_timestep(0.6) == 499 and refiner.one_step_timestep(1.0) == 999
    mix, target, z_mix, z_target, timbre = perfect_estimates(refiner, [1])
    estimate = 0.6 * target
    z_estimate = refiner.encode(estimate)
    seen = []
    alphas = refiner.noise_schedule.alphas_cumprod

    def denoiser_proposing(noisy, timestep, *rest):  # the v whose clean sample is the fixed correction 0.1
        seen.append(int(timestep[0]))
        alpha = alphas[timestep].view(-1, 1, 1, 1)
        noise = (noisy - alpha.sqrt() * 0.1) / (1 - alpha).sqrt()
        return alpha.sqrt() * noise - (1 - alpha).sqrt() * 0.1

    monkeypatch.setattr(refiner, "denoise", denoiser_proposing)
    with torch.no_grad():
        loss = refiner.refinement_loss(z_mix, z_estimate, timbre, estimate, target)
        refined = refiner.refine(mix, estimate, timbre, steps=1)
    relative_error = (refined - target).abs().pow(2).sum() / target.abs().pow(2).sum()
    assert seen == [499, 499] and relative_error > 0.05
    torch.testing.assert_close(loss, 10 * torch.log10(relative_error + 1e-3), rtol=1e-3, atol=1e-3)  # SNR cap 30 dB


def test_the_gate_learns_to_leave_a_perfect_estimate_unchanged():
    """With the UNet frozen (an untrained one proposes some correction everywhere), 60 steps of the one-step loss
    on estimates that are already the target train the gate alone to shut: on a held-out perfect estimate the
    change the refiner makes falls at least 30-fold, to under 1 % of its energy; the gate closes below 0.1."""
    torch.manual_seed(0)
    refiner = LatentRefiner(RefinerConfig(**{**TINY_REFINER, "gate": True}), TimbrePitchVAE(VAEConfig(**TINY_VAE)))
    refiner.requires_grad_(False)
    refiner.gate.requires_grad_(True)
    optimizer = torch.optim.Adam(refiner.gate.parameters(), lr=1e-2)
    train = perfect_estimates(refiner, range(8))
    held_out = perfect_estimates(refiner, [20])

    def change() -> tuple[float, float]:
        mix, target, z_mix, z_target, timbre = held_out
        with torch.no_grad():
            latent = refiner.sample(z_mix, z_target, timbre, steps=1, strength=refiner.config.strength,
                                    generator=torch.Generator().manual_seed(0))
            refined = refiner.refine(mix, target, timbre, steps=1, generator=torch.Generator().manual_seed(0))
            gate = refiner.gate_of(z_mix, z_target, latent, target.shape[-1])
        return float((refined - target).abs().pow(2).sum() / target.abs().pow(2).sum()), float(gate.mean())

    before, gate_before = change()
    for _ in range(60):
        mix, target, z_mix, z_target, timbre = train
        loss = refiner.refinement_loss(z_mix, z_target, timbre, target, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after, gate_after = change()
    assert gate_before == pytest.approx(0.5) and gate_after < 0.1, (gate_before, gate_after)
    assert after < 0.01 and after < before / 30, (before, after)



def test_an_open_gate_applies_the_correction_in_full_and_trains_only_the_unet():
    """`gate_open` (a run's first `gate_open_steps`) bypasses the gate: with a gate shut hard (sigmoid(-30)) the
    loss is the unchanged estimate's, minus its SNR (with the 30 dB cap); held open, it is the fully corrected
    estimate's, and the gradient reaches the UNet and not the gate."""
    torch.manual_seed(0)
    refiner = LatentRefiner(RefinerConfig(**{**TINY_REFINER, "gate": True}), TimbrePitchVAE(VAEConfig(**TINY_VAE)))
    torch.nn.init.constant_(refiner.gate.net[-1].bias, -30.0)
    mix, target, z_mix, _, timbre = perfect_estimates(refiner, [3])
    estimate = 0.5 * target
    z_estimate = refiner.encode(estimate).detach()
    unchanged = 10 * torch.log10((estimate - target).abs().pow(2).sum() / target.abs().pow(2).sum() + 1e-3)

    torch.manual_seed(1)
    shut = refiner.refinement_loss(z_mix, z_estimate, timbre, estimate, target)
    torch.manual_seed(1)
    opened = refiner.refinement_loss(z_mix, z_estimate, timbre, estimate, target, gate_open=True)
    opened.backward()
    torch.testing.assert_close(shut, unchanged, rtol=1e-4, atol=1e-4)
    assert abs(float(opened - unchanged)) > 0.05, (float(opened), float(unchanged))
    assert all(p.grad is None for p in refiner.gate.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in refiner.unet.parameters())


def test_init_skip_starts_the_named_parts_afresh(tmp_path):
    """A run started from shipped refiner weights with `init_skip = ["gate."]` takes everything but the gate from
    them; the gate keeps its initialisation (half open)."""
    from stemquery.model.training_loop import load_partial

    trained = LatentRefiner(RefinerConfig(**{**TINY_REFINER, "gate": True}), TimbrePitchVAE(VAEConfig(**TINY_VAE)))
    torch.nn.init.constant_(trained.gate.net[-1].bias, -5.0)
    save_refiner(trained, tmp_path / "trained")
    torch.manual_seed(7)
    fresh = LatentRefiner(RefinerConfig(**{**TINY_REFINER, "gate": True}), TimbrePitchVAE(VAEConfig(**TINY_VAE)))
    load_partial(fresh, tmp_path / "trained", added=(), skip=("gate.",))
    assert float(fresh.gate.net[-1].bias) == 0.0
    for name, value in trained.state_dict().items():
        if not name.startswith("gate."):
            assert torch.equal(fresh.state_dict()[name], value), name


def test_a_run_that_trains_nothing_is_refused():
    with pytest.raises(ValueError, match="nothing would train the UNet"):
        RefinerTrainConfig(model=RefinerConfig(**TINY_REFINER), denoise_weight=0.0)


def test_a_gate_without_the_loss_that_trains_it_is_refused():
    with pytest.raises(ValueError, match="set refine_weight above 0"):
        RefinerTrainConfig(model=RefinerConfig(**{**TINY_REFINER, "gate": True}))
    assert RefinerTrainConfig(model=RefinerConfig(**{**TINY_REFINER, "gate": True}), refine_weight=1.0).refine_weight


def test_refiner_weights_round_trip(tiny_shipped, tmp_path):
    loaded = load_refiner(tmp_path / REFINER_NAME)
    for key, value in tiny_shipped.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_refine_on_and_off_through_the_api(tiny_shipped, two_sources):
    mix, _, query = two_sources
    plain = Separator("bsmamba", device="cpu").separate(mix, RATE, [query])
    refined_separator = Separator("bsmamba", device="cpu", refine=True, steps=2)
    refined = refined_separator.separate(mix, RATE, [query])
    again = refined_separator.separate(mix, RATE, [query])
    assert plain.engine == "bsmamba" and refined.engine == "bsmamba-refined2"
    assert refined.target.shape == mix.shape and not np.allclose(refined.target, plain.target)
    np.testing.assert_array_equal(refined.target, again.target)  # seeded: the same sound every run
    np.testing.assert_allclose(refined.target + refined.residual, mix, atol=1e-6)
    # the blend weight: 0 is the separator alone, between 0 and 1 a share of the refiner's correction
    untouched = Separator("bsmamba", device="cpu", refine=True, steps=2, blend=0.0).separate(mix, RATE, [query])
    np.testing.assert_allclose(untouched.target, plain.target, atol=1e-6)
    half = Separator("bsmamba", device="cpu", refine=True, steps=2, blend=0.5).separate(mix, RATE, [query])
    assert half.engine == "bsmamba-refined2-blend0.5"
    assert 0.1 < np.abs(half.target - plain.target).mean() / np.abs(refined.target - plain.target).mean() < 0.9
    with pytest.raises(StemqueryError, match="blend must be between 0 and 1"):
        Separator("bsmamba", device="cpu", refine=True, blend=1.5)
    with pytest.raises(StemqueryError, match="blend only applies with refine"):
        Separator("bsmamba", device="cpu", blend=0.5)


def test_refine_through_the_cli(tiny_shipped, write_audio, two_sources, tmp_path):
    mix, _, query = two_sources
    args = ["separate", str(write_audio("m.wav", mix)), "-q", str(write_audio("q.wav", query)),
            "--engine", "bsmamba", "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(main, args + ["--refine", "--steps", "2"])
    assert result.exit_code == 0, result.output
    refined, rate = sf.read(tmp_path / "o" / "m_(target)_bsmamba-refined2.wav", always_2d=True)
    assert rate == RATE and refined.shape == (mix.shape[1], 1)
    result = CliRunner().invoke(main, args + ["--no-refine"])
    assert result.exit_code == 0, result.output
    plain, _ = sf.read(tmp_path / "o" / "m_(target)_bsmamba.wav", always_2d=True)
    assert not np.allclose(plain, refined)


def test_refine_errors_are_specific(tiny_shipped, write_audio, two_sources, tmp_path):
    mix, _, query = two_sources
    args = ["separate", str(write_audio("m.wav", mix)), "-q", str(write_audio("q.wav", query)), "-o", str(tmp_path)]
    result = CliRunner().invoke(main, args + ["--engine", "nmf", "--refine"])
    assert result.exit_code != 0 and "engine nmf has no refiner" in result.output
    result = CliRunner().invoke(main, args + ["--engine", "bsmamba", "--steps", "3"])
    assert result.exit_code != 0 and "steps only applies with refine" in result.output
    assert not list(tmp_path.glob("m_(*"))
    with pytest.raises(SpecError, match="steps only applies with refine"):
        validate_spec({"mix": "m.wav", "query": "q.wav", "steps": 3})
    with pytest.raises(SpecError, match="between 1 and 100"):
        validate_spec({"mix": "m.wav", "query": "q.wav", "refine": 1, "steps": 0})
    assert validate_spec({"mix": "m.wav", "query": "q.wav", "engine": "bsmamba", "refine": "1", "steps": 4})["refine"]
    for shipped in tmp_path.glob(f"{REFINER_NAME}.*"):  # the separator ships, its refiner does not
        shipped.unlink()
    with pytest.raises(SpecError, match="no trained refiner shipped"):
        validate_spec({"mix": "m.wav", "query": "q.wav", "engine": "bsmamba", "refine": 1})
    result = CliRunner().invoke(main, args + ["--engine", "bsmamba", "--refine"])
    assert result.exit_code != 0 and "refiner weights" in result.output and "not found" in result.output
    with pytest.raises(StemqueryError, match="engine nmf has no refiner"):
        Separator("nmf", device="cpu", refine=True)


def test_eval_scores_separator_alone_and_refined_side_by_side(tiny_shipped, tmp_path):
    from stemquery.model.evaluate import build_evalset, evaluate, parse_engine_spec
    from test_train import make_corpus

    assert parse_engine_spec("bsmamba:refine=1,steps=5,blend=0.5") == ("bsmamba", {"refine": True, "steps": 5,
                                                                                 "blend": 0.5})
    corpus = make_corpus(tmp_path / "corpus")
    build_evalset(corpus, tmp_path / "set", cases=2, seed=0, segment_s=2.0, query_s=1.0, protocols=("same_stem",))
    engines = ["bsmamba", "bsmamba:refine=1,steps=2"]
    result = evaluate(tmp_path / "set", engines, cache=tmp_path / "cache")
    overall = result["summary"]["overall"]
    assert set(engines) <= set(overall) and overall[engines[1]]["n"] == 2
    assert overall[engines[0]]["snr_mean"] != overall[engines[1]]["snr_mean"]
    assert len(set(result["fingerprints"][e] for e in engines)) == 2
    assert len(list((tmp_path / "cache").glob("bsmamba_refine_1_steps_2-*.json"))) == 1


def test_eval_sets_the_refiners_oracle_bounds_beside_it(tiny_shipped, tmp_path):
    """`oracle=KIND` on a refining engine scores the separator's estimate corrected towards the target: towards the
    target's band magnitudes it beats the separator alone (the ceiling of a band-gain correction), each bound is
    cached apart from the real refinement, and a bad kind or a bound without the refiner is a specific error."""
    from stemquery.model.evaluate import build_evalset, evaluate, markdown_report
    from test_train import make_corpus

    corpus = make_corpus(tmp_path / "corpus")
    build_evalset(corpus, tmp_path / "set", cases=2, seed=0, segment_s=2.0, query_s=1.0, protocols=("same_stem",))
    engines = ["bsmamba", "bsmamba:refine=1,steps=1", "bsmamba:refine=1,oracle=band_gain",
               "bsmamba:refine=1,oracle=latent"]
    result = evaluate(tmp_path / "set", engines, cache=tmp_path / "cache")
    overall = result["summary"]["overall"]
    assert overall[engines[2]]["snr_mean"] > overall["bsmamba"]["snr_mean"] + 1.0
    assert len({result["fingerprints"][e] for e in engines}) == 4
    assert f"| {engines[2]} | {overall[engines[2]]['snr_mean']:.2f} |" in markdown_report(result)
    for spec, message in [("bsmamba:refine=1,oracle=perfect", "oracle= takes one of latent, band_gain"),
                          ("bsmamba:oracle=latent", "on an engine with refine=1")]:
        with pytest.raises(StemqueryError, match=message):
            evaluate(tmp_path / "set", [spec])
