"""The band-split Mamba separator: shapes, learning, weights round trip, the engine through the API and CLI."""
import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from conftest import RATE, si_sdr, tone_sequence
from stemquery.daw_bridge.cli import main
from stemquery.model import Separator
from stemquery.model.bands import musical_bands
from stemquery.model.bsmamba import BSMamba, BSMambaConfig
from stemquery.model.engines import bsmamba as engine_module
from stemquery.model.engines.bsmamba import load_model, save_weights
from stemquery.model.parallel import SliceParallel
from stemquery.model.stft import STFT
from stemquery.model.train import separation_loss

TINY = dict(dim=16, layers=1, bands=8, d_state=8, headdim=16, query_dim=16, chunk=16)


def test_bands_cover_every_bin_once():
    bands = musical_bands(1025, 44100, 32)
    assert bands[0][0] == 0 and bands[-1][1] == 1025 and len(bands) == 32
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:])) and all(b - a >= 2 for a, b in bands)
    assert bands[0][1] - bands[0][0] < bands[-1][1] - bands[-1][0]  # narrow low, wide high


@pytest.mark.parametrize("conditioning,match_heads,prior,confidence", [
    ("film", 0, 0, False), ("hyperfilm", 0, 0, False), ("hyperfilm", 2, 0, False), ("hyperfilm", 2, 5, False),
    ("hyperfilm", 2, 5, True)])
@pytest.mark.parametrize("samples", [RATE, 12345, 1000])
def test_output_spectrogram_shape_for_odd_lengths(conditioning, match_heads, prior, confidence, samples):
    config = BSMambaConfig(**TINY, conditioning=conditioning, match_heads=match_heads, nmf_prior_iterations=prior,
                           nmf_prior_confidence=confidence)
    model, stft = BSMamba(config), STFT(config.n_fft, config.hop)
    mix = stft.forward(torch.randn(2, 2, samples))
    queries = [stft.forward(torch.randn(2, 2, 7777)), stft.forward(torch.randn(2, 2, 5000))]
    condition = model.embed_queries(queries)
    out = model(mix, condition, prior=torch.rand(2, *mix.shape[2:]) if prior else None)
    assert out.shape == mix.shape and out.dtype == torch.complex64
    assert stft.inverse(out, samples).shape == (2, 2, samples)
    if match_heads:  # several queries are more frames for the matching path, not an average
        assert condition.frames.shape == (2, config.bands, sum(q.shape[-1] for q in queries), config.dim)
    else:
        assert condition.frames is None


def upgraded_from_shipped(tmp_path, base: dict | None = None, **added):
    """(model without `added` (with `base`), saved and loaded by `load_partial` into a model with them, a mix STFT,
    a query STFT): a new path fine-tuned from shipped weights."""
    from stemquery.model.train import ADDED_SINCE_V2
    from stemquery.model.training_loop import load_partial

    torch.manual_seed(0)
    without = BSMamba(BSMambaConfig(**TINY, **(base or {})))
    save_weights(without, tmp_path / "old")
    upgraded = BSMamba(BSMambaConfig(**{**TINY, **(base or {}), **added}))
    load_partial(upgraded, tmp_path / "old", added=ADDED_SINCE_V2)
    stft = STFT(without.config.n_fft, without.config.hop)
    return without, upgraded, stft.forward(torch.randn(1, 2, 9000)), stft.forward(torch.randn(1, 2, 6000))


def test_matching_path_starts_as_the_model_without_it(tmp_path):
    """Shipped weights without a matching path load into a model with one (`load_partial`) and give the same
    output: the path's output projection starts at zero, so fine-tuning starts from the shipped model."""
    from stemquery.model.train import ADDED_SINCE_V2
    from stemquery.model.training_loop import load_partial

    without, with_match, mix, query = upgraded_from_shipped(tmp_path, match_heads=2)
    with torch.no_grad():
        torch.testing.assert_close(with_match(mix, with_match.embed_queries([query])),
                                   without(mix, without.embed_queries([query])))
    save_weights(BSMamba(BSMambaConfig(**{**TINY, "dim": 32})), tmp_path / "other")
    with pytest.raises(ValueError, match="do not fit"):
        load_partial(with_match, tmp_path / "other", added=ADDED_SINCE_V2)


@pytest.mark.parametrize("confidence", [False, True])
def test_nmf_prior_starts_as_the_average_of_the_network_and_nmf(tmp_path, confidence):
    """Weights without the NMF prior load into a model with it, which then gives the plain average of their
    estimate and the prior's (its input starts at zero, its gate at 0.5, with or without the confidence); the
    prior is required, and the model without one refuses it."""
    without, with_prior, mix, query = upgraded_from_shipped(tmp_path, nmf_prior_iterations=5,
                                                            nmf_prior_confidence=confidence)
    share = torch.rand(1, mix.shape[2], mix.shape[3])
    with torch.no_grad():
        network = without(mix, without.embed_queries([query]))
        torch.testing.assert_close(with_prior(mix, with_prior.embed_queries([query]), prior=share),
                                   0.5 * network + 0.5 * share[:, None] * mix)
        with pytest.raises(ValueError, match="takes an NMF prior"):
            with_prior(mix, with_prior.embed_queries([query]))
        with pytest.raises(ValueError, match="takes no NMF prior"):
            without(mix, without.embed_queries([query]), prior=share)


def test_exemplar_share_starts_nearly_shut_and_is_checked(tmp_path):
    """The exemplar share (`nmf_prior_exemplars`) joins a model with the prior as a second blend that starts at
    `EXEMPLAR_GATE_START`: a model without it fine-tunes from where it was. The number of shares is checked, and
    `stages` receives the estimate between the two blends."""
    from stemquery.model.bsmamba import EXEMPLAR_GATE_START

    one, two, mix, query = upgraded_from_shipped(tmp_path, nmf_prior_iterations=5, nmf_prior_confidence=True,
                                                 nmf_prior_exemplars=8, base=dict(nmf_prior_iterations=5,
                                                                                  nmf_prior_confidence=True))
    shares = torch.rand(1, 2, mix.shape[2], mix.shape[3])
    with torch.no_grad():
        before = one(mix, one.embed_queries([query]), prior=shares[:, 0])
        stages = []
        after = two(mix, two.embed_queries([query]), prior=shares, stages=stages)
        start = EXEMPLAR_GATE_START
        torch.testing.assert_close(after, (1 - start) * before + start * shares[:, 1, None] * mix)
        assert len(stages) == 1  # the estimate after the first blend (training's `stage_loss`): the old model's
        torch.testing.assert_close(stages[0], before)
        with pytest.raises(ValueError, match="takes 2 NMF share"):
            two(mix, two.embed_queries([query]), prior=shares[:, 0])
    with pytest.raises(ValueError, match="needs the NMF prior"):
        BSMambaConfig(**TINY, nmf_prior_exemplars=8)


def test_exemplar_match_starts_unchanged_and_reads_the_frames(tmp_path):
    """`nmf_prior_match`: the exemplar gate's match weights start at zero, so a v7-style model gains them
    unchanged; once weighted, a better frame match opens the gate further. The match is required, and
    `QueryNMF.exemplar_match` is 1 for a frame that is an exemplar (at any level) and lower for another."""
    from stemquery.model.bsmamba import Prior
    from stemquery.model.engines.nmf import QueryNMF

    base = dict(nmf_prior_iterations=5, nmf_prior_confidence=True, nmf_prior_exemplars=8)
    old, new, mix, query = upgraded_from_shipped(tmp_path, **base, nmf_prior_match=True, base=base)
    shares = torch.rand(1, 2, mix.shape[2], mix.shape[3], generator=torch.Generator().manual_seed(1))
    good, poor = torch.full((1, mix.shape[3]), 0.999), torch.full((1, mix.shape[3]), 0.7)
    with torch.no_grad():
        before = old(mix, old.embed_queries([query]), prior=shares)
        torch.testing.assert_close(new(mix, new.embed_queries([query]), prior=Prior(shares, good)), before)
        with pytest.raises(ValueError, match="frame match"):
            new(mix, new.embed_queries([query]), prior=shares)
        new.exemplar_prior.match_weight.fill_(1.0)
        gate, gates = new.exemplar_prior.gate, []
        new.exemplar_prior.gate = lambda *a: gates.append(gate(*a)) or gates[-1]
        for match in (good, poor):
            new(mix, new.embed_queries([query]), prior=Prior(shares, match))
        assert float(gates[0].mean()) > float(gates[1].mean()) + 0.3
    with pytest.raises(ValueError, match="needs the exemplar share"):
        BSMambaConfig(**TINY, nmf_prior_iterations=5, nmf_prior_match=True)
    exemplars = torch.rand(65, 8, generator=torch.Generator().manual_seed(2))
    estimate = torch.cat([3.0 * exemplars[:, 2:3], torch.rand(65, 1, generator=torch.Generator().manual_seed(3))], 1)
    match = QueryNMF.exemplar_match(estimate, exemplars)
    assert match[0] == pytest.approx(1.0, abs=1e-5) and match[1] < 0.99


def test_source_matches_start_unchanged_and_move_both_gates(tmp_path):
    """`nmf_prior_match_sources`: both gates' source weights start at zero, so a v8-style model gains them
    unchanged; once weighted, the mix's own match moves both gates, and the matches are required. The engine's
    prior gives the mix's match as 1 where the mix is one of the query's frames."""
    from stemquery.model.bsmamba import Prior
    from stemquery.model.engines.bsmamba import nmf_prior
    from stemquery.model.engines.nmf import channel_magnitude

    base = dict(nmf_prior_iterations=5, nmf_prior_confidence=True, nmf_prior_exemplars=8, nmf_prior_match=True)
    old, new, mix, query = upgraded_from_shipped(tmp_path, **base, nmf_prior_match_sources=True, base=base)
    frames = mix.shape[3]
    shares = torch.rand(1, 2, mix.shape[2], frames, generator=torch.Generator().manual_seed(1))
    match = torch.full((1, frames), 0.95)
    alike, unlike = torch.full((1, 2, frames), 0.99), torch.full((1, 2, frames), 0.6)
    with torch.no_grad():
        before = old(mix, old.embed_queries([query]), prior=Prior(shares, match))
        torch.testing.assert_close(new(mix, new.embed_queries([query]), prior=Prior(shares, match, alike)), before)
        with pytest.raises(ValueError, match="mix's frame match"):
            new(mix, new.embed_queries([query]), prior=Prior(shares, match))
        outputs = []
        for module in (new.prior, new.exemplar_prior):
            module.source_weight.zero_()
            module.source_weight[:, 4:].fill_(-1.0)  # the mix's match, per frame and over the case
        for sources in (alike, unlike):
            gates = [module.gate(torch.ones_like(mix), shares[:, i], torch.zeros(1, len(new.bands), frames, 16),
                                 mix.abs().pow(2).mean(dim=1), match, torch.cat([match[:, None], sources], 1))
                     for i, module in enumerate((new.prior, new.exemplar_prior))]
            outputs.append([float(g.mean()) for g in gates])
        assert all(shut < open_ - 0.3 for shut, open_ in zip(*outputs))  # a mix like the query shuts both
    with pytest.raises(ValueError, match="needs the exemplar match"):
        BSMambaConfig(**TINY, **{**base, "nmf_prior_match": False}, nmf_prior_match_sources=True)
    prior = nmf_prior(new.config)
    magnitude = channel_magnitude(mix[0])
    itself = prior.prior(magnitude, prior.bases([magnitude]))
    other = prior.prior(magnitude, prior.bases([channel_magnitude(query[0])]))
    assert itself.sources.shape == (2, frames)
    assert float(itself.sources[1].max()) > 0.999 > float(other.sources[1].max())  # the mix's frames are exemplars


def test_exemplars_are_the_clips_loud_frames_and_match_the_very_sound(two_sources):
    """`QueryNMF.exemplars`: `count` columns, each summing to 1, drawn from loud frames only (a silent stretch gives
    none), a batch the same as one clip at a time. Given the clean target itself as the query, the exemplars'
    Wiener share separates it better than bases learned from it (the reason the separator reads both)."""
    from stemquery.model.engines.nmf import NMFConfig, QueryNMF, channel_magnitude

    mix, target, _ = two_sources
    stft = STFT(2048, 1024)
    target_mag = channel_magnitude(stft.forward(torch.from_numpy(target).float()))
    silent = torch.cat([torch.zeros_like(target_mag), target_mag], dim=-1)
    bases = QueryNMF.exemplars(silent, 16)
    assert bases.shape == (1025, 16)
    torch.testing.assert_close(bases.sum(dim=0), torch.ones(16))
    frames = target_mag / target_mag.sum(dim=0, keepdim=True)
    assert all(torch.isclose(frames, column[:, None], atol=1e-6).all(dim=0).any() for column in bases.T)
    batch = QueryNMF.exemplars(torch.stack([silent, silent.flip(-1)]), 16)
    torch.testing.assert_close(batch[1], QueryNMF.exemplars(silent.flip(-1), 16))

    nmf = QueryNMF(NMFConfig(n_fft=2048, hop=1024, query_iterations=30, mix_iterations=60))
    mix_spec = stft.forward(torch.from_numpy(mix).float())
    mix_mag = channel_magnitude(mix_spec)
    scores = {}
    for name, kind in (("learned", nmf.bases([target_mag])), ("exemplars", QueryNMF.exemplars(target_mag, 64))):
        estimate = stft.inverse(mix_spec * nmf.target_share(mix_mag, kind), mix.shape[-1]).numpy()
        scores[name] = si_sdr(estimate, target)
    assert scores["exemplars"] > scores["learned"] + 1.0, scores


def test_nmf_prior_gate_learns_to_trust_a_good_prior(two_sources):
    """Given a prior that is right (the target's ideal ratio mask), training opens the gate towards it: the
    output beats the starting average by more than 3 dB."""
    torch.manual_seed(0)
    mix, target, query = (torch.from_numpy(np.repeat(x[:, :RATE], 2, axis=0))[None] for x in two_sources)
    config = BSMambaConfig(**TINY, nmf_prior_iterations=5)
    model, stft = BSMamba(config), STFT(config.n_fft, config.hop)
    mix_spec, query_spec = stft.forward(mix), stft.forward(query)
    ideal = (stft.forward(target).abs() / (mix_spec.abs() + 1e-8)).clamp(max=1).mean(dim=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def gain() -> float:
        with torch.no_grad():
            estimate = stft.inverse(model(mix_spec, model.embed_queries([query_spec]), prior=ideal), RATE)
        return si_sdr(estimate[0].numpy(), target[0].numpy()) - si_sdr(mix[0].numpy(), target[0].numpy())

    start = gain()
    for _ in range(40):
        loss = separation_loss(model(mix_spec, model.embed_queries([query_spec]), prior=ideal), target, mix, stft)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert gain() > start + 3.0, (start, gain())


def test_nmf_prior_confidence_tells_a_right_prior_from_a_wrong_one(two_sources):
    """Per case, from how the NMF share and the network's mask compare: one mix, one query, one network, and two
    priors, the target's ideal mask (right) and a faint copy of the other source's (the query's bases explained
    next to nothing, and the wrong thing). With only the confidence trained, the gate opens fully for the right one
    and stays well under it for the wrong one. The per-frame gate alone cannot: it reads the same features in both
    cases but for the prior's projection, which starts at zero."""
    torch.manual_seed(0)
    mix, target, query = (torch.from_numpy(np.repeat(x[:, :RATE], 2, axis=0))[None] for x in two_sources)
    config = BSMambaConfig(**TINY, nmf_prior_iterations=5, nmf_prior_confidence=True)
    model, stft = BSMamba(config), STFT(config.n_fft, config.hop)
    mix_spec, query_spec = stft.forward(mix).expand(2, -1, -1, -1), stft.forward(query).expand(2, -1, -1, -1)
    ideal = (stft.forward(target).abs() / (mix_spec[:1].abs() + 1e-8)).clamp(max=1).mean(dim=1)
    priors = torch.cat([ideal, 0.05 * (1 - ideal)])
    gates = []
    gate = model.prior.gate

    def recording_gate(*args):
        gates.append(gate(*args))
        return gates[-1]

    model.prior.gate = recording_gate
    optimizer = torch.optim.Adam([*model.prior.confidence.parameters(), model.prior.band_embedding], lr=1e-2)
    for _ in range(120):
        loss = separation_loss(model(mix_spec, model.embed_queries([query_spec]), prior=priors),
                               target.expand(2, -1, -1), mix.expand(2, -1, -1), stft)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gates.clear()
    with torch.no_grad():
        model(mix_spec, model.embed_queries([query_spec]), prior=priors)
    right, wrong = gates[0].mean(dim=(1, 2)).tolist()
    assert right > 0.95 and wrong < right - 0.2, (right, wrong)


def test_query_condition_tells_timbres_apart_and_ignores_gain():
    """At initialisation already: the embeddings of two timbres differ, the long-term spectra of two clips of one
    timbre are closer than of two timbres, and a clip's gain changes neither (a first design's embeddings were
    99.6 % alike whatever the query). The shipped default size: that flaw showed there, not in tiny models."""
    torch.manual_seed(0)
    config = BSMambaConfig()
    model, stft = BSMamba(config), STFT(config.n_fft, config.hop)
    rng = np.random.default_rng(0)
    clips = [tone_sequence(rng.integers(50, 70, 8), 0.4, harmonics=h) for h in ("saw", "saw", "hollow")]

    def condition(audio):
        return model.embed_queries([stft.forward(torch.from_numpy(np.stack([audio] * 2))[None])])

    saw, saw_again, hollow = (condition(c) for c in clips)
    assert float((saw.embedding - hollow.embedding).norm() / saw.embedding.norm()) > 0.1
    distance = lambda a, b: float((a.profile - b.profile).abs().mean())  # noqa: E731
    assert distance(saw, saw_again) < 0.75 * distance(saw, hollow)  # 0.20 vs 0.37 here
    quiet = condition(0.05 * clips[0])
    torch.testing.assert_close(quiet.embedding, saw.embedding, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(quiet.profile, saw.profile, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["embedding", "matching"])
def test_the_query_selects_the_source(two_sources, path):
    """One mix, two queries, two targets: a model that ignored its query could not improve both. `matching`: the
    query reaches the model through the matching path alone (its pooled embedding and long-term spectrum zeroed)."""
    torch.manual_seed(0)
    mix, low, low_query = (x[:, :RATE] for x in two_sources)
    high = mix - low
    high_query = tone_sequence(np.random.default_rng(3).integers(65, 80, 3), 0.4, harmonics="hollow")[None]
    stereo = lambda x: torch.from_numpy(np.repeat(x, 2, axis=0))  # noqa: E731
    mixes = torch.stack([stereo(mix)] * 2)
    targets = torch.stack([stereo(low), stereo(high)])
    queries = torch.stack([stereo(low_query[:, :RATE]), stereo(high_query[:, :RATE])])
    config = BSMambaConfig(**{**TINY, "dim": 32, "match_heads": 2 if path == "matching" else 0})
    model, stft = BSMamba(config), STFT(config.n_fft, config.hop)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def condition():
        full = model.embed_queries([stft.forward(queries)])
        if path == "embedding":
            return full
        return full._replace(embedding=torch.zeros_like(full.embedding), profile=torch.zeros_like(full.profile))

    for _ in range(80):
        estimate = model(stft.forward(mixes), condition())
        loss = separation_loss(estimate, targets, mixes, stft)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        estimate = model(stft.forward(mixes), condition())
        audio = stft.inverse(estimate, RATE).numpy()
    for index in range(2):
        gain = si_sdr(audio[index], targets[index].numpy()) - si_sdr(mixes[index].numpy(), targets[index].numpy())
        assert gain > 3.0, (index, gain)
    # the same mix with the two queries gives two different outputs, far apart
    assert si_sdr(audio[0], audio[1]) < 0.0


def test_tiny_model_overfits_one_example(two_sources):
    torch.manual_seed(0)
    mix, target, query = (torch.from_numpy(np.repeat(x[:, :RATE], 2, axis=0))[None] for x in two_sources)
    config = BSMambaConfig(**{**TINY, "dim": 32})
    model, stft = BSMamba(config), STFT(config.n_fft, config.hop)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_now():
        estimate = model(stft.forward(mix), model.embed_queries([stft.forward(query)]))
        return separation_loss(estimate, target, mix, stft)

    with torch.no_grad():
        first = float(loss_now())
    for _ in range(60):
        optimizer.zero_grad()
        loss = loss_now()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = float(loss_now())
    # −SI-SDR + 0.5 × −SNR, dB: at least 10 dB better after 60 steps on one example
    assert last < first - 10.0, (first, last)


def test_snr_level_term_is_lowest_at_the_least_squares_gain():
    """Over a global gain on a noisy estimate the loss is lowest at the least-squares gain <e,t>/<e,e>: the
    level term, not −SI-SDR (blind to level), decides it, and it decides it as SNR measures it."""
    stft = STFT(1024, 256)
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 2, RATE, generator=generator)
    mixture = target + torch.randn(2, 2, RATE, generator=generator)
    noisy = target + 0.7 * torch.randn(2, 2, RATE, generator=generator)
    least_squares = float((noisy * target).sum() / noisy.pow(2).sum())  # ≈ 1 / (1 + 0.49)
    gains = torch.linspace(0.4, 1.2, 81)
    losses = [float(separation_loss(stft.forward(gain * noisy), target, mixture, stft, "snr")) for gain in gains]
    assert abs(float(gains[int(np.argmin(losses))]) - least_squares) <= 0.011, (losses, least_squares)
    assert max(losses) - min(losses) > 0.5  # the level matters to it


@pytest.fixture()
def tiny_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = BSMamba(BSMambaConfig(**TINY))
    path = tmp_path / engine_module.WEIGHTS_NAME
    save_weights(model, path, extra={"note": "untrained, for tests"})
    monkeypatch.setattr(engine_module, "WEIGHTS_DIR", tmp_path)
    return model, path


def test_weights_round_trip_gives_identical_outputs(tiny_weights):
    model, path = tiny_weights
    loaded = load_model(path)
    stft = STFT(model.config.n_fft, model.config.hop)
    mix, query = stft.forward(torch.randn(1, 2, 20000)), stft.forward(torch.randn(1, 2, 9000))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(mix, loaded.embed_queries([query])),
                                   model(mix, model.embed_queries([query])), rtol=1e-5, atol=1e-6)


def test_slice_parallel_inference_equals_the_whole_batch(tiny_weights):
    """The engine's CPU path runs the sequence layers slice by slice on worker threads: same result."""
    model, _ = tiny_weights
    stft = STFT(model.config.n_fft, model.config.hop)
    mix, query = stft.forward(torch.randn(1, 2, 40000)), stft.forward(torch.randn(1, 2, 9000))
    parallel = SliceParallel(2, rows=32)  # slices of 1 band along time, 4 frames along the bands
    model.eval()
    try:
        with torch.inference_mode():
            condition = model.embed_queries([query])
            torch.testing.assert_close(model(mix, condition, parallel=parallel), model(mix, condition),
                                       rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="inference"):
            model(mix, model.embed_queries([query]), parallel=parallel)
    finally:
        parallel.close()


def test_engine_through_api_keeps_shape_and_sums(tiny_weights, two_sources):
    mix, _, query = two_sources
    separator = Separator("bsmamba", device="cpu")
    for audio in (mix[:, :30001], np.concatenate([mix, mix])[:, :30001]):
        stems = separator.separate(audio, RATE, [query])
        assert stems.target.shape == audio.shape
        np.testing.assert_allclose(stems.target + stems.residual, audio, atol=1e-6)


@pytest.mark.parametrize("exemplars", [0, 16])
def test_engine_with_nmf_prior_one_and_several_stems(tmp_path, monkeypatch, two_sources, exemplars):
    """A model with the NMF prior (and the exemplar share) through the API: the prior's bases come with the
    query, the stems and the residual sum to the mix, and the same request gives the same sound twice."""
    torch.manual_seed(0)
    save_weights(BSMamba(BSMambaConfig(**TINY, nmf_prior_iterations=5, nmf_prior_confidence=True,
                                       nmf_prior_exemplars=exemplars)),
                 tmp_path / engine_module.WEIGHTS_NAME)
    monkeypatch.setattr(engine_module, "WEIGHTS_DIR", tmp_path)
    mix, _, query = two_sources
    mix = mix[:, :30001]
    separator = Separator("bsmamba", device="cpu")
    one = separator.separate(mix, RATE, [query])
    np.testing.assert_allclose(one.target + one.residual, mix, atol=1e-6)
    np.testing.assert_array_equal(separator.separate(mix, RATE, [query]).target, one.target)
    stems = separator.separate_stems(mix, RATE, {"low": [query], "high": [query[:, ::-1].copy()]})
    np.testing.assert_allclose(stems["low"] + stems["high"] + stems["residual"], mix, atol=1e-5)
    assert not np.allclose(stems["low"], stems["high"])


def test_engine_reports_progress_within_a_segment(tmp_path, monkeypatch, two_sources):
    """One 20 s segment is one call of the network: its blocks report as they finish, so progress moves in steps
    of at most a quarter of the separation (four blocks, then the mask and the inverse STFT), not from the query
    straight to the end."""
    save_weights(BSMamba(BSMambaConfig(**{**TINY, "layers": 4, "match_heads": 2})),
                 tmp_path / engine_module.WEIGHTS_NAME)
    monkeypatch.setattr(engine_module, "WEIGHTS_DIR", tmp_path)
    mix, _, query = two_sources
    seen = []
    Separator("bsmamba", device="cpu").separate(mix, RATE, [query], progress=lambda f, stage: seen.append(f))
    separating = [f for f in seen if 0.1 <= f <= 1.0]
    assert len(separating) >= 6 and seen == sorted(seen) and seen[-1] == 1.0
    assert max(np.diff(separating)) <= 0.25


def test_engine_through_cli(tiny_weights, write_audio, two_sources, tmp_path):
    mix, _, query = two_sources
    result = CliRunner().invoke(main, ["separate", str(write_audio("m.wav", mix)), "-q",
                                       str(write_audio("q.wav", query)), "--engine", "bsmamba",
                                       "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    out, rate = sf.read(tmp_path / "o" / "m_(target)_bsmamba.wav", always_2d=True)
    assert rate == RATE and out.shape == (mix.shape[1], 1)


def test_missing_weights_is_a_clear_error(tmp_path, monkeypatch, write_audio, two_sources):
    monkeypatch.setattr(engine_module, "WEIGHTS_DIR", tmp_path / "none")
    mix, _, query = two_sources
    result = CliRunner().invoke(main, ["separate", str(write_audio("m.wav", mix)), "-q",
                                       str(write_audio("q.wav", query)), "--engine", "bsmamba"])
    assert result.exit_code != 0 and "weights" in result.output and "--engine nmf" in result.output
