import numpy as np
import pytest
import soundfile as sf

from stemquery.model.audio import OutputFormat, read_audio, resample, write_audio_files
from stemquery.model.errors import AudioInputError, OutputError


@pytest.mark.parametrize("rate", [22050, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_read_write_round_trip_keeps_rate_channels_and_length(tmp_path, write_audio, rate, channels):
    rng = np.random.default_rng(rate + channels)
    samples = (rng.standard_normal((channels, rate + 123)) * 0.1).astype(np.float32)
    audio, got_rate = read_audio(write_audio("in.wav", samples, rate))
    assert got_rate == rate and audio.shape == samples.shape and audio.dtype == np.float32
    np.testing.assert_array_equal(audio, samples)
    out = tmp_path / "out.flac"
    write_audio_files({out: audio}, rate, OutputFormat("flac", 24))
    again, again_rate = read_audio(out)
    assert again_rate == rate and again.shape == samples.shape
    assert np.abs(again - samples).max() < 2e-6  # 24-bit quantisation


@pytest.mark.parametrize("rate_in, rate_out", [(48000, 44100), (22050, 44100), (44100, 48000)])
def test_resample_gives_exact_length_and_preserves_a_tone(rate_in, rate_out):
    n = rate_in * 2 + 17
    t = np.arange(n) / rate_in
    tone = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)]).astype(np.float32)
    out = resample(tone, rate_in, rate_out)
    assert out.shape == (2, round(n * rate_out / rate_in))
    back = resample(out, rate_out, rate_in)
    assert back.shape == tone.shape
    middle = slice(1000, -1000)
    assert np.abs(back[:, middle] - tone[:, middle]).max() < 1e-3


@pytest.mark.parametrize("container, depth, subtype", [("wav", 16, "PCM_16"), ("wav", 24, "PCM_24"),
                                                         ("wav", 32, "FLOAT"), ("flac", 16, "PCM_16")])
def test_output_formats_write_the_asked_subtype(tmp_path, container, depth, subtype):
    path = tmp_path / f"x.{container}"
    write_audio_files({path: np.zeros((2, 100), np.float32)}, 48000, OutputFormat(container, depth))
    info = sf.info(path)
    assert (info.subtype, info.samplerate, info.channels, info.frames) == (subtype, 48000, 2, 100)


def test_flac_float_is_refused_with_the_fix():
    with pytest.raises(OutputError, match="FLAC cannot be written at 32 bits: use 16, 24"):
        OutputFormat("flac", 32)


def test_failed_write_leaves_nothing_behind(tmp_path):
    good = tmp_path / "a.wav"
    bad = tmp_path / "missing-folder" / "b.wav"
    with pytest.raises(OutputError):
        write_audio_files({good: np.zeros((1, 10), np.float32), bad: np.zeros((1, 10), np.float32)}, 44100)
    assert list(tmp_path.iterdir()) == []


def test_more_than_two_channels_is_a_clear_error(write_audio):
    path = write_audio("surround.wav", np.zeros((6, 1000)))
    with pytest.raises(AudioInputError, match=r"surround.wav: has 6 channels; .*downmix"):
        read_audio(path)
