"""The examples and installers users start from: the Max patch, the OSC client, install-reaper."""
import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from stemquery.daw_bridge.cli import main
from stemquery.daw_bridge.config import DEFAULT_OSC_PORT
from stemquery.daw_bridge.osc import OscApi
from test_server import ServerProcess, write_pair

ROOT = Path(__file__).resolve().parent.parent


def test_max_patch_is_valid_and_matches_the_server():
    patch = json.loads((ROOT / "examples" / "max" / "stemquery.maxpat").read_text())["patcher"]
    texts = [b["box"].get("text", "") for b in patch["boxes"]]
    ids = {b["box"]["id"] for b in patch["boxes"]}
    assert f"udpsend 127.0.0.1 {DEFAULT_OSC_PORT}" in texts
    assert "udpreceive 9131 @defer 1" in texts and "append reply_port 9131" in texts
    assert any(t.startswith("prepend /stemquery/separate ") for t in texts)
    route = next(t for t in texts if t.startswith("route "))
    handled = set(route.split()[1:])
    assert handled <= {"/stemquery/" + a for a in ("accepted", "progress", "stem", "done", "error")}
    sent = next(t for t in texts if t.startswith("prepend /stemquery/")).split()[1]
    assert sent in OscApi(server=None).handlers  # the address the patch sends is one the server answers
    assert any("conformpath native absolute" in t for t in texts)  # HFS-style paths from Max on macOS
    for line in patch["lines"]:
        assert line["patchline"]["source"][0] in ids and line["patchline"]["destination"][0] in ids


def test_osc_client_example_runs_a_job(tmp_path):
    server = ServerProcess(tmp_path).start()
    try:
        mix, query = write_pair(server.media, "ex", 1.0)
        result = subprocess.run([sys.executable, str(ROOT / "examples" / "osc_client.py"), "--mix", str(mix),
                                 "--query", str(query), "--out", str(server.media / "out"), "--port", str(server.port)],
                                capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert "accepted as job osc-" in result.stdout and "target: " in result.stdout
    assert (server.media / "out" / "ex-mix_(target)_nmf.wav").exists()


def test_install_reaper_copies_the_scripts(tmp_path):
    result = CliRunner().invoke(main, ["install-reaper", "--resource-path", str(tmp_path)])
    assert result.exit_code == 0, result.output
    copied = sorted(p.name for p in (tmp_path / "Scripts" / "stemquery").iterdir())
    assert copied == sorted(p.name for p in (ROOT / "reaper_scripts").glob("*.lua"))
    assert "Media item context" in result.output
    missing = CliRunner().invoke(main, ["install-reaper", "--resource-path", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "--resource-path" in missing.output
