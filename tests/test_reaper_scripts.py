"""The REAPER scripts in a real Lua 5.4 against FakeReaper (REAPER cannot run here), talking to a real server."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from luaparser import ast as lua_ast
from luaparser import astnodes

from conftest import RATE, si_sdr, tone_sequence
from test_server import ServerProcess, refiner_server  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "reaper_scripts"
HERE = Path(__file__).resolve().parent / "reaper"
FACTS = json.loads((HERE / "reaper_api_facts.json").read_text())["functions"]
LUA = shutil.which("lua5.4") or shutil.which("lua")
MIX_AND_QUERIES = SCRIPTS / "stemquery_Separate selected mix item using selected query items.lua"
TIME_SELECTION = SCRIPTS / "stemquery_Separate selected item using time selection as query.lua"
SETTINGS = SCRIPTS / "stemquery_Settings.lua"
PER_QUERY_ITEM = SCRIPTS / "stemquery_Separate selected mix item into one track per query item.lua"
BY_NAME = SCRIPTS / "stemquery_Separate selected item into named stems.lua"

pytestmark = pytest.mark.skipif(LUA is None, reason="needs Debian's lua5.4 (.ci/run installs it)")


def lua_literal(value) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    return "{" + ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"


def run_script(script: Path, project: dict, tmp_path: Path, seconds: float = 120) -> dict:
    facts = tmp_path / "facts.lua"
    facts.write_text("return " + lua_literal({name: len(params) for name, params in FACTS.items()}))
    project_file = tmp_path / "project.lua"
    project_file.write_text("return " + lua_literal(project))
    record = tmp_path / "record.json"
    subprocess.run([LUA, str(HERE / "driver.lua"), str(facts), str(project_file), str(script), str(record),
                    str(int(seconds))], check=True, timeout=seconds + 30, cwd=tmp_path)
    return json.loads(record.read_text())


# -- conformance --------------------------------------------------------------------------------------------------
def reaper_calls(tree) -> list[tuple[str, int, int]]:
    """(function, argument count, line) for every `reaper.X(...)` call; X alone for other `reaper.X` uses."""
    found = []
    for node in lua_ast.walk(tree):
        if isinstance(node, astnodes.Call) and isinstance(node.func, astnodes.Index):
            target = node.func
            if isinstance(target.value, astnodes.Name) and target.value.id == "reaper":
                found.append((target.idx.id, len(node.args), getattr(node, "line", 0)))
        elif isinstance(node, astnodes.Index) and isinstance(node.value, astnodes.Name) \
                and node.value.id == "reaper" and isinstance(node.idx, astnodes.Name):
            found.append((node.idx.id, -1, getattr(node, "line", 0)))
    return found


@pytest.mark.parametrize("script", sorted(SCRIPTS.glob("*.lua")), ids=lambda p: p.name)
def test_every_reaper_call_exists_with_at_most_its_arguments(script):
    calls = reaper_calls(lua_ast.parse(script.read_text()))
    assert calls, "no reaper.* use found: the parser walk is broken"
    for name, count, line in calls:
        assert name in FACTS, f"{script.name}:{line}: REAPER has no reaper.{name}"
        assert count <= len(FACTS[name]), f"{script.name}:{line}: reaper.{name} takes {len(FACTS[name])} arguments, got {count}"


def test_conformance_check_catches_invented_functions_and_extra_arguments():
    calls = reaper_calls(lua_ast.parse("reaper.ImportStems(1)\nreaper.InsertMedia('a', 0, 1)"))
    assert ("ImportStems", 1, 1) in [(n, c, l) for n, c, l in calls] and "ImportStems" not in FACTS
    assert any(n == "InsertMedia" and c > len(FACTS["InsertMedia"]) for n, c, _ in calls)


def test_facts_file_matches_reapers_api_description():
    source = ROOT.parent / "shared" / "reaper" / "reaper-api.lua"
    if not source.exists():
        pytest.skip(f"{source} is not beside this checkout; the committed facts file is used as it is")
    import importlib.util

    spec = importlib.util.spec_from_file_location("derive", HERE / "derive_api_facts.py")
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    assert derive.derive(source.read_text()) == FACTS


def test_reapack_headers_and_index():
    import xml.etree.ElementTree as ET

    actions = [p for p in SCRIPTS.glob("stemquery_*.lua") if p.name != "stemquery_common.lua"]
    assert len(actions) == 5
    index = ET.parse(SCRIPTS / "index.xml").getroot()
    listed = {pkg.get("name") for pkg in index.iter("reapack")}
    assert listed == {p.name for p in actions}
    for script in actions:
        head = script.read_text().split("\nlocal ")[0]
        for tag in ("@description", "@version", "@author", "@about", "@provides"):
            assert f"-- {tag}" in head, (script.name, tag)
        assert "[nomain] stemquery_common.lua" in head


# -- end to end -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("reaper-server")).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reaper-media")
    rng = np.random.default_rng(11)
    target = tone_sequence(rng.integers(40, 55, 12), 0.5, harmonics="saw")
    other = tone_sequence(rng.integers(65, 80, 12), 0.5, harmonics="hollow")
    sf.write(folder / "song.wav", np.stack([target + other, target + 0.7 * other]).T, RATE)
    sf.write(folder / "guitar.wav", np.stack([target, target]).T, RATE)
    sf.write(folder / "keys.wav", np.stack([other, other]).T, RATE)
    long_mix = np.tile(target + other, 12)
    sf.write(folder / "long.wav", np.stack([long_mix, long_mix]).T, RATE)
    return folder


def project(media: Path, hotfolder: Path, *, items: list[dict], time_selection=None, gfx_keys=None) -> dict:
    return {"tracks": [{"name": "Song"}, {"name": "Samples"}], "items": items, "cursor": 42.0,
            "time_selection": time_selection, "gfx_keys": gfx_keys or [],
            "extstate": {"stemquery/hotfolder": str(hotfolder)}}


def mix_item(media: Path, **overrides) -> dict:
    item = {"track": 1, "name": "song", "position": 10.0, "length": 4.0, "startoffs": 1.0,
            "source": {"file": str(media / "song.wav"), "length": 6.0}}
    return {**item, **overrides}


def query_item(media: Path, **overrides) -> dict:
    item = {"track": 2, "name": "guitar", "position": 30.0, "length": 2.0, "startoffs": 0.5,
            "source": {"file": str(media / "guitar.wav"), "length": 6.0}}
    return {**item, **overrides}


def check_imported(record: dict, mix_name: str, window: tuple[float, float], media: Path,
                   stems: tuple[str, ...] = ("target",)) -> list[np.ndarray]:
    """The stems and the residual on new tracks right under the mix's, in order, sample-aligned, adding up to the
    mix item's audio; returns their audio."""
    assert record["errors"] == [] and record["messages"] == [], record
    names = [f"{mix_name} – {stem} (stemquery)" for stem in (*stems, "residual")]
    assert [i["track"] for i in record["inserted"]] == names
    assert [i["track_index"] for i in record["inserted"]] == list(range(2, 2 + len(names)))  # under the mix's track
    assert all(i["position"] == 10.0 and i["in_undo"] for i in record["inserted"])
    assert record["tracks"] == ["Song", *names, "Samples"]
    assert record["undo"] == ["stemquery: import separated stems"] and record["cursor"] == 42.0
    audio = [sf.read(i["file"], always_2d=True) for i in record["inserted"]]
    source, _ = sf.read(media / "song.wav", always_2d=True)
    start, length = (int(round(x * RATE)) for x in window)
    assert all(rate == RATE and stem.shape == (length, 2) for stem, rate in audio)  # sample-aligned with the item
    np.testing.assert_allclose(sum(stem for stem, _ in audio), source[start: start + length], atol=1e-5)
    return [stem for stem, _ in audio]


def test_mix_and_query_items_end_to_end(server, media, tmp_path):
    record = run_script(MIX_AND_QUERIES, project(media, server.hotfolder, items=[
        query_item(media), mix_item(media)]), tmp_path)
    check_imported(record, "song", (1.0, 4.0), media)
    assert record["gfx_opened"] and record["gfx_closed"]


def test_section_source_and_time_selection_end_to_end(server, media, tmp_path):
    item = mix_item(media, source={"file": str(media / "song.wav"), "length": 6.0,
                                   "section": {"offset": 0.5, "length": 5.0}})
    record = run_script(TIME_SELECTION, project(media, server.hotfolder, items=[item], time_selection=[11.0, 12.5]),
                        tmp_path)
    check_imported(record, "song", (1.5, 4.0), media)  # take offset 1.0 + section offset 0.5
    job_dir = Path(record["inserted"][0]["file"]).parent
    job = json.loads((job_dir / "job.json").read_text())
    assert job["query_ranges"] == [[1.0, 2.5]] and job["query"] == [] and job["mix_window"] == [1.5, 4.0]


def test_server_not_running(media, tmp_path):
    hotfolder = tmp_path / "nobody-home"
    for sub in ("inbox", ".tmp"):
        (hotfolder / sub).mkdir(parents=True)
    record = run_script(MIX_AND_QUERIES, project(media, hotfolder, items=[mix_item(media), query_item(media)]),
                        tmp_path)
    assert record["messages"] == ["stemquery server is not running: start it with `stemquery serve`"]
    assert record["inserted"] == [] and list((hotfolder / "inbox").iterdir()) == []


@pytest.mark.parametrize("overrides, message", [
    ({"midi": True}, "'song' is a MIDI item: render it to audio first"),
    ({"fx": 2}, "'song' has take FX: apply them first"),
    ({"playrate": 1.5}, "'song' plays at rate 1.500: glue the item"),
    ({"length": 9.0}, "'song' loops or extends past its source"),
    ({"source": {"length": 5.0, "section": {"offset": 0.0, "length": 5.0, "reversed": True}}},
     "'song' plays its source reversed"),
])
def test_refused_items_say_why_and_import_nothing(server, media, tmp_path, overrides, message):
    record = run_script(MIX_AND_QUERIES, project(media, server.hotfolder, items=[
        mix_item(media, **overrides), query_item(media)]), tmp_path)
    assert len(record["messages"]) == 1 and message in record["messages"][0], record["messages"]
    assert record["inserted"] == [] and record["errors"] == []


def test_no_selection(server, media, tmp_path):
    record = run_script(MIX_AND_QUERIES, project(media, server.hotfolder, items=[
        mix_item(media, selected=False)]), tmp_path)
    assert record["messages"][0].startswith("Select the mix item and at least one query item")
    record = run_script(TIME_SELECTION, project(media, server.hotfolder, items=[mix_item(media)]), tmp_path)
    assert record["messages"][0].startswith("Make a time selection of at least 0.5 s inside the item")
    assert record["inserted"] == []


def test_cancel_from_the_progress_window(server, media, tmp_path):
    long_item = mix_item(media, name="long", startoffs=0.0, length=70.0,
                         source={"file": str(media / "long.wav"), "length": 72.0})
    record = run_script(MIX_AND_QUERIES, project(media, server.hotfolder, items=[long_item, query_item(media)],
                                                 gfx_keys=[0, 0, 27]), tmp_path)
    assert record["inserted"] == [] and record["messages"] == [] and record["errors"] == []
    assert any("cancelled" in line for line in record["console"]), record
    cancelled = [json.loads(p.read_text()) for p in (server.hotfolder / "failed").glob("reaper-*/error.json")]
    assert any(e["code"] == "cancelled" for e in cancelled)


def test_settings_are_kept_with_extstate(media, tmp_path):
    state = project(media, tmp_path / "hf", items=[])
    state["user_inputs"] = f"{tmp_path / 'elsewhere'},nmf,0,flac"
    record = run_script(SETTINGS, state, tmp_path)
    assert record["extstate"] == {"stemquery/hotfolder": str(tmp_path / "elsewhere"), "stemquery/engine": "nmf",
                                  "stemquery/refine": "0", "stemquery/format": "flac"}
    assert "not running" in record["messages"][0]


def test_refine_setting_reaches_the_job(refiner_server, tiny_shipped, media, tmp_path):  # noqa: F811
    """Refine as the Settings dialog saves it (ExtState stemquery/refine) goes into the job the scripts send: with
    1 the job asks for refine and the server refines (stems named for the refined engine at the refiner's own
    number of steps: the settings have no steps, so the job names none); with 0 the job's refine is off and the
    stems are bsmamba's alone, a different target."""
    targets = {}
    for refine in ("1", "0"):
        run = tmp_path / f"refine-{refine}"
        run.mkdir()
        settings = project(media, refiner_server.hotfolder, items=[])
        settings["user_inputs"] = f"{refiner_server.hotfolder},bsmamba,{refine},wav"
        saved = run_script(SETTINGS, settings, run)
        assert saved["messages"] == [] and saved["extstate"]["stemquery/refine"] == refine, saved
        state = project(media, refiner_server.hotfolder, items=[query_item(media), mix_item(media)])
        state["extstate"] = saved["extstate"]
        record = run_script(MIX_AND_QUERIES, state, run)
        targets[refine], _ = check_imported(record, "song", (1.0, 4.0), media)
        target_file = Path(record["inserted"][0]["file"])
        job = json.loads((target_file.parent / "job.json").read_text())
        assert job["engine"] == "bsmamba" and job["refine"] is (refine == "1") and "steps" not in job, job
        label = f"bsmamba-refined{tiny_shipped.config.steps}" if refine == "1" else "bsmamba"
        assert target_file.name.endswith(f"_(target)_{label}.wav"), target_file
    assert np.abs(targets["1"] - targets["0"]).mean() > 0.05 * np.abs(targets["0"]).mean()


# -- several stems --------------------------------------------------------------------------------------------------
def test_one_track_per_query_item_end_to_end(server, media, tmp_path):
    """Two query items named "guitar" (one stem, two examples) and one "keys": two stems and the residual."""
    keys = query_item(media, name="keys", position=40.0, source={"file": str(media / "keys.wav"), "length": 6.0})
    second_guitar = query_item(media, position=50.0, startoffs=2.5, length=1.5)
    record = run_script(PER_QUERY_ITEM, project(media, server.hotfolder, items=[
        query_item(media), mix_item(media), keys, second_guitar]), tmp_path)
    guitar, keys_stem, _ = check_imported(record, "song", (1.0, 4.0), media, stems=("guitar", "keys"))
    job = json.loads((Path(record["inserted"][0]["file"]).parent / "job.json").read_text())
    assert [(s["name"], s["query_windows"]) for s in job["stems"]] == [("guitar", [[0.5, 2.0], [2.5, 1.5]]),
                                                                       ("keys", [[0.5, 2.0]])]
    source, _ = sf.read(media / "song.wav", always_2d=True)
    guitar_alone, _ = sf.read(media / "guitar.wav", always_2d=True)
    window = slice(RATE, 5 * RATE)
    assert si_sdr(guitar[:, 0], guitar_alone[window, 0]) > si_sdr(source[window, 0], guitar_alone[window, 0]) + 3
    assert np.sum(keys_stem**2) > 0.1 * np.sum(source[window] ** 2)


def test_named_stems_from_the_dialog_end_to_end(server, media, tmp_path):
    state = project(media, server.hotfolder, items=[mix_item(media)])
    state["user_inputs"] = " bass, Drums,,bass "
    record = run_script(BY_NAME, state, tmp_path)
    check_imported(record, "song", (1.0, 4.0), media, stems=("bass", "Drums"))
    assert record["user_inputs_default"] == "bass, drums, keys"
    assert record["extstate"]["stemquery/names"] == "bass, Drums"  # offered next time
    job = json.loads((Path(record["inserted"][0]["file"]).parent / "job.json").read_text())
    assert job["stems"] == [{"name": "bass"}, {"name": "Drums"}] and job["mix_window"] == [1.0, 4.0]


def test_named_stems_unknown_name_is_the_servers_message(server, media, tmp_path):
    state = project(media, server.hotfolder, items=[mix_item(media)])
    state["user_inputs"] = "basss"
    record = run_script(BY_NAME, state, tmp_path)
    assert record["inserted"] == [] and len(record["messages"]) == 1
    assert "'basss' is not an instrument" in record["messages"][0] and "nearest: bass" in record["messages"][0]


@pytest.mark.parametrize("answer, message", [
    (None, None),  # the dialog cancelled: nothing happens
    (" , ", "Name at least one stem"),
    ("bass, residual", "'residual' is everything else"),
])
def test_named_stems_refusals(server, media, tmp_path, answer, message):
    state = project(media, server.hotfolder, items=[mix_item(media)])
    state["user_inputs"] = answer
    record = run_script(BY_NAME, state, tmp_path)
    assert record["inserted"] == [] and record["errors"] == []
    assert len(record["messages"]) == (message is not None)
    if message:
        assert message in record["messages"][0]


def test_per_query_item_needs_a_query_item(server, media, tmp_path):
    record = run_script(PER_QUERY_ITEM, project(media, server.hotfolder, items=[mix_item(media)]), tmp_path)
    assert record["messages"][0].startswith("Select the mix item and one query item per stem")
    assert record["inserted"] == []
