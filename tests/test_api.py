import numpy as np
import pytest

from conftest import RATE, si_sdr
from stemquery.model import QueryError, Separator
from stemquery.model.engines.nmf import NMFEngine


@pytest.fixture(scope="module")
def nmf():
    return Separator("nmf", device="cpu")


def test_nmf_improves_si_sdr_on_two_timbres(nmf, two_sources):
    mix, target, query = two_sources
    stems = nmf.separate(mix, RATE, [query])
    improvement = si_sdr(stems.target, target) - si_sdr(mix, target)
    assert improvement > 6.0, improvement


def test_stems_sum_to_the_mix_and_keep_its_shape(nmf, two_sources):
    mix, _, query = two_sources
    stereo = np.concatenate([mix, 0.5 * mix])[:, : RATE * 3 + 11]
    stems = nmf.separate(stereo, RATE, [np.concatenate([query, query])])
    assert stems.target.shape == stereo.shape == stems.residual.shape
    np.testing.assert_allclose(stems.target + stems.residual, stereo, atol=1e-6)


def test_other_sample_rates_come_back_at_that_rate_and_length(nmf, two_sources):
    from stemquery.model.audio import resample

    mix, target, query = (resample(x, RATE, 48000) for x in two_sources)
    mix = mix[:, :-5]
    stems = nmf.separate(mix, 48000, [(query, 48000)])
    assert stems.target.shape == mix.shape and stems.sample_rate == 48000
    assert si_sdr(stems.target, target[:, :-5]) - si_sdr(mix, target[:, :-5]) > 6.0


def test_query_range_of_the_mix_serves_as_query(nmf, two_sources):
    mix, target, _ = two_sources
    stems = nmf.separate(mix, RATE, [], query_ranges=[(0.0, 3.0)])
    assert stems.target.shape == mix.shape
    assert np.abs(stems.target).max() > 0


def test_progress_is_monotone_and_ends_at_one(nmf, two_sources):
    mix, _, query = two_sources
    seen = []
    nmf.separate(mix, RATE, [query], progress=lambda fraction, stage: seen.append((fraction, stage)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and seen[-1][1] == "done"
    assert {"query", "separating"} <= {stage for _, stage in seen}
    assert max(b - a for a, b in zip(fractions, fractions[1:])) <= 0.05  # reported every few percent


def test_raising_in_progress_aborts(nmf, two_sources):
    mix, _, query = two_sources

    def stop(fraction, stage):
        if stage == "separating":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        nmf.separate(mix, RATE, [query], progress=stop)


def test_long_input_is_chunked_with_overlap_add(two_sources, monkeypatch):
    """A segment much shorter than the mix gives nearly the same result as one pass."""
    mix, target, query = two_sources
    whole = Separator("nmf", device="cpu").separate(mix, RATE, [query]).target
    monkeypatch.setattr(NMFEngine, "segment_seconds", 2.0)
    chunked_separator = Separator("nmf", device="cpu")
    calls = []
    original = chunked_separator.engine.separate_segment
    chunked_separator.engine.separate_segment = lambda seg, q, p: calls.append(seg.shape[-1]) or original(seg, q, p)
    chunked = chunked_separator.separate(mix, RATE, [query]).target
    assert len(calls) >= mix.shape[1] // (2 * RATE) and max(calls) <= 2 * RATE
    assert chunked.shape == mix.shape
    assert si_sdr(chunked, target) > si_sdr(whole, target) - 3.0


@pytest.mark.parametrize("make_query, message", [
    (lambda q: np.zeros_like(q), "silent"),
    (lambda q: q[:, : RATE // 4], "0.25 s long; give at least 0.5 s"),
    (lambda q: q * np.nan, "NaN or infinite"),
])
def test_bad_queries_are_refused(nmf, two_sources, make_query, message):
    mix, _, query = two_sources
    with pytest.raises(QueryError if "NaN" not in message else Exception, match=message):
        nmf.separate(mix, RATE, [make_query(query)])


def test_query_range_outside_the_mix_is_refused(nmf, two_sources):
    mix, _, _ = two_sources
    with pytest.raises(QueryError, match="outside the mix"):
        nmf.separate(mix, RATE, [], query_ranges=[(5.0, 500.0)])


def test_no_query_at_all_is_refused(nmf, two_sources):
    with pytest.raises(QueryError, match="no query given"):
        nmf.separate(two_sources[0], RATE, [])


def test_query_at_another_rate_is_refused(nmf, two_sources):
    mix, _, query = two_sources
    with pytest.raises(QueryError, match="48000 Hz but the mix is at 44100 Hz; resample"):
        nmf.separate(mix, RATE, [(query, 48000)])
