"""The training-data renderer, the triple sampler, eval sets and the metrics (real fluidsynth, a few seconds)."""
import json
import shutil
from pathlib import Path

import mido
import numpy as np
import pytest
import soundfile as sf

from stemquery.model.data.dataset import (ACTIVITY_HOP_S, TIMBRE_EQ_HZ, Stem, Track, TripleSampler, _activity,
                                          apply_eq, load_corpus)
from stemquery.model.data.hydrogen import DRUMKITS as HYDROGEN, HydrogenKit
from stemquery.model.data.instruments import assign_programs
from stemquery.model.data.synth import Note, Part
from stemquery.model.data.timidity import FREEPATS, TimiditySynth
from stemquery.model.data.render import EXTRA_KITS, SOUNDFONTS, RenderConfig, render_dataset
from stemquery.model.data.splits import held_out, split_of
from stemquery.model.evaluate import build_evalset, evaluate, si_sdr, sdr, snr

FLUID = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
needs_fluidsynth = pytest.mark.skipif(not FLUID.exists() or shutil.which("fluidsynth") is None,
                                      reason="needs Debian's fluidsynth and fluid-soundfont-gm (.ci/run installs them)")


def write_midi(path: Path, voices: list[list[tuple[float, float, int]]], program: int = 0) -> None:
    """A type-1 MIDI file at 120 bpm (480 ticks a beat), one track per voice of (start s, end s, pitch)."""
    midi = mido.MidiFile(type=1, ticks_per_beat=480)
    for channel, notes in enumerate(voices):
        track = mido.MidiTrack([mido.MetaMessage("track_name", name=f"voice{channel}"),
                                mido.Message("program_change", channel=channel, program=program)])
        events = sorted([(s, "note_on", p) for s, _, p in notes] + [(e, "note_off", p) for _, e, p in notes])
        tick = 0
        for time, kind, pitch in events:
            at = int(round(time * 960))
            track.append(mido.Message(kind, channel=channel, note=pitch, velocity=90, time=at - tick))
            tick = at
        midi.tracks.append(track)
    midi.save(path)


@pytest.fixture(scope="module")
def midi_cache(tmp_path_factory):
    """Three tiny 'works' named like music21 corpus files that are in neither held-out list."""
    folder = tmp_path_factory.mktemp("midi")
    melody = [(i * 0.5, i * 0.5 + 0.4, 67 + (i * 5) % 12) for i in range(12)]
    bass = [(i * 1.0, i * 1.0 + 0.9, 40 + (i * 7) % 12) for i in range(3)]  # rests after 2.9 s
    chords = [(i * 1.0, i * 1.0 + 0.8, p) for i in range(6) for p in (55, 59)]
    for name in ("testworks__a.mxl", "testworks__b.mxl", "testworks__c.mxl"):
        assert split_of("music21:" + name.replace("__", "/")) == "train"
        write_midi(folder / f"{name}.mid", [melody, bass, chords])
    return folder


def render(out: Path, midi_cache: Path, *, seed: int = 3, workers: int = 1) -> list[dict]:
    config = RenderConfig(out=out, timbres="train", hours=25 / 3600, seed=seed, workers=workers,
                          midi_cache=midi_cache, mma_share=0.0, soundfonts=(FLUID,))
    return render_dataset(config)


@needs_fluidsynth
def test_render_stems_sum_to_mix_with_metadata(tmp_path, midi_cache):
    metas = render(tmp_path / "r", midi_cache)
    assert metas and sum(m["seconds"] for m in metas) >= 20
    for meta in metas:
        folder = tmp_path / "r" / meta["track"]
        mix, rate = sf.read(folder / "mix.flac", always_2d=True)
        stems = [sf.read(folder / s["file"], always_2d=True)[0] for s in meta["stems"]]
        assert rate == 44100 and sf.info(folder / "mix.flac").subtype == "PCM_16"
        assert np.abs(mix - np.sum(stems, axis=0)).max() <= len(stems) * 2.0**-15 + 1e-9
        assert np.abs(mix).max() < 1.0 and all(np.abs(s).max() < 1.0 for s in stems)
        assert len({s["program"] for s in meta["stems"]}) == len(stems)  # distinct instruments in a mix
        for record in meta["stems"]:
            assert {"program", "family", "timbre", "part"} <= set(record) and record["timbre"] == FLUID.name
        assert meta["work"].startswith("music21:testworks/")


@needs_fluidsynth
def test_render_is_deterministic_for_a_seed_whatever_the_workers(tmp_path, midi_cache):
    first = render(tmp_path / "a", midi_cache, workers=1)
    second = render(tmp_path / "b", midi_cache, workers=2)
    other = render(tmp_path / "c", midi_cache, seed=4)
    assert [m["stems"] for m in first] == [m["stems"] for m in second]
    for meta in first:
        for name in ["mix.flac"] + [s["file"] for s in meta["stems"]]:
            a, _ = sf.read(tmp_path / "a" / meta["track"] / name)
            b, _ = sf.read(tmp_path / "b" / meta["track"] / name)
            np.testing.assert_array_equal(a, b)
    assert [m["stems"] for m in first] != [m["stems"] for m in other]


@needs_fluidsynth
def test_silence_is_silence(tmp_path, midi_cache):
    metas = render(tmp_path / "s", midi_cache)
    for meta in metas:
        bass = next(s for s in meta["stems"] if s["part"] == "voice1")
        audio, rate = sf.read(tmp_path / "s" / meta["track"] / bass["file"])
        # the last bass note ends at 2.9 s; release and the longest reverb tail (1.8 s) are over by 5.3 s
        quiet = audio[int(5.3 * rate):]
        assert len(quiet) > rate and np.all(quiet == 0.0)
        assert np.abs(audio[: int(2.9 * rate)]).max() > 0.01


def test_splits_are_disjoint_and_reserved_timbres_never_train():
    val, test = held_out("val"), held_out("test")
    assert len(val) >= 100 and len(test) >= 100 and not val & test
    assert all(split_of(w) == "val" for w in val) and all(split_of(w) == "test" for w in test)
    reserved = {"TimGM6mb.sf2", "sf_GMbank.sf2"}
    training = {p.name for p in SOUNDFONTS["train"]} | {p.name for p in SOUNDFONTS["val"]}
    assert not training & reserved and {p.name for p in SOUNDFONTS["test"]} == reserved
    kits = " ".join(str(k[0]) for split in ("train", "val") for k in EXTRA_KITS[split])
    assert not any(name in kits for name in ("ForzeeStereo", "BJA_Pacific", "rumpf", "TimGM6mb", "sf_GMbank"))
    test_kits = {Path(k[0]).parent.name for k in EXTRA_KITS["test"]}
    assert test_kits <= {"ForzeeStereo", "BJA_Pacific", "rumpf_kit_z01_h2"}


@needs_fluidsynth
def test_sampler_triples_and_eval_harness(tmp_path, midi_cache):
    render(tmp_path / "r", midi_cache, seed=5)
    tracks = load_corpus(tmp_path / "r", 44100)
    sampler = TripleSampler(tracks, sample_rate=44100, segment_s=2.0, query_s=1.0, absent_target_p=0.0)
    rng = np.random.default_rng(0)
    for protocol in ("same_stem", "mixture_region"):
        triple = sampler.draw(rng, protocol)
        assert triple.mixture.shape == triple.target.shape == (2, 88200) and triple.query.shape == (2, 44100)
        assert np.abs(triple.target).max() > 0 and triple.protocol == protocol
    absent = TripleSampler(tracks, sample_rate=44100, segment_s=2.0, query_s=1.0, absent_target_p=1.0)
    triple = absent.draw(rng, "same_stem")
    assert triple.info["absent"] and not np.any(triple.target) and np.any(triple.mixture)

    build_evalset(tmp_path / "r", tmp_path / "e", cases=3, seed=0, segment_s=2.0, query_s=1.0,
                  protocols=("same_stem",))
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["case_000", "case_001", "case_002"]
    meta = json.loads((tmp_path / "e" / "case_000" / "meta.json").read_text())
    assert meta["protocol"] == "same_stem" and meta["family"]
    result = evaluate(tmp_path / "e", [], cache=tmp_path / "cache")
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["irm", "mix", "nmf"]
    again = evaluate(tmp_path / "e", [], cache=tmp_path / "cache")
    assert again["rows"] == result["rows"] and again["rtf"] == result["rtf"]  # reused, not recomputed
    overall = result["summary"]["overall"]
    assert overall["mix"]["si_sdr_i_mean"] == 0.0 and overall["mix"]["n"] == 3
    assert overall["irm"]["si_sdr_i_mean"] > overall["nmf"]["si_sdr_i_mean"]
    assert set(result["rtf"]) == {"mix", "nmf", "irm"}


@pytest.mark.skipif(not (HYDROGEN / "ForzeeStereo").is_dir(), reason="needs Debian's hydrogen-drumkits")
def test_hydrogen_kit_plays_gm_drum_notes():
    kit = HydrogenKit(HYDROGEN / "ForzeeStereo" / "drumkit.xml")
    assert {35, 36, 38, 42, 46, 49, 51} <= set(kit.by_note)
    part = Part("Drum", 0, [Note(0.5, 0.6, 36, 110), Note(1.5, 1.6, 38, 40)], is_drum=True)
    audio = kit.render(part, 3 * 44100)
    assert audio.shape == (2, 3 * 44100) and not np.any(audio[:, : 22050])  # silent before the first hit
    assert np.abs(audio[:, 22050: 22050 + 4410]).max() > 0.05  # the kick at 0.5 s


@pytest.mark.skipif(not FREEPATS.is_file(), reason="needs Debian's timidity and freepats")
def test_freepats_renders_a_part_alone_at_its_notes_times():
    synth = TimiditySynth(FREEPATS)
    assert 73 in synth.programs and 3 not in synth.programs  # a flute; freepats has no honky-tonk piano
    flute = Part("Flute", 73, [Note(0.5, 1.5, 72, 90), Note(2.0, 2.5, 74, 100)])
    audio = synth.render(flute, 4 * 44100)
    onset = np.flatnonzero(np.abs(audio[0]) > 1e-4)[0] / 44100
    assert audio.shape == (2, 4 * 44100) and 0.5 <= onset < 0.51  # leading silence kept, note on time
    assert not np.any(audio[:, int(3.6 * 44100):])  # real silence after the release
    assert np.array_equal(audio, synth.render(flute, 4 * 44100))
    with pytest.raises(ValueError, match="no patch for GM program 3"):
        synth.render(Part("Piano", 3, flute.notes), 44100)
    parts = [Part(f"p{i}", 0, [Note(0, 1, 60 + i)]) for i in range(20)]
    assign_programs(parts, np.random.default_rng(0), keep_family=False, available=synth.programs)
    assert {p.program for p in parts} <= synth.programs and len({p.program for p in parts}) == 20


def test_metrics_on_known_signals():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 44100)).astype(np.float32)
    noise = rng.standard_normal((2, 44100)).astype(np.float32)
    noise *= np.sqrt(np.sum(x**2) / np.sum(noise**2)) / 10  # 20 dB below x
    assert snr(x + noise, x) == pytest.approx(20.0, abs=0.01)
    assert si_sdr(x + noise, x) == pytest.approx(20.0, abs=0.05)
    assert si_sdr(0.3 * x, x) > 100 and snr(0.3 * x, x) == pytest.approx(-20 * np.log10(0.7), abs=1e-3)
    assert si_sdr(0.3 * (x + noise), x) == pytest.approx(si_sdr(x + noise, x), abs=1e-6)
    assert sdr(x + noise, x) == pytest.approx(20.0, abs=0.5)
    one_silent_channel = x.copy()
    one_silent_channel[1] = 0
    assert np.isfinite(sdr(one_silent_channel + noise, one_silent_channel))


def noise_track(name: str, seconds: float, rate: int, seed: int) -> Track:
    """Two stems of white noise (program 0 and drums, one SoundFont), int16 as the corpus cache holds them."""
    rng = np.random.default_rng(seed)
    stems = []
    for program, is_drum in ((0, False), (0, True)):
        audio = (rng.standard_normal((2, int(seconds * rate))) * 3000).astype(np.int16)
        active, energy = _activity(audio, int(ACTIVITY_HOP_S * rate))
        stems.append(Stem(name, f"part{len(stems)}", program, "piano", is_drum, "noise.sf2", audio, active, energy,
                          np.zeros((0, 4))))
    return Track(name, stems, stems[0].audio.shape[1])


def eq_band_db(audio: np.ndarray, rate: int) -> np.ndarray:
    """Level (dB) of `audio` in a half-octave around each timbre-EQ centre."""
    power = np.abs(np.fft.rfft(audio, axis=-1)) ** 2
    frequencies = np.fft.rfftfreq(audio.shape[-1], 1.0 / rate)
    return np.array([10 * np.log10(power[:, (frequencies > f / 2**(1 / 4)) & (frequencies < f * 2**(1 / 4))].mean())
                     for f in TIMBRE_EQ_HZ])


def test_timbre_eq_gives_the_target_and_its_query_the_same_new_timbre():
    rate = 44100
    tracks = [noise_track("a", 12.0, rate, 1), noise_track("b", 12.0, rate, 2)]
    flat = eq_band_db(tracks[0].stems[0].audio[:, : 2 * rate].astype(np.float32) / 32768.0, rate)
    assert np.ptp(flat) < 1.0  # white noise: level alike in every band before the EQ
    sampler = TripleSampler(tracks, sample_rate=rate, segment_s=4.0, query_s=4.0, absent_target_p=0.0,
                            random_gains=False, timbre_eq_db=6.0)
    rng = np.random.default_rng(0)
    for protocol in ("same_stem", "cross_track"):
        triple = sampler.draw(rng, protocol)
        target, query = eq_band_db(triple.target, rate), eq_band_db(triple.query, rate)
        shape = target - target.mean()
        assert np.ptp(shape) > 3.0  # a timbre no SoundFont of the corpus had
        np.testing.assert_allclose(query - query.mean(), shape, atol=1.0)  # ... and the query has it too
        rest = eq_band_db(triple.mixture - triple.target, rate)
        assert np.abs((rest - rest.mean()) - shape).max() > 1.0  # the other stem got an EQ of its own

    np.testing.assert_allclose(apply_eq(np.ones((1, 64), np.float32), np.full(8, 20 * np.log10(2)), rate), 2.0,
                               rtol=1e-5)


def sine_track(name: str, seconds: float, rate: int) -> Track:
    """Two stems of sines: 1 kHz (program 0) and a quieter 2.5 kHz (program 1), int16 as the corpus cache holds them."""
    time = np.arange(int(seconds * rate)) / rate
    stems = []
    for program, (hz, level) in enumerate(SINE_STEMS):
        audio = np.tile(np.sin(2 * np.pi * hz * time) * level, (2, 1)).astype(np.int16)
        active, energy = _activity(audio, int(ACTIVITY_HOP_S * rate))
        stems.append(Stem(name, f"part{program}", program, "piano", False, "sine.sf2", audio, active, energy,
                          np.zeros((0, 4))))
    return Track(name, stems, stems[0].audio.shape[1])


SINE_STEMS = ((1000.0, 8000), (2500.0, 4000))


def peak_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio.mean(axis=0) * np.hanning(audio.shape[-1])))
    return float(np.fft.rfftfreq(audio.shape[-1], 1.0 / rate)[spectrum.argmax()])


def test_speed_change_moves_the_pitch_of_mixture_target_and_query_together():
    rate = 22050
    tracks = [sine_track("a", 12.0, rate), sine_track("b", 12.0, rate)]
    sampler = TripleSampler(tracks, sample_rate=rate, segment_s=2.0, query_s=2.0, absent_target_p=0.0,
                            random_gains=False, speed_semitones=3.0)
    rng = np.random.default_rng(0)
    speeds = []
    for protocol in ("same_stem", "cross_track", "mixture_region") * 2:
        triple = sampler.draw(rng, protocol)
        speed = triple.info["speed"]
        speeds.append(speed)
        assert triple.target.shape == triple.mixture.shape == (2, 2 * rate)  # lengths as asked, whatever the speed
        target_hz = SINE_STEMS[triple.info["program"]][0]
        assert peak_hz(triple.target, rate) == pytest.approx(target_hz * speed, abs=2.0)
        assert peak_hz(triple.mixture, rate) == pytest.approx(SINE_STEMS[0][0] * speed, abs=2.0)
        # the query is the target's stem, or (mixture_region) the mixture, where the louder 1 kHz stem peaks
        query_hz = SINE_STEMS[0][0] if protocol == "mixture_region" else target_hz
        assert peak_hz(triple.query, rate) == pytest.approx(query_hz * speed, abs=2.0)
    assert all(2 ** (-3 / 12) <= s <= 2 ** (3 / 12) for s in speeds)
    assert np.ptp(speeds) > 0.05  # drawn per triple, not one for all

    still = TripleSampler(tracks, sample_rate=rate, segment_s=2.0, query_s=2.0, absent_target_p=0.0,
                          random_gains=False)
    assert still.draw(np.random.default_rng(0)).info["speed"] == 1.0


@needs_fluidsynth
def test_prepare_renders_and_draws_what_is_missing_once(tmp_path, midi_cache, monkeypatch):
    """`stemquery data prepare`: every missing render and eval set, then nothing on a second run; an interrupted
    eval set (its `.partial` folder) is drawn again, never left half-written under its name."""
    from stemquery.model.data import prepare as prepare_module
    from stemquery.model.data import render as render_module

    root = tmp_path / "data"
    shutil.copytree(midi_cache, root / "midi_music21")
    (root / "midi_music21" / "done").write_text("")
    monkeypatch.setitem(render_module.SOUNDFONTS, "train", [FLUID])
    monkeypatch.setitem(render_module.EXTRA_KITS, "train", [])
    monkeypatch.setattr(prepare_module, "RENDERS", (prepare_module.Render("train", "train", 25 / 3600, 3),))
    monkeypatch.setattr(prepare_module, "EVAL_SETS", (prepare_module.EvalSet(
        "eval_train", "train", 0, cases=2, segment_s=2.0, query_s=1.0, protocols=("same_stem",)),))
    (root / "eval_train.partial" / "case_000").mkdir(parents=True)  # a run that died mid-draw
    assert prepare_module.prepare(root, workers=1) == ["train", "eval_train"]
    assert (root / "train" / "index.json").exists() and not (root / "eval_train.partial").exists()
    assert sorted(p.name for p in (root / "eval_train").iterdir()) == ["case_000", "case_001"]
    assert prepare_module.prepare(root, workers=1) == []


def test_pack_keeps_the_busiest_excerpt_as_a_loadable_corpus(tmp_path):
    """`stemquery data pack`: evenly spaced tracks, the window where most stems play, Vorbis stems close to the
    originals, notes shifted into the excerpt, and a corpus `load_corpus` reads like a rendered one."""
    from stemquery.model.data.pack import PackConfig, excerpt_start, pack_corpus

    rate = 44100
    corpus = tmp_path / "corpus"
    t = np.arange(6 * rate) / rate
    for index in range(4):
        folder = corpus / f"t{index:06d}"
        (folder / "stems").mkdir(parents=True)
        records = []
        for position, hz in enumerate((220.0, 330.0)):
            audio = 0.3 * np.sin(2 * np.pi * hz * t) * (t >= 3.0)  # both stems play from 3 s on
            sf.write(folder / f"stems/{position:02d}_p.flac", np.stack([audio, audio]).T, rate, subtype="PCM_16")
            records.append({"file": f"stems/{position:02d}_p.flac", "part": "p", "program": position,
                            "family": "organ", "is_drum": False, "timbre": "a.sf2",
                            "notes": [[1.0, 2.0, 60, 90], [3.5, 4.0, 62, 90]]})
        (folder / "meta.json").write_text(json.dumps({"track": folder.name, "stems": records}))
    count, size = pack_corpus(PackConfig(corpus=corpus, out=tmp_path / "pack", tracks=2, seconds=2.0))
    assert count == 2 and size > 0
    assert json.loads((tmp_path / "pack" / "index.json").read_text())["tracks"] == ["t000000", "t000003"]
    meta = json.loads((tmp_path / "pack" / "t000003" / "meta.json").read_text())
    assert meta["excerpt"]["start_s"] >= 3.0 and meta["samples"] == 2 * rate
    start = meta["excerpt"]["start_s"]
    assert meta["stems"][0]["notes"] == [[3.5 - start, 4.0 - start, 62, 90]]
    packed, packed_rate = sf.read(tmp_path / "pack" / "t000003" / meta["stems"][1]["file"], dtype="float32")
    original = 0.3 * np.sin(2 * np.pi * 330.0 * (np.arange(2 * rate) / rate + start))
    assert packed_rate == rate and packed.shape == (2 * rate, 2)
    assert snr(packed[:, 0], original) > 25.0
    tracks = load_corpus(tmp_path / "pack", rate)
    assert [len(track.stems) for track in tracks] == [2, 2] and tracks[0].stems[0].active.mean() > 0.9
    late = np.concatenate([np.zeros((1, rate)), np.full((1, 3 * rate), 0.5)], axis=1)
    assert excerpt_start([late, late], rate, 1.0) == rate  # the first fully active second
    with pytest.raises(ValueError, match="no rendered tracks"):
        pack_corpus(PackConfig(corpus=tmp_path / "pack" / "t000000" / "stems", out=tmp_path / "none"))
