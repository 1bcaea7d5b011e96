"""Issue 19, hardening: each defect a new user and a fault-injection run found, as a test that failed before its fix.

Real `stemquery serve` subprocesses, real UDP/TCP sockets on 127.0.0.1, real files and watchdog observers; the CLI
in-process where a subprocess would only cost time.
"""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from conftest import RATE
from test_server import DONE_OR_ERROR, ServerProcess, free_port, server, wait_for_path, write_pair  # noqa: F401
from stemquery.daw_bridge.cli import main
from stemquery.daw_bridge.client import OscClient
from stemquery.daw_bridge.config import load_config
from stemquery.daw_bridge.osc import build
from stemquery.daw_bridge.server import StemqueryServer

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


#: Cursor moves a progress bar writes (tqdm stacks bars left open by earlier tests of the same process).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    message = ANSI_ESCAPE.sub("", result.output).strip().splitlines()[-1].strip()
    assert message.startswith("Error: ") and "Traceback" not in result.output, result.output
    return message


@pytest.fixture()
def pair(tmp_path):
    """A 2 s stereo mix (float WAV) and a query clip of its low line."""
    return write_pair(tmp_path, "song", 2.0)


def write_wav(path: Path, audio: np.ndarray, subtype: str) -> Path:
    sf.write(path, np.asarray(audio).T, RATE, subtype=subtype, format=path.suffix[1:].upper())
    return path


def read_codes(path: Path) -> np.ndarray:
    """A PCM file's integer codes, scaled to 32-bit (libsndfile puts 16/24-bit codes in the top bits)."""
    return sf.read(path, dtype="int32", always_2d=True)[0]


# -- 10. OSC 1.0 length-prefixed TCP is served too; an unknown framing is answered ----------------------------------
def _length_prefixed(conn: socket.socket) -> tuple[str, list]:
    from pythonosc.osc_message import OscMessage

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data

    (size,) = struct.unpack(">I", exactly(4))
    message = OscMessage(exactly(size))
    return message.address, list(message.params)


def check_tcp_framings(server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        for packet in (build("/stemquery/ping", []), build("/stemquery/status", ["t1"])):
            conn.sendall(struct.pack(">I", len(packet)) + packet)
        assert _length_prefixed(conn)[0] == "/stemquery/pong"
        assert _length_prefixed(conn)[1][:3] == ["t1", 0, "cpu"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = conn.recv(65536)
    assert b"/stemquery/error" in reply and b"unknown TCP framing" in reply


# -- 1. errors of a refused OSC request go to reply_port ----------------------------------------------------------
def test_refused_requests_and_ping_status_cancel_answer_on_reply_port_and_tcp_framings(server, pair):
    mix, query = pair
    media_mix = server.media / "m.wav"
    media_mix.write_bytes(mix.read_bytes())
    out = str(server.media / "o")
    refused = {  # what a new user sent with oscsend, and the code each must get
        "forbidden_path": ["r1", "/etc/passwd", str(query), out],
        "bad_request": ["r2", str(media_mix), str(media_mix), out, "bit_depth", 12],
    }
    with server.client() as sender, server.client() as listener:
        for code, args in refused.items():
            sender.send("/stemquery/separate", *args, "reply_port", listener.port)
            reply = listener.wait_for("/stemquery/error", timeout=5)
            assert reply is not None and reply[:2] == [args[0], code], (code, reply)
        sender.send("/stemquery/separate", "r3", str(media_mix), str(media_mix), out, "engine", "magic",
                    "reply_port", float(listener.port))
        assert listener.wait_for("/stemquery/error", timeout=5)[:2] == ["r3", "bad_request"]
        sender.send("/stemquery/ping", "reply_port", listener.port)
        assert listener.wait_for("/stemquery/pong", timeout=5) is not None
        sender.send("/stemquery/status", "s1", "reply_port", listener.port)
        assert listener.wait_for("/stemquery/status", timeout=5)[:3] == ["s1", 0, "cpu"]
        sender.send("/stemquery/cancel", "c1", "no-such-job", "reply_port", listener.port)
        assert listener.wait_for("/stemquery/error", timeout=5)[:2] == ["c1", "bad_request"]
        assert sender.receive(timeout=0.3) is None  # nothing went to the sender's own port
    logged = server.log.read_text()
    assert logged.count("refused /stemquery/separate") == 3 and "forbidden_path" in logged
    check_tcp_framings(server)  # 10., on the same server


# -- 2. a file still being copied is not taken; 9. a file waiting forever fails with the reason ----------------------
def test_hot_folder_waits_for_complete_files_fails_the_stuck_ones_and_names_failed_paths(tmp_path):
    server = ServerProcess(tmp_path, "--wait-timeout", "8").start()
    try:
        inbox = server.hotfolder / "inbox"
        mix, query = write_pair(tmp_path, "slow", 6.0)
        data = mix.read_bytes()
        (inbox / "slow.query.wav").write_bytes(query.read_bytes())
        (inbox / "bad.mix.wav").write_text("not audio at all")  # 13.: its error names failed/, not processing/
        (inbox / "bad.query.wav").write_bytes(query.read_bytes())
        # the query of a copy that never finishes comes first: its "waiting for its pair" must not outlive that
        (inbox / "stuck.query.wav").write_bytes(query.read_bytes())
        time.sleep(1.0)
        with (inbox / "slow.mix.wav").open("wb") as copy:  # a slow copy: a third, a pause, the rest
            copy.write(data[: len(data) // 3])
            copy.flush()
            lonely, _ = write_pair(tmp_path, "lonely", 1.0)
            (inbox / "lonely.mix.wav").write_bytes(lonely.read_bytes())
            stuck = data[: len(data) // 3]
            (inbox / "stuck.mix.wav").write_bytes(stuck)
            time.sleep(3.0)
            status = json.loads((server.hotfolder / "status.json").read_text())
            waiting = {w["file"]: w["reason"] for w in status["waiting"]}
            copy.write(data[len(data) // 3:])
        assert "truncated: header says 6.0 s, data holds 2.0 s" in waiting["inbox/slow.mix.wav"], waiting
        assert "waiting for its pair lonely.query.EXT" in waiting["inbox/lonely.mix.wav"], waiting
        assert "inbox/stuck.query.wav" not in waiting, waiting  # it waits for nothing: its mix is there
        result = json.loads(wait_for_path(server.hotfolder / "done" / "slow" / "result.json", 60).read_text())
        target, rate = sf.read(result["stems"]["target"])
        assert target.shape[0] / rate == pytest.approx(6.0, abs=0.01)  # the whole mix, not the first 2 s
        lonely_error = json.loads(wait_for_path(server.hotfolder / "failed" / "lonely" / "error.json", 30).read_text())
        assert lonely_error["code"] == "bad_request" and "lonely.query.EXT" in lonely_error["message"]
        assert "gave up after 8 s" in lonely_error["message"]
        assert (server.hotfolder / "failed" / "lonely" / "lonely.mix.wav").read_bytes() == lonely.read_bytes()
        stuck_error = json.loads(wait_for_path(server.hotfolder / "failed" / "stuck" / "error.json", 30).read_text())
        assert stuck_error["code"] == "bad_audio" and "truncated: header says 6.0 s, data holds 2.0 s" in \
            stuck_error["message"]
        assert sorted(p.name for p in (server.hotfolder / "failed" / "stuck").glob("stuck.*")) == \
            ["stuck.mix.wav", "stuck.query.wav"]
        assert list(inbox.iterdir()) == []
        bad = server.hotfolder / "failed" / "bad"
        error = json.loads(wait_for_path(bad / "error.json").read_text())
        assert f"{bad / 'bad.mix.wav'}: not a readable audio file" in error["message"]
        assert "processing" not in error["message"]
        assert json.loads((bad / "status.json").read_text())["error"] == error
    finally:
        server.stop()
    assert server.proc.returncode == 0


def test_cli_refuses_a_truncated_wav_unless_asked(tmp_path, pair):
    mix, query = pair
    data = mix.read_bytes()
    truncated = tmp_path / "cut.wav"
    truncated.write_bytes(data[: 44 + (len(data) - 44) // 2])
    message = one_line_error(run_cli("separate", truncated, "-q", query, "-o", tmp_path / "o", "--engine", "nmf"))
    assert "cut.wav: truncated: header says 2.0 s, data holds 1.0 s" in message and "--allow-truncated" in message
    assert not (tmp_path / "o").exists()
    result = run_cli("separate", truncated, "-q", query, "-o", tmp_path / "o", "--engine", "nmf", "--allow-truncated")
    assert result.exit_code == 0, result.output
    assert sf.info(tmp_path / "o" / "cut_(target)_nmf.wav").duration == pytest.approx(1.0, abs=0.01)


def test_a_pipe_as_input_is_refused_not_waited_on(tmp_path):
    """A FIFO named as the mix would block the server's one worker forever in libsndfile's read."""
    import threading

    from stemquery.model.audio import read_audio
    from stemquery.model.errors import AudioInputError

    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    outcome = []

    def read() -> None:
        try:
            read_audio(fifo)
        except AudioInputError as exc:
            outcome.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # unblock the reader so the test process can end
        with open(fifo, "wb"):
            pass
    assert outcome == [f"{fifo}: not a regular file (a pipe or device); give the path of an audio file"]


# -- 3. a full disk, or any OS error on write: one line, the folder, nothing partial ---------------------------------
def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_write_error_is_one_line_naming_the_folder_and_leaves_nothing(tmp_path, pair):
    mix, query = pair
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "stemquery.daw_bridge", "separate", str(mix), "-q", str(query), "-o", str(out),
         "--engine", "nmf"],
        capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: {out}: could not write the stems there")
    assert "nothing was written" in result.stderr
    assert list(out.iterdir()) == []


def test_full_disk_says_so(tmp_path, pair):
    mix, query = pair
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root; the RLIMIT_FSIZE test covers write errors")
    try:
        message = one_line_error(run_cli("separate", mix, "-q", query, "-o", disk, "--engine", "nmf"))
        assert re.search(rf"{disk}: could not write the stems there \(disk full: 0\.\d MB free, the stems need up "
                         r"to \d\.\d MB\)", message), message
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_unknown_device_is_one_line(pair, tmp_path):
    mix, query = pair
    message = one_line_error(run_cli("separate", mix, "-q", query, "-o", tmp_path / "o", "--device", "tpu"))
    assert message == "Error: device 'tpu' is not a device name; use auto, cpu, cuda or cuda:N"
    assert not (tmp_path / "o").exists()


# -- 4. stems follow the umask ------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o027, 0o640)])
def test_stems_follow_the_umask(tmp_path, pair, umask, mode):
    mix, query = pair
    previous = os.umask(umask)
    try:
        result = run_cli("separate", mix, "-q", query, "-o", tmp_path / "o", "--engine", "nmf")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "o").iterdir()}
    assert modes == {"song-mix_(target)_nmf.wav": mode, "song-mix_(residual)_nmf.wav": mode}


# -- 5. a hot float mix never clips silently ----------------------------------------------------------------------
@pytest.mark.parametrize("container, depth", [("wav", "16"), ("wav", "24"), ("flac", "24")])
def test_hot_float_mix_is_refused_at_integer_depths_with_its_peak(tmp_path, pair, container, depth):
    mix, query = pair
    audio, _ = sf.read(mix, always_2d=True)
    hot = write_wav(tmp_path / "hot.wav", 6 * audio.T / np.abs(audio).max(), "FLOAT")
    message = one_line_error(run_cli("separate", hot, "-q", query, "-o", tmp_path / "o", "--engine", "nmf",
                                     "--format", container, "--bit-depth", depth))
    assert "hot.wav: peaks at 6.00 (+15.6 dBFS), over full scale" in message
    assert "write 32-bit float WAV" in message and not (tmp_path / "o").exists()
    if depth != "16":
        return  # the float run below, once
    result = run_cli("separate", hot, "-q", query, "-o", tmp_path / "o", "--engine", "nmf")  # float: kept whole
    assert result.exit_code == 0, result.output
    target, _ = sf.read(tmp_path / "o" / "hot_(target)_nmf.wav", always_2d=True)
    residual, _ = sf.read(tmp_path / "o" / "hot_(residual)_nmf.wav", always_2d=True)
    assert np.abs(target + residual - 6 * audio / np.abs(audio).max()).max() < 1e-5


def test_a_stem_that_clips_is_a_warning_with_its_peak(tmp_path, pair):
    """The mix fits, but the residual (mix - target) does not: written clipped, and the CLI says so."""
    from stemquery.daw_bridge.jobs import stems_to_write
    from stemquery.model.api import Stems
    from stemquery.model.audio import OutputFormat

    mix = np.full((1, 8), 0.9, np.float32)
    target = np.full((1, 8), -0.5, np.float32)
    arrays, warnings = stems_to_write(mix, Stems(target, mix - target, RATE, "x"), OutputFormat("wav", 16))
    assert warnings == ["the residual stem peaks at 1.40 (+2.9 dBFS): 8 sample(s) clipped at 16 bits, so target + "
                        "residual differs from the mix there; write 32-bit float WAV to keep them"]
    assert arrays["target"].tolist() == [[-16384] * 8]


# -- 6. target + residual == mix, sample for sample, at integer depths ----------------------------------------------
@pytest.mark.parametrize("container, subtype, depth", [("wav", "PCM_16", 16), ("wav", "PCM_24", 24),
                                                      ("flac", "PCM_16", 16), ("flac", "PCM_24", 24)])
def test_integer_stems_sum_exactly_to_an_integer_mix(tmp_path, pair, container, subtype, depth):
    mix, query = pair
    audio, _ = sf.read(mix, always_2d=True)
    pcm_mix = write_wav(tmp_path / f"pcm.{container}", audio.T, subtype)
    result = run_cli("separate", pcm_mix, "-q", query, "-o", tmp_path / "o", "--engine", "nmf",
                     "--format", container, "--bit-depth", depth)
    assert result.exit_code == 0, result.output
    target = read_codes(tmp_path / "o" / f"pcm_(target)_nmf.{container}")
    residual = read_codes(tmp_path / "o" / f"pcm_(residual)_nmf.{container}")
    original = read_codes(pcm_mix)
    assert np.abs(target).max() > 0 and np.abs(residual).max() > 0
    assert np.array_equal(target.astype(np.int64) + residual, original), \
        f"{np.mean(target.astype(np.int64) + residual != original):.2%} of samples differ"


# -- 7. one server per hot folder -----------------------------------------------------------------------------------
def test_second_server_on_the_same_hot_folder_refuses_and_names_the_first(server):
    second = subprocess.run(
        [sys.executable, "-m", "stemquery.daw_bridge", "serve", "--hotfolder", str(server.hotfolder),
         "--osc-port", str(free_port()), "--engine", "nmf"],
        capture_output=True, text=True, timeout=120,
    )
    assert second.returncode == 1, second.stderr
    assert f"served by another stemquery server (pid {server.proc.pid})" in second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith("Error: ") and "Traceback" not in second.stderr
    status = json.loads((server.hotfolder / "status.json").read_text())
    assert status["state"] == "running" and status["pid"] == server.proc.pid
    assert list((server.hotfolder / "failed").iterdir()) == []
    with server.client() as client:
        client.send("/stemquery/ping")
        assert client.wait_for("/stemquery/pong", timeout=5) is not None


# -- 11. progress: `starting` first, then a report at least every 0.5 s -----------------------------------------------
def test_progress_starts_with_starting_and_never_goes_quiet(server):
    mix, query = write_pair(server.media, "prog", 12.0)
    with server.client() as client:
        client.send("/stemquery/separate", "p1", str(mix), str(query), str(server.media / "p"))
        stamped = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            message = client.receive(timeout=deadline - time.monotonic())
            assert message is not None
            stamped.append((time.monotonic(), message))
            if message[0] in DONE_OR_ERROR:
                break
    messages = [m for _, m in stamped]
    assert messages[-1][0] == "/stemquery/done", messages
    progress = [(t, args) for t, (address, args) in stamped if address == "/stemquery/progress"]
    assert progress[0][1][2:] == [0.0, "starting"]
    fractions = [args[2] for _, args in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    times = [stamped[0][0]] + [t for t, _ in progress]  # from `accepted` on
    assert max(np.diff(times)) < 1.5, np.diff(times)  # 0.5 s promised; generous for a loaded machine


# -- 12. every error code in docs/osc.md's table is the code the server sends --------------------------------------
def documented_codes() -> set[str]:
    text = (ROOT / "docs" / "osc.md").read_text()
    table = text.split("## Error codes", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))


def test_every_documented_error_code_is_sent(server, pair, tmp_path):
    mix, query = pair
    media = server.media
    good_mix, good_query = media / "m.wav", media / "q.wav"
    good_mix.write_bytes(mix.read_bytes())
    good_query.write_bytes(query.read_bytes())
    sf.write(media / "silent.wav", np.zeros(RATE), RATE)
    (media / "text.wav").write_text("not audio")
    (media / "a-file").write_text("x")
    long_mix, long_query = write_pair(media, "long", 60.0)
    out = str(media / "o")
    seen: dict[str, str] = {}
    with server.client() as client:
        client.send_raw(b"\x01\x02 garbage")
        seen["parse_error"] = client.wait_for("/stemquery/error", timeout=5)[1]
        immediate = {
            "bad_request:engine": ["r", str(good_mix), str(good_query), out, "engine", "magic"],
            "bad_request:flac32": ["r", str(good_mix), str(good_query), out, "format", "flac", "bit_depth", 32],
            "forbidden_path": ["r", str(tmp_path / "secret.wav"), str(good_query), out],
        }
        for name, args in immediate.items():
            client.send("/stemquery/separate", *args)
            seen[name] = client.wait_for("/stemquery/error", timeout=5)[1]
        at_run_time = {
            "bad_audio": ["r", str(media / "text.wav"), str(good_query), out],
            "bad_query": ["r", str(good_mix), str(media / "silent.wav"), out],
            "bad_output": ["r", str(good_mix), str(good_query), str(media / "a-file")],
        }
        for name, args in at_run_time.items():
            client.send("/stemquery/separate", *args)
            assert client.wait_for("/stemquery/accepted", timeout=5) is not None
            seen[name] = client.wait_for("/stemquery/error", timeout=60)[1]
        client.send("/stemquery/separate", "long", str(long_mix), str(long_query), out)
        job = client.wait_for("/stemquery/accepted", timeout=5)[1]
        assert client.wait_for("/stemquery/progress", timeout=30) is not None
        client.send("/stemquery/cancel", "c", job)
        seen["cancelled"] = client.wait_for("/stemquery/error", timeout=60)[1]
    seen["internal"] = _internal_error_code(tmp_path)
    assert {name: code for name, code in seen.items()} == {name: name.split(":")[0] for name in seen}
    assert {code for code in seen.values()} == documented_codes()


def _internal_error_code(tmp_path: Path) -> str:
    """A bug cannot be sent on purpose: one is injected into an in-process server's ping handler."""
    from stemquery.daw_bridge.config import ServerConfig

    config = ServerConfig(osc_port=free_port(), hotfolders=(tmp_path / "inproc",), engine="nmf", device="cpu")
    server = StemqueryServer(config)
    server.start()
    try:
        def broken(args, reply):
            raise ZeroDivisionError("division by zero")

        server.osc.handlers["/stemquery/ping"] = broken
        with OscClient("127.0.0.1", server.osc_port) as client:
            client.send("/stemquery/ping")
            reply = client.wait_for("/stemquery/error", timeout=5)
            client.send("/stemquery/status", "after")
            assert client.wait_for("/stemquery/status", timeout=5) is not None  # it keeps serving
    finally:
        server.shutdown()
    assert reply[2] == "ZeroDivisionError: division by zero"
    return reply[1]


# -- 13. messages that say what is wrong -------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [("3:1", "is reversed or empty"), ("-1:2", "starts before 0 s (negative)")])
def test_query_range_reversed_or_negative_says_so(tmp_path, pair, text, expected):
    mix, _ = pair
    result = run_cli("separate", mix, "--query-range", text, "-o", tmp_path / "o", "--engine", "nmf")
    assert result.exit_code == 2 and expected in result.output and "outside the mix" not in result.output


def test_out_dir_that_is_a_file_says_so(tmp_path, pair):
    mix, query = pair
    blocker = tmp_path / "stems"
    blocker.write_text("x")
    message = one_line_error(run_cli("separate", mix, "-q", query, "-o", blocker, "--engine", "nmf"))
    assert f"{blocker}: is a file, not a folder" in message and "File exists" not in message


def test_same_named_mixes_never_overwrite_each_others_stems(tmp_path, pair):
    mix, query = pair
    audio, _ = sf.read(mix, always_2d=True)
    flac = write_wav(tmp_path / "song-mix.flac", audio.T, "PCM_24")
    out = tmp_path / "o"
    assert run_cli("separate", mix, "-q", query, "-o", out, "--engine", "nmf").exit_code == 0
    first = (out / "song-mix_(target)_nmf.wav").read_bytes()
    message = one_line_error(run_cli("separate", flac, "-q", query, "-o", out, "--engine", "nmf"))
    assert f"holds a stem of {mix}, another mix with the same name" in message
    assert (out / "song-mix_(target)_nmf.wav").read_bytes() == first
    again = run_cli("separate", mix, "-q", query, "-o", out, "--engine", "nmf")  # the same mix again: replaced
    assert again.exit_code == 0, again.output


def test_eval_on_an_empty_folder_fails(tmp_path):
    message = one_line_error(run_cli("eval", tmp_path))
    assert f"{tmp_path}: no cases to score" in message


def test_config_takes_flag_names_and_field_names(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text('max-duration = 30\nhotfolder = "~/hf"\nwait_timeout = 5\nmax_file_mb = 7\n')
    loaded = load_config(config)
    assert (loaded.max_duration_s, loaded.hotfolders, loaded.wait_timeout_s, loaded.max_file_mb) == \
        (30, (Path("~/hf").expanduser(),), 5, 7)
    config.write_text("max_duration_s = 30\nmax-duration = 40\n")
    with pytest.raises(Exception, match="max-duration is given twice"):
        load_config(config)


# -- 14. the README says what the code does -------------------------------------------------------------------------
def test_readme_test_command_lists_every_ci_package_and_the_refined_stem_name():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    listed = ci.split("APT_PACKAGES=(")[1].split("\n)")[0]
    packages = re.findall(r"^\s+([a-z0-9][a-z0-9.+-]+)(?: ([a-z0-9.+-]+))?\s+#", listed, re.M)
    sentence = next(line for line in readme.splitlines() if line.startswith("Run the tests"))
    for names in packages:
        for name in filter(None, names):
            if name not in ("libsndfile1", "libtcmalloc-minimal4"):  # optional: a fallback and a speed-up
                assert name in sentence, name
    assert "bsmamba-refined<steps>-blend<blend>" in readme
    assert "pip install . && stemquery separate examples/audio/mix.flac --query examples/audio/query_flute.flac " \
           "-o out/" in readme and "pip install -e '.[dev]' && python -m pytest -q" in readme
