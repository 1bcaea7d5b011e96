"""Several stems, by clip or by name, through every client: the CLI, OSC over real UDP, the hot folder; the job
spec's stems; the files add up to the mix."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from conftest import RATE
from stemquery.daw_bridge.cli import main
from stemquery.daw_bridge.spec import SpecError, parse_stem_text, validate_spec
from stemquery.model.errors import QueryError
from test_server import DONE_OR_ERROR, ServerProcess, drop_job, wait_for_path, write_pair

ROOT = Path(__file__).resolve().parent.parent


def read(path: Path) -> np.ndarray:
    return sf.read(path, always_2d=True, dtype="float32")[0]


# -- the job spec ---------------------------------------------------------------------------------------------------
def test_stem_text_and_spec_stems():
    assert parse_stem_text("bass") == {"name": "bass", "query": [], "query_ranges": []}
    assert parse_stem_text("gtr=a.wav|@1:2.5|b.wav") == {"name": "gtr", "query": ["a.wav", "b.wav"],
                                                         "query_ranges": [[1.0, 2.5]]}
    spec = validate_spec({"mix": "m.wav", "query": "q.wav",
                          "stems": ["gtr=a.wav", {"name": "gtr", "query": ["b.wav"], "query_windows": [[0, 1]]},
                                    "drums"]})
    assert spec["query"] == ["q.wav"]
    assert spec["stems"] == [{"name": "gtr", "query": ["a.wav", "b.wav"], "query_windows": [None, [0.0, 1.0]],
                              "query_ranges": []},
                             {"name": "drums", "query": [], "query_windows": [], "query_ranges": []}]


@pytest.mark.parametrize("stems, error, message", [
    (["../x=a.wav"], SpecError, "stem name '../x'"),
    (["residual=a.wav"], SpecError, "not 'residual'"),
    (["gtr="], SpecError, "give a clip after '='"),
    (["gtr=@3:1"], SpecError, "stem 'gtr': query range 3:1 is reversed"),
    ([f"s{i}=a.wav" for i in range(17)], SpecError, "at most 16 stems"),
    (["basss"], QueryError, "nearest: bass"),
    ("bass", SpecError, "stems must be a list"),
])
def test_bad_stems_are_refused_with_the_reason(stems, error, message):
    with pytest.raises(error, match=message):
        validate_spec({"mix": "m.wav", "stems": stems})


# -- the CLI --------------------------------------------------------------------------------------------------------
def test_cli_stem_errors_and_instruments_list(tmp_path):
    mix, _ = write_pair(tmp_path, "song", 1.0)
    result = CliRunner().invoke(main, ["separate", str(mix), "--engine", "nmf", "--stem", "basss"])
    assert result.exit_code != 0 and "nearest: bass" in result.output
    result = CliRunner().invoke(main, ["separate", str(mix), "--engine", "nmf"])
    assert result.exit_code != 0 and "--stem NAME" in result.output
    listing = CliRunner().invoke(main, ["instruments"]).output
    lines = {line.split("  ")[0].strip(): line for line in listing.splitlines()}
    assert "sax" in lines["saxophone"] and "keys" in lines["keyboards"]
    assert "= piano, electric piano, harpsichord" in lines["keyboards"]


def test_two_stems_with_the_shipped_separator_sum_to_the_mix(tmp_path):
    """Issue 18: the files of a two-stem request (a clip, and another source's name) sum to the mix to float
    rounding, on a short mix with the shipped default engine."""
    audio, rate = sf.read(ROOT / "examples" / "audio" / "mix.flac", always_2d=True, dtype="float32")
    mix = tmp_path / "short.wav"
    sf.write(mix, audio[: 4 * rate], rate, subtype="FLOAT")
    result = CliRunner().invoke(main, ["separate", str(mix), "-o", str(tmp_path), "--device", "cpu",
                                       "--stem", f"flute={ROOT / 'examples' / 'audio' / 'query_flute.flac'}",
                                       "--stem", "piano"])
    assert result.exit_code == 0, result.output
    paths = [Path(line) for line in result.stdout.split()]
    assert [p.name for p in paths] == ["short_(flute)_bsmamba.wav", "short_(piano)_bsmamba.wav",
                                       "short_(residual)_bsmamba.wav"]
    stems = [read(p) for p in paths]
    np.testing.assert_allclose(sum(stems), audio[: 4 * rate], atol=1e-6)
    assert all(np.sum(s**2) > 1e-3 * np.sum(audio[: 4 * rate] ** 2) for s in stems[:2])


def test_cli_several_stems_by_clip_range_and_name_sum_exactly(tmp_path):
    """--query (the stem `target`), a stem from a clip and a range of the mix (one NAME twice), one by name: files
    in that order, and at 16 bits their codes add up to the integer mix's exactly."""
    mix, query = write_pair(tmp_path, "int", 1.0)
    pcm = tmp_path / "int.flac"
    sf.write(pcm, read(mix) * 0.5, RATE, subtype="PCM_16")
    result = CliRunner().invoke(main, ["separate", str(pcm), "--engine", "nmf", "--format", "flac", "--bit-depth",
                                       "16", "-q", str(query), "--stem", f"low={query}", "--stem", "low=@0:0.6",
                                       "--stem", "bass", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    paths = [Path(line) for line in result.stdout.split()]
    assert [p.name for p in paths] == [f"int_({name})_nmf.flac" for name in ("target", "low", "bass", "residual")]
    codes = [sf.read(p, dtype="int16", always_2d=True)[0].astype(np.int32) for p in paths]
    np.testing.assert_array_equal(sum(codes), sf.read(pcm, dtype="int16", always_2d=True)[0])


# -- the server -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("stems-server")).start()
    yield process
    process.stop()


def test_osc_several_stems_one_reply_each(server):
    mix, query = write_pair(server.media, "osc", 1.5)
    out = server.media / "osc-out"
    with server.client() as client:
        client.send("/stemquery/separate", "r1", str(mix), "", str(out), "stem", f"low={query}", "stem", "flute",
                    "stem", "vox=@0.5:1.2")
        messages = client.collect_until(DONE_OR_ERROR, timeout=120)
    assert messages[-1][0] == "/stemquery/done", messages
    stems = [(args[1], Path(args[2])) for address, args in messages if address == "/stemquery/stem"]
    assert [name for name, _ in stems] == ["low", "flute", "vox", "residual"]
    np.testing.assert_allclose(sum(read(p) for _, p in stems), read(mix), atol=1e-6)
    with server.client() as client:
        client.send("/stemquery/separate", "r2", str(mix), "", str(out), "stem", "basss")
        code, message = client.wait_for("/stemquery/error", timeout=10)[1:]
    assert code == "bad_query" and "nearest: bass" in message


def test_hot_folder_job_with_stems(server, tmp_path):
    mix, query = write_pair(tmp_path, "hf", 1.0, seed=3)
    drop_job(server.hotfolder, "multi", {"mix": "m.wav", "stems": [
        {"name": "low", "query": ["q.wav"], "query_windows": [[0.0, 1.0]]}, "drums"]},
        files={"m.wav": mix, "q.wav": query})
    result = json.loads(wait_for_path(server.hotfolder / "done" / "multi" / "result.json", 120).read_text())
    assert list(result["stems"]) == ["low", "drums", "residual"]
    np.testing.assert_allclose(sum(read(Path(p)) for p in result["stems"].values()), read(mix), atol=1e-6)
    job = json.loads((server.hotfolder / "done" / "multi" / "job.json").read_text())
    assert (server.hotfolder / "done" / "multi" / "q.wav").exists() and job["stems"][1] == "drums"


def test_the_example_stems_job_is_valid():
    raw = json.loads((ROOT / "examples" / "hotfolder" / "stems.job.json").read_text())
    assert [stem["name"] for stem in validate_spec(raw)["stems"]] == ["flute", "piano", "bass"]
    assert (ROOT / "examples" / "audio" / raw["stems"][0]["query"][0]).exists()
