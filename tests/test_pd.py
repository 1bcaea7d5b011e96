"""examples/pd/stemquery.pd in a real headless Pure Data (vanilla: netsend, oscformat, netreceive, oscparse) against a
real server over real UDP: the stems it asks for arrive, and add up to the mix."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from test_server import ServerProcess, free_port, write_pair

ROOT = Path(__file__).resolve().parent.parent
PATCH = ROOT / "examples" / "pd" / "stemquery.pd"
HARNESS = Path(__file__).resolve().parent / "pd" / "quit_when_done.pd"
PD = shutil.which("pd") or shutil.which("puredata")

pytestmark = pytest.mark.skipif(PD is None, reason="needs Pure Data (Debian puredata-core; .ci/run installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("pd-server")).start()
    yield process
    process.stop()


def unescape(text: str) -> str:
    """Pd prints a symbol's spaces, commas and semicolons escaped with a backslash."""
    return re.sub(r"\\(.)", r"\1", text)


def run_patch(server: ServerProcess, messages: list[str]) -> tuple[dict[str, Path], list[str]]:
    """Open the patch and the harness in a headless Pd, send `messages`, wait for it to quit (on done or error);
    returns the stems it printed (name → path) and the errors."""
    sends = [f"stemquery-server {server.port}", f"stemquery-listen {free_port()}", *messages,
             "stemquery-separate bang"]
    result = subprocess.run([PD, "-nogui", "-noaudio", "-nomidi", "-stderr", "-open", str(PATCH), "-open",
                             str(HARNESS), "-send", "; ".join(sends)],
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    stems = {}
    for name, path in re.findall(r"^STEM: (\S+) (.+)$", output, re.MULTILINE):
        stems[name] = Path(unescape(path.strip()))
    errors = [unescape(e) for e in re.findall(r"^ERROR: (.+)$", output, re.MULTILINE)]
    assert stems or errors, output
    return stems, errors


def test_pd_patch_one_query_gives_target_and_residual(server):
    mix, query = write_pair(server.media, "pd-one", 2.0)
    stems, errors = run_patch(server, [f"stemquery-mix {mix}", f"stemquery-query {query}",
                                       f"stemquery-out {server.media / 'out-one'}"])
    assert errors == [] and list(stems) == ["target", "residual"]
    assert stems["target"] == server.media / "out-one" / "pd-one-mix_(target)_nmf.wav"
    total = sum(sf.read(p, always_2d=True)[0] for p in stems.values())
    np.testing.assert_allclose(total, sf.read(mix, always_2d=True)[0], atol=1e-6)


def test_pd_patch_several_stems_by_clip_and_by_name(server):
    mix, query = write_pair(server.media, "pd-many", 2.0, seed=1)
    stems, errors = run_patch(server, [f"stemquery-mix {mix}", f"stemquery-out {server.media / 'out-many'}",
                                       f"stemquery-stem low={query}", "stemquery-stem flute"])
    assert errors == [] and list(stems) == ["low", "flute", "residual"]
    audio = {name: sf.read(path, always_2d=True)[0] for name, path in stems.items()}
    mix_audio = sf.read(mix, always_2d=True)[0]
    assert all(a.shape == mix_audio.shape for a in audio.values())
    np.testing.assert_allclose(sum(audio.values()), mix_audio, atol=1e-6)
    assert np.sum(audio["low"] ** 2) > 0.1 * np.sum(mix_audio**2)


def test_pd_patch_reports_the_servers_error(server):
    mix, _ = write_pair(server.media, "pd-bad", 1.0, seed=2)
    stems, errors = run_patch(server, [f"stemquery-mix {mix}", f"stemquery-out {server.media / 'out-bad'}",
                                       "stemquery-stem basss"])
    assert stems == {} and len(errors) == 1
    assert errors[0].startswith("bad_query 'basss' is not an instrument") and "bass, brass" in errors[0]
