"""Several stems in one pass (`Separator.separate_stems`): one stem is exactly `separate`, stems and residual sum to
the mix, shares of one time-frequency point sum to at most 1, named stems use the bundled examples."""
import numpy as np
import pytest
import torch

from conftest import RATE, si_sdr, tone_sequence
from stemquery.model import QueryError, Separator, StemQuery
from stemquery.model.bsmamba import BSMamba, BSMambaConfig
from stemquery.model.engines import bsmamba as engine_module
from stemquery.model.engines.base import mix_shares
from stemquery.model.engines.bsmamba import BSMambaEngine, save_weights
from stemquery.model.engines.nmf import NMFConfig, NMFEngine
from stemquery.model.instruments import example_clips

TINY = dict(dim=16, layers=1, bands=8, d_state=8, headdim=16, query_dim=16, chunk=16)


@pytest.fixture(scope="module")
def nmf():
    """Fewer iterations than the engine's default: enough on these clean tones, and fast."""
    return Separator("nmf", device="cpu", config=NMFConfig(query_iterations=60, mix_iterations=60))


@pytest.fixture()
def tiny_bsmamba(tmp_path, monkeypatch):
    torch.manual_seed(0)
    save_weights(BSMamba(BSMambaConfig(**TINY)), tmp_path / engine_module.WEIGHTS_NAME)
    monkeypatch.setattr(engine_module, "WEIGHTS_DIR", tmp_path)
    return Separator("bsmamba", device="cpu")


@pytest.fixture(scope="module")
def three_sources():
    """(mix, [saw line, hollow line], [their queries]): two sources of different timbres, mono, 3 s; each query
    plays its source's notes backwards, shorter and quieter (a part of the song where the sound is exposed)."""
    rng = np.random.default_rng(3)
    low_pitches, high_pitches = rng.integers(40, 55, 6), rng.integers(65, 80, 8)
    low = tone_sequence(low_pitches, 0.5, harmonics="saw")
    high = tone_sequence(high_pitches, 0.375, harmonics="hollow")
    length = min(len(low), len(high))
    queries = [0.5 * tone_sequence(low_pitches[::-1], 0.3, harmonics="saw")[None],
               0.5 * tone_sequence(high_pitches[::-1], 0.3, harmonics="hollow")[None]]
    return (low[:length] + high[:length])[None], [low[None, :length], high[None, :length]], queries


def test_mix_shares_clip_and_scale_in_proportion():
    mix = torch.tensor([1.0, 2.0, 0.0, 4.0])
    estimates = torch.tensor([[0.5, 3.0, 1.0, 3.0],
                              [0.25, 1.0, 1.0, 3.0]])
    shares = mix_shares(estimates, mix)
    expected = torch.tensor([[0.5, 1 / 1.5, 0.5, 0.5],  # point 2: 1 and 0.5 scaled to sum to 1; point 4: 0.75 each
                             [0.25, 0.5 / 1.5, 0.5, 0.5]])
    torch.testing.assert_close(shares, expected)
    assert float(shares.sum(dim=0).max()) <= 1.0 + 1e-7


@pytest.mark.parametrize("segment_seconds", [None, 1.5])
def test_one_stem_is_exactly_separate(nmf, three_sources, monkeypatch, segment_seconds):
    mix, _, (query, _) = three_sources
    if segment_seconds:  # the overlap-add path too
        monkeypatch.setattr(nmf.engine, "segment_seconds", segment_seconds)
    one = nmf.separate(mix, RATE, [query], query_ranges=[(0.0, 1.0)])
    stems = nmf.separate_stems(mix, RATE, {"guitar": StemQuery([query], [(0.0, 1.0)])})
    assert list(stems) == ["guitar", "residual"]
    np.testing.assert_array_equal(stems["guitar"], one.target)
    np.testing.assert_array_equal(stems["residual"], one.residual)


def test_one_stem_is_exactly_separate_with_bsmamba(tiny_bsmamba, three_sources):
    mix, _, (query, _) = three_sources
    stereo = np.concatenate([mix, 0.5 * mix])[:, :50001]
    one = tiny_bsmamba.separate(stereo, RATE, [query])
    stems = tiny_bsmamba.separate_stems(stereo, RATE, {"target": [query]})
    np.testing.assert_array_equal(stems["target"], one.target)
    np.testing.assert_array_equal(stems["residual"], one.residual)


def test_two_stems_sum_to_the_mix_and_each_finds_its_source(nmf, three_sources):
    mix, sources, queries = three_sources
    stems = nmf.separate_stems(mix, RATE, {"low": [queries[0]], "high": [queries[1]]})
    assert list(stems) == ["low", "high", "residual"] and all(s.shape == mix.shape for s in stems.values())
    np.testing.assert_allclose(stems["low"] + stems["high"] + stems["residual"], mix, atol=1e-6)
    for name, source in zip(("low", "high"), sources):
        assert si_sdr(stems[name], source) - si_sdr(mix, source) > 12.0, name
    single = nmf.separate(mix, RATE, [queries[0]]).target
    assert si_sdr(stems["low"], sources[0]) > si_sdr(single, sources[0]) - 0.5


@pytest.mark.parametrize("engine", ["nmf", "bsmamba"])
def test_the_same_sound_asked_twice_is_not_counted_twice(engine, nmf, tiny_bsmamba, three_sources):
    """Two stems with one query each claim the same sound: they share it, and together hold no more than the mix."""
    separator = nmf if engine == "nmf" else tiny_bsmamba
    mix, _, queries = three_sources
    stems = separator.separate_stems(mix, RATE, {"a": [queries[0]], "b": [queries[0]]})
    together = stems["a"] + stems["b"]
    np.testing.assert_allclose(together + stems["residual"], mix, atol=1e-6)
    # counted twice, two stems that each took the sound would hold four times its energy
    assert np.sum(together.astype(np.float64) ** 2) <= np.sum(mix.astype(np.float64) ** 2) * (1 + 1e-5)
    if engine == "bsmamba":  # equal estimates: equal halves where they would exceed the mix
        np.testing.assert_array_equal(stems["a"], stems["b"])


def test_shared_work_is_done_once_per_segment(tiny_bsmamba, three_sources, monkeypatch):
    """The mix STFT once per segment whatever the stem count; the network once per stem."""
    mix, _, queries = three_sources
    engine = tiny_bsmamba.engine
    specs, forwards = [], []
    original_spec, original_model = engine._stereo_spec, engine.model.forward
    monkeypatch.setattr(engine, "_stereo_spec", lambda audio: specs.append(audio.shape[-1]) or original_spec(audio))
    monkeypatch.setattr(engine.model, "forward", lambda *a, **k: forwards.append(1) or original_model(*a, **k))
    monkeypatch.setattr(BSMambaEngine, "segment_seconds", 1.0)
    stems = tiny_bsmamba.separate_stems(mix, RATE, {"a": [queries[0]], "b": [queries[1]], "c": [queries[0]]})
    segments = len(forwards) // 3
    assert segments >= 3 and len(forwards) == 3 * segments
    assert len(specs) == segments + 3  # one per segment, plus one per query clip when encoding
    np.testing.assert_allclose(sum(stems.values()), mix, atol=1e-6)


def test_named_stem_uses_the_bundled_examples(nmf, three_sources):
    mix, _, queries = three_sources
    named = nmf.separate_stems(mix, RATE, {"bass": StemQuery(), "high": [queries[1]]})
    given = nmf.separate_stems(mix, RATE, {"bass": example_clips("bass", RATE), "high": [queries[1]]})
    for name in ("bass", "high", "residual"):
        np.testing.assert_array_equal(named[name], given[name])


def test_unknown_name_lists_the_nearest(nmf, three_sources):
    mix, _, queries = three_sources
    with pytest.raises(QueryError, match=r"stem 'basss'.*nearest: bass"):
        nmf.separate_stems(mix, RATE, {"basss": StemQuery(), "high": [queries[1]]})


@pytest.mark.parametrize("stems, message", [
    ({}, "no stem asked for"),
    ({"residual": StemQuery(ranges=[(0.0, 1.0)])}, "may not be called 'residual'"),
    ({"a": StemQuery(ranges=[(0.0, 1.0)]), "b": StemQuery(ranges=[(3.0, 300.0)])},
     "stem 'b': query range 3-300 s is outside the mix"),
])
def test_bad_stem_requests_say_which_stem(nmf, three_sources, stems, message):
    with pytest.raises(QueryError, match=message):
        nmf.separate_stems(three_sources[0], RATE, stems)


def test_progress_and_abort_across_stems(three_sources, monkeypatch):
    mix, _, queries = three_sources
    monkeypatch.setattr(NMFEngine, "segment_seconds", 1.0)
    separator = Separator("nmf", device="cpu", config=NMFConfig(query_iterations=30, mix_iterations=30))
    seen = []
    separator.separate_stems(mix, RATE, {"a": [queries[0]], "b": [queries[1]]},
                             progress=lambda fraction, stage: seen.append((fraction, stage)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and seen[-1][1] == "done"
    assert max(b - a for a, b in zip(fractions, fractions[1:])) <= 0.05

    def stop(fraction, stage):
        if stage == "separating" and fraction > 0.5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        separator.separate_stems(mix, RATE, {"a": [queries[0]], "b": [queries[1]]}, progress=stop)


def _write_case(folder, mixture, query, target, meta):
    import json

    import soundfile as sf

    folder.mkdir(parents=True)
    for name, audio in (("mixture", mixture), ("query", query), ("target", target)):
        sf.write(folder / f"{name}.flac", audio.T, RATE, subtype="PCM_24")
    (folder / "meta.json").write_text(json.dumps(meta))


def test_eval_queries_by_the_cases_instrument_name(tiny_bsmamba, three_sources, tmp_path):
    """`evaluate(query_from="name")`: the engine gets the bundled clips of the case's instrument, nmf its clip."""
    from stemquery.model.evaluate import evaluate, markdown_report, read_case, score

    mix, sources, queries = three_sources
    mix, sources, queries = mix[:, :RATE], [s[:, :RATE] for s in sources], [q[:, :RATE] for q in queries]
    _write_case(tmp_path / "set" / "case_000", mix, queries[0], sources[0],
                {"protocol": "same_stem", "program": 33, "family": "bass"})
    _write_case(tmp_path / "set" / "case_001", mix, queries[1], sources[1],
                {"protocol": "same_stem", "program": 67, "family": "reed"})
    by_clip = evaluate(tmp_path / "set", ["bsmamba"], cache=tmp_path / "cache")
    by_name = evaluate(tmp_path / "set", ["bsmamba"], cache=tmp_path / "cache", query_from="name")
    rows = {(r["engine"], r["case"]): r for r in by_name["rows"]}
    assert [rows["bsmamba", c]["query"] for c in ("case_000", "case_001")] == ["bass", "reeds"]
    for case_name, instrument in (("case_000", "bass"), ("case_001", "reeds")):
        case = read_case(tmp_path / "set" / case_name)
        estimate = tiny_bsmamba.separate_stems(case.mixture, RATE, {instrument: StemQuery()})[instrument]
        assert rows["bsmamba", case_name]["si_sdr"] == pytest.approx(score(estimate, case)["si_sdr"], abs=1e-9)
    clip_rows = {(r["engine"], r["case"]): r for r in by_clip["rows"]}
    assert rows["nmf", "case_000"] == clip_rows["nmf", "case_000"]  # nmf keeps its clip (and its cache)
    assert by_name["fingerprints"]["nmf"] == by_clip["fingerprints"]["nmf"]
    assert by_name["fingerprints"]["bsmamba"] != by_clip["fingerprints"]["bsmamba"]
    assert "the name of each case's instrument" in markdown_report(by_name)
