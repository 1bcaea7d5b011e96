"""The timbre universe: procedural voices, production chains, the render's timbre lists per split, and the query
protocols that teach matching (cross_source, overlap), hard negatives and target-dominant mixtures."""
from pathlib import Path

import numpy as np
import pytest

from stemquery.model.data.dataset import ACTIVITY_HOP_S, Stem, Track, TripleSampler, _activity
from stemquery.model.data.procedural import PROCEDURAL_TIMBRES, ProceduralSynth
from stemquery.model.data.production import apply_chain, draw_chain
from stemquery.model.data.render import (EXTRA_KITS, PROCEDURAL, PROCEDURAL_FM, RESERVED_HYDROGEN, SOUNDFONTS,
                                         UNSEEN_HYDROGEN, RenderConfig, _own_kits, plan_tracks)
from stemquery.model.data.synth import Note, Part

RATE = 22050
MELODY = [Note(0.1 + 0.5 * i, 0.5 + 0.5 * i, 60 + (i * 5) % 12, 100) for i in range(6)]
DRUMS = [Note(0.1 + 0.25 * i, 0.2 + 0.25 * i, pitch, 100) for i, pitch in enumerate([36, 42, 38, 42, 36, 46, 38, 49])]


@pytest.mark.parametrize("name,part", [("procedural", Part("lead", 81, MELODY)),
                                       ("procedural", Part("bass", 33, [Note(n.start, n.end, n.pitch - 24, 90)
                                                                        for n in MELODY])),
                                       ("procedural", Part("kit", 0, DRUMS, is_drum=True)),
                                       ("procedural-fm", Part("keys", 4, MELODY))])
def test_procedural_voice_renders_deterministically_and_only_where_it_plays(name, part):
    synth = ProceduralSynth(name, sample_rate=RATE)
    samples = 6 * RATE
    first, again = synth.render(part, samples, seed=7), synth.render(part, samples, seed=7)
    other = synth.render(part, samples, seed=8)
    assert first.shape == (2, samples) and first.dtype == np.float32 and np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)  # a seed is a voice
    assert np.abs(first - other).max() > 0.01  # another seed, another voice
    assert synth.voice_name(part, 7) != synth.voice_name(part, 8)
    assert np.abs(first[:, : int(0.1 * RATE)]).max() == 0.0  # silent before the first note
    assert np.abs(first[:, int(0.5 * RATE): int(2.5 * RATE)]).max() > 0.01
    assert np.abs(first[:, -RATE // 4:]).max() < 1e-3  # the last note has died away by 5.75 s


def test_training_and_unseen_procedural_voices_never_share_a_kind():
    train_kinds, unseen_kinds = PROCEDURAL_TIMBRES["procedural"][0], PROCEDURAL_TIMBRES["procedural-fm"][0]
    assert not set(train_kinds) & set(unseen_kinds)
    synth = ProceduralSynth("procedural", sample_rate=RATE)
    kinds = {synth.voice_name(Part("p", program, MELODY), seed).split(":")[1]
             for program in range(0, 96, 4) for seed in range(4)}
    assert kinds == set(train_kinds)
    with pytest.raises(ValueError, match="not a procedural timbre"):
        ProceduralSynth("procedural-xyz")


def test_production_chain_is_deterministic_keeps_length_and_level():
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal((2, RATE)) * 0.1).astype(np.float32)
    chains = [draw_chain(np.random.default_rng(seed), "guitar") for seed in range(40)]
    assert sum(1 for c in chains if not c) >= 5 and sum(1 for c in chains if c) >= 20  # some stems stay dry
    assert any(effect == "distortion" for chain in chains for effect, _ in chain)
    chain = next(c for c in chains if len(c) >= 3)
    assert draw_chain(np.random.default_rng(chains.index(chain)), "guitar") == chain
    out, again = apply_chain(audio, chain, RATE), apply_chain(audio, chain, RATE)
    np.testing.assert_array_equal(out, again)
    assert out.shape == audio.shape and np.abs(out - audio).max() > 0.01
    assert np.sqrt(np.mean(out**2)) == pytest.approx(np.sqrt(np.mean(audio**2)), rel=1e-3)
    assert apply_chain(audio, [], RATE) is audio


def test_no_reserved_or_unseen_timbre_reaches_a_training_render(tmp_path):
    """Every planned training track, melodic timbre and drum kit alike, comes from the training lists only."""
    midi = tmp_path / "midi"
    midi.mkdir()
    from test_data import write_midi  # a tiny training-split "work"

    write_midi(midi / "testworks__a.mxl.mid", [[(i * 0.5, i * 0.5 + 0.4, 60 + i) for i in range(60)]])
    plans = plan_tracks(RenderConfig(out=tmp_path / "r", timbres="train", hours=1.0, midi_cache=midi,
                                     mma_share=0.0))
    used = {plan.soundfont for plan in plans} | {str(plan.kit[0]) for plan in plans}
    forbidden = ["TimGM6mb", "sf_GMbank", "OPL-3", "procedural-fm", *RESERVED_HYDROGEN, *UNSEEN_HYDROGEN]
    assert not [name for name in forbidden if any(name in timbre for timbre in used)]
    assert str(PROCEDURAL) in used and any("FluidR3_GM" in t for t in used)  # the universe is drawn from
    for split in ("val", "test"):
        assert not {str(p) for p in SOUNDFONTS["train"]} & {str(p) for p in SOUNDFONTS["val_unseen"] +
                                                             SOUNDFONTS["test"]}
    unseen_kits = {Path(k[0]).parent.name for k in EXTRA_KITS["val_unseen"]}
    assert unseen_kits == set(UNSEEN_HYDROGEN) and str(PROCEDURAL_FM) in map(str, SOUNDFONTS["val_unseen"])
    assert _own_kits(str(PROCEDURAL_FM)) == []  # the FM voices bring no drums


def stem(track: str, name: str, program: int, family: str, timbre: str, seconds: float, seed: int,
         is_drum: bool = False) -> Stem:
    audio = (np.random.default_rng(seed).standard_normal((2, int(seconds * RATE))) * 2000).astype(np.int16)
    active, energy = _activity(audio, int(ACTIVITY_HOP_S * RATE))
    return Stem(track, name, program, family, is_drum, timbre, audio, active, energy, np.zeros((0, 4)))


def universe() -> list[Track]:
    """Four tracks: program 0 (piano) from two SoundFonts and a procedural voice, strings, drums on two kits."""
    tracks = []
    plan = [("a", "bank1.sf2", "hydrogen:KitA"), ("b", "bank1.sf2", "hydrogen:KitB"),
            ("c", "bank2.sf2", "bank2.sf2:128:0"), ("d", "procedural:additive:5", "procedural:drums:6")]
    for index, (name, piano, kit) in enumerate(plan):
        stems = [stem(name, "piano", 0, "piano", piano, 8.0, 10 * index),
                 stem(name, "strings", 48 + index, "ensemble", "bank1.sf2", 8.0, 10 * index + 1),
                 stem(name, "drums", 0, "drums", kit, 8.0, 10 * index + 2, is_drum=True)]
        tracks.append(Track(name, stems, stems[0].audio.shape[1]))
    return tracks


def test_cross_source_query_never_comes_from_the_target_source():
    tracks = universe()
    sampler = TripleSampler(tracks, sample_rate=RATE, segment_s=2.0, query_s=1.0, absent_target_p=0.0,
                            protocols=("cross_source",))
    rng = np.random.default_rng(0)
    by_name = {(s.track, s.name): s for t in tracks for s in t.stems}
    seen = set()
    for _ in range(60):
        triple = sampler.draw(rng)
        info = triple.info
        target = next(s for s in tracks if s.name == info["track"]).stems
        target = next(s for s in target if s.name == info["target"])
        query = by_name[(info["query_track"], info["query_part"])]
        assert query.timbre == info["query_timbre"]
        assert query.source != target.source and query.track != target.track
        assert query.is_drum == target.is_drum and (query.program == target.program or query.family == target.family)
        seen.add((target.source, query.source))
    assert ("bank1.sf2", "procedural:additive:5") in seen or ("procedural:additive:5", "bank1.sf2") in seen
    assert {s.source for s in tracks[0].stems} == {"bank1.sf2", "hydrogen:KitA"}  # a kit is a source of its own


def test_overlap_query_is_the_target_itself_around_the_segment():
    tracks = universe()
    sampler = TripleSampler(tracks, sample_rate=RATE, segment_s=2.0, query_s=2.0, absent_target_p=0.0,
                            random_gains=False, protocols=("overlap",))
    rng = np.random.default_rng(1)
    for _ in range(10):
        triple = sampler.draw(rng)
        target = next(s for t in tracks for s in t.stems
                      if s.track == triple.info["track"] and s.name == triple.info["target"])
        start = int(round(triple.info["start_s"] * RATE))
        full = np.asarray(target.audio, np.float32)
        # find the query in the stem: it starts within a query length of the segment and shares >= half of it
        query = triple.query / (np.abs(triple.query).max() + 1e-9)
        offsets = range(max(0, start - 2 * RATE), start + 2 * RATE)
        where = max(offsets, key=lambda o: float(np.dot(full[0, o: o + 200], query[0, :200])))
        assert abs(where - start) <= RATE  # at least half of the 2 s query lies in the 2 s segment


def test_hard_negatives_and_dominant_targets():
    tracks = universe()
    rng = np.random.default_rng(2)
    negatives = TripleSampler(tracks, sample_rate=RATE, segment_s=2.0, query_s=1.0, absent_target_p=0.0,
                              protocols=("same_stem",), family_negative_p=1.0)
    sources = [negatives.draw(rng).info["sources"] for _ in range(20)]
    plain = TripleSampler(tracks, sample_rate=RATE, segment_s=2.0, query_s=1.0, absent_target_p=0.0,
                          protocols=("same_stem",))
    baseline = [plain.draw(np.random.default_rng(2)).info["sources"] for _ in range(20)]
    assert np.mean(sources) > np.mean(baseline)  # an extra stem of the target's family joins
    dominant = TripleSampler(tracks, sample_rate=RATE, segment_s=2.0, query_s=1.0, absent_target_p=0.0,
                             protocols=("same_stem",), dominant_p=1.0, random_gains=False)
    for _ in range(10):
        triple = dominant.draw(rng)
        rest = triple.mixture - triple.target
        ratio_db = 10 * np.log10(np.mean(triple.target**2) / np.mean(rest**2))
        assert 5.0 - 1e-3 <= ratio_db <= 15.0 + 1e-3
