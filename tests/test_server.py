"""The server as users run it: a real `stemquery serve` subprocess, real UDP/TCP sockets on 127.0.0.1, a real
watchdog observer on real folders, real audio files."""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from pythonosc import slip
from pythonosc.osc_message import OscMessage

from conftest import RATE, tone_sequence
from stemquery.daw_bridge.client import OscClient
from stemquery.daw_bridge.osc import build
from stemquery.model.engines import bsmamba as engine_module

DONE_OR_ERROR = {"/stemquery/done", "/stemquery/error"}
#: `stemquery serve` with bsmamba's weights folder taken from argv[1]: the server has no setting for that folder, and
#: a test's monkeypatch of `WEIGHTS_DIR` (`tiny_shipped`) stays in the test's process, so the server's own process
#: (whose worker thread loads the engines) sets it before the command line runs.
SERVE_WITH_WEIGHTS = """\
import sys
from pathlib import Path
from stemquery.model.engines import bsmamba
bsmamba.WEIGHTS_DIR = Path(sys.argv.pop(1))
from stemquery.daw_bridge.cli import main
main()
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        udp.bind(("127.0.0.1", port))
        return port


class ServerProcess:
    def __init__(self, base: Path, *extra_args: str, weights: Path | None = None) -> None:
        self.base = base
        self.extra_args = list(extra_args)
        #: bsmamba's weights folder for the server (None: the shipped one)
        self.weights = weights
        self.hotfolder = base / "hot"
        self.media = base / "media"
        self.media.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = base / "server.log"

    def start(self) -> "ServerProcess":
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "stemquery.daw_bridge"]
        if self.weights is not None:
            command = [sys.executable, "-c", SERVE_WITH_WEIGHTS, str(self.weights)]
        self.proc = subprocess.Popen(
            [*command, "-v", "serve", "--hotfolder", str(self.hotfolder),
             "--allow-root", str(self.media), "--osc-port", str(self.port), "--max-duration", "600",
             # nmf, not the default: its many small steps give the progress and mid-job-kill tests jobs that last
             "--engine", "nmf", *self.extra_args],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.monotonic() + 60
        with OscClient("127.0.0.1", self.port) as client:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text()
                client.send("/stemquery/ping")
                if client.wait_for("/stemquery/pong", timeout=0.5) is not None:
                    return self
        raise AssertionError("server did not answer ping:\n" + self.log.read_text())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def client(self) -> OscClient:
        return OscClient("127.0.0.1", self.port)

    def journal_rows(self) -> list[sqlite3.Row]:
        with sqlite3.connect(self.hotfolder / "journal.sqlite3") as db:
            db.row_factory = sqlite3.Row
            return db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()


@pytest.fixture()
def server(tmp_path):
    process = ServerProcess(tmp_path).start()
    yield process
    process.stop()
    assert process.proc.returncode == 0, process.log.read_text()


@pytest.fixture()
def refiner_server(tiny_shipped, tmp_path):
    """A server whose bsmamba engine and refiner are `tiny_shipped`'s untrained tiny weights."""
    process = ServerProcess(tmp_path, weights=engine_module.WEIGHTS_DIR).start()
    yield process
    process.stop()
    assert process.proc.returncode == 0, process.log.read_text()


def write_pair(folder: Path, name: str, seconds: float, seed: int = 0) -> tuple[Path, Path]:
    """A mix of a low saw line and a high hollow line, and a query clip of the saw line."""
    rng = np.random.default_rng(seed)
    notes = max(2, int(seconds / 0.5))
    target = tone_sequence(rng.integers(40, 55, notes), 0.5, harmonics="saw")
    other = tone_sequence(rng.integers(65, 80, notes), 0.5, harmonics="hollow")
    mix_path, query_path = folder / f"{name}-mix.wav", folder / f"{name}-query.wav"
    sf.write(mix_path, np.stack([target + other, target + 0.5 * other]).T, RATE)
    sf.write(query_path, tone_sequence(rng.integers(40, 55, 3), 0.5, harmonics="saw"), RATE)
    return mix_path, query_path


def test_osc_job_reports_accepted_progress_stems_done(server):
    mix, query = write_pair(server.media, "song", 4.0)
    out = server.media / "stems"
    with server.client() as client:
        client.send("/stemquery/separate", "req-1", str(mix), str(query), str(out), "format", "flac")
        messages = client.collect_until(DONE_OR_ERROR, timeout=120)
    addresses = [address for address, _ in messages]
    assert addresses[0] == "/stemquery/accepted" and addresses[-1] == "/stemquery/done", messages
    job = messages[0][1][1]
    progress = [args for address, args in messages if address == "/stemquery/progress"]
    fractions = [args[2] for args in progress]
    assert len(progress) >= 10 and fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert all(args[:2] == ["req-1", job] for args in progress)
    stems = {args[1]: Path(args[2]) for address, args in messages if address == "/stemquery/stem"}
    assert set(stems) == {"target", "residual"}
    assert stems["target"] == out / "song-mix_(target)_nmf.flac"
    target, rate = sf.read(stems["target"])
    residual, _ = sf.read(stems["residual"])
    original, _ = sf.read(mix)
    assert rate == RATE and target.shape == original.shape
    assert np.abs(target + residual - original).max() < 1e-3  # two 24-bit files
    assert messages[-1][1] == ["req-1", job]


def test_reply_port_and_ping_status_subscribe(server):
    with server.client() as client, server.client() as listener:
        client.send("/stemquery/ping")
        version, device = client.wait_for("/stemquery/pong", timeout=5)
        assert device == "cpu" and version
        client.send("/stemquery/status", "s1")
        assert client.wait_for("/stemquery/status", timeout=5)[:3] == ["s1", 0, "cpu"]
        mix, query = write_pair(server.media, "rp", 1.0)
        # Max's udpsend sends from a random port: replies go to reply_port (floats accepted, as TouchOSC sends)
        client.send("/stemquery/separate", "r", str(mix), str(query), str(server.media / "o"),
                    "reply_port", float(listener.port))
        seen = listener.collect_until(DONE_OR_ERROR, timeout=60)
        assert seen[0][0] == "/stemquery/accepted" and seen[-1][0] == "/stemquery/done", seen
        assert client.receive(timeout=0.2) is None
        client.send("/stemquery/subscribe", listener.port)
        assert client.wait_for("/stemquery/subscribed", timeout=5) == [listener.port]
        server.stop()
        server.start()
        assert listener.wait_for("/stemquery/startup", timeout=10) is not None


def test_osc_over_tcp_slip(server):
    mix, query = write_pair(server.media, "tcp", 1.0)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as conn:
        conn.sendall(slip.encode(build("/stemquery/separate", ["t1", str(mix), str(query), str(server.media / "t")])))
        buffer, addresses = b"", []
        while "/stemquery/done" not in addresses and "/stemquery/error" not in addresses:
            chunk = conn.recv(65536)
            assert chunk, addresses
            buffer += chunk
            *frames, buffer = buffer.split(slip.END)
            addresses += [OscMessage(slip.decode(slip.END + f + slip.END)).address for f in frames if f]
    assert addresses[0] == "/stemquery/accepted" and addresses[-1] == "/stemquery/done", addresses


def drop_job(hotfolder: Path, name: str, job: dict, files: dict[str, Path] = {}) -> None:
    """What the REAPER scripts do: write into .tmp/, then rename into inbox/ (files first, job file last)."""
    for target_name, source in files.items():
        tmp = hotfolder / ".tmp" / target_name
        tmp.write_bytes(source.read_bytes())
        os.replace(tmp, hotfolder / "inbox" / target_name)
    tmp = hotfolder / ".tmp" / f"{name}.job.json"
    tmp.write_text(json.dumps(job))
    os.replace(tmp, hotfolder / "inbox" / f"{name}.job.json")


def wait_for_path(path: Path, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path
        time.sleep(0.1)
    raise AssertionError(f"{path} did not appear; siblings: {sorted(p.name for p in path.parent.glob('*'))}")


def test_hot_folder_job_file_pair_and_bad_job(server, tmp_path):
    hot = server.hotfolder
    mix, query = write_pair(tmp_path, "hf", 2.0)
    drop_job(hot, "job-a", {"mix": "a.wav", "query": ["q.wav"], "format": "wav", "bit_depth": 24},
             {"a.wav": mix, "q.wav": query})
    (hot / "inbox" / "pair.mix.wav").write_bytes(mix.read_bytes())
    (hot / "inbox" / "pair.query.wav").write_bytes(query.read_bytes())
    (hot / "inbox" / "ignored.wav.part").write_bytes(b"half")
    (hot / "inbox" / "bad.mix.wav").write_text("not audio at all")
    (hot / "inbox" / "bad.query.wav").write_bytes(query.read_bytes())

    result = json.loads(wait_for_path(hot / "done" / "job-a" / "result.json").read_text())
    assert Path(result["stems"]["target"]) == hot / "done" / "job-a" / "a_(target)_nmf.wav"
    assert sf.info(result["stems"]["target"]).subtype == "PCM_24"
    assert (hot / "done" / "job-a" / "a.wav").read_bytes() == mix.read_bytes()  # inputs move with the job
    pair = json.loads(wait_for_path(hot / "done" / "pair" / "result.json").read_text())
    assert all(Path(p).exists() for p in pair["stems"].values())
    error = json.loads(wait_for_path(hot / "failed" / "bad" / "error.json").read_text())
    assert error["code"] == "bad_audio" and "bad.mix.wav" in error["message"]
    assert (hot / "failed" / "bad" / "bad.mix.wav").read_text() == "not audio at all"
    assert (hot / "inbox" / "ignored.wav.part").exists()
    status = json.loads((hot / "status.json").read_text())
    assert status["pid"] == server.proc.pid and time.time() - status["updated"] < 10


def test_kill_9_mid_job_then_restart_completes_it_once(server):
    mix, query = write_pair(server.media, "long", 90.0)
    out = server.media / "k"
    with server.client() as client:
        client.send("/stemquery/separate", "k1", str(mix), str(query), str(out))
        job = client.wait_for("/stemquery/accepted", timeout=10)[1]
        assert client.wait_for("/stemquery/progress", timeout=60) is not None
        server.kill9()
        assert [r["state"] for r in server.journal_rows()] == ["running"]
        # what a kill during the write leaves (this version's temp names and the previous one's), and a stranger's
        orphans = [out / ".long-mix_(target)_nmf.wav.0badf00d.part", out / ".long-mix_(residual)_nmf.x1y2z3.part"]
        stranger = out / ".other-mix_(target)_nmf.wav.12345678.part"
        out.mkdir(exist_ok=True)
        for path in [*orphans, stranger]:
            path.write_bytes(b"RIFF half a stem")
        server.start()
        # the reply address survives in the journal: the same client hears the end of its job
        messages = client.collect_until(DONE_OR_ERROR, timeout=300)
    assert messages[-1] == ("/stemquery/done", ["k1", job]), messages
    rows = server.journal_rows()
    assert [(r["id"], r["state"], r["attempts"]) for r in rows] == [(job, "done", 2)]
    assert sorted(p.name for p in out.iterdir()) == [stranger.name, "long-mix_(residual)_nmf.wav",
                                                     "long-mix_(target)_nmf.wav"]
    assert "removed" in server.log.read_text() and not any(p.exists() for p in orphans)


def test_malformed_packets_and_bad_files_each_get_an_error(server, tmp_path):
    media = server.media
    mix, query = write_pair(media, "ok", 1.0)
    (media / "text.wav").write_text("hello")
    (media / "empty.wav").write_bytes(b"")
    sf.write(media / "nan.wav", np.full(RATE, np.nan, np.float32), RATE, subtype="FLOAT")
    outside = tmp_path / "secret.wav"
    outside.write_bytes(mix.read_bytes())
    (media / "link.wav").symlink_to(outside)
    out = str(media / "o")
    requests = [
        ("/stemquery/separate", []),
        ("/stemquery/separate", ["only-req"]),
        ("/stemquery/separate", [1, 2, 3, 4]),
        ("/stemquery/separate", ["r", 5, str(query), out]),
        ("/stemquery/separate", ["r", str(mix), str(query), out, "reply_port"]),
        ("/stemquery/separate", ["r", str(mix), str(query), out, "colour", "red"]),
        ("/stemquery/separate", ["r", str(mix), str(query), out, "bit_depth", 12]),
        ("/stemquery/separate", ["r", str(mix), str(query), out, "engine", "magic"]),
        ("/stemquery/separate", ["r", str(mix), str(query), out, "query_start", 1.0]),
        ("/stemquery/separate", ["r", "x" * 60000, str(query), out]),
        ("/stemquery/separate", ["r", str(media / ".." / "etc" / "passwd"), str(query), out]),
        ("/stemquery/separate", ["r", "/etc/passwd", str(query), out]),
        ("/stemquery/separate", ["r", str(media / "link.wav"), str(query), out]),
        ("/stemquery/separate", ["r", str(mix), str(query), "/tmp/elsewhere"]),
        ("/stemquery/cancel", ["r"]),
        ("/stemquery/cancel", ["r", "no-such-job"]),
        ("/stemquery/subscribe", ["not a port"]),
        ("/stemquery/nope", ["r"]),
        ("/other", []),
    ]
    run_time_failures = [  # accepted, then failed when the worker reads them
        ("/stemquery/separate", ["r", str(media / "text.wav"), str(query), out]),
        ("/stemquery/separate", ["r", str(media / "empty.wav"), str(query), out]),
        ("/stemquery/separate", ["r", str(media / "nan.wav"), str(query), out]),
        ("/stemquery/separate", ["r", str(media / "missing.wav"), str(query), out]),
    ]
    rng = np.random.default_rng(3)
    garbage = [bytes(rng.integers(0, 256, rng.integers(1, 400), dtype=np.uint8)) for _ in range(73)]
    garbage += [b"/stemquery/separate\x00", b"#bundle\x00garbage", b"\x00" * 8, b"/x\x00\x00,i\x00\x00"]
    total = len(requests) + len(run_time_failures) + len(garbage)
    errors = 0
    with server.client() as client:
        for address, args in requests:
            client.send(address, *args)
            reply = client.wait_for("/stemquery/error", timeout=5)
            assert reply is not None, (address, args)
            errors += 1
        for address, args in run_time_failures:
            client.send(address, *args)
            job = client.wait_for("/stemquery/accepted", timeout=5)
            assert job is not None
            reply = client.wait_for("/stemquery/error", timeout=30)
            assert reply is not None and reply[1] == "bad_audio", reply
            errors += 1
        for packet in garbage:
            client.send_raw(packet)
            reply = client.receive(timeout=5)
            assert reply is not None and reply[0] == "/stemquery/error", packet
            errors += 1
        client.send("/stemquery/ping")
        assert client.wait_for("/stemquery/pong", timeout=5) is not None
    assert total == 100 and errors == total
    assert server.proc.poll() is None
    assert not outside.with_name("o").exists() and not Path("/tmp/elsewhere").exists()


def test_twenty_concurrent_clients_all_done_in_order_to_the_right_client(server):
    clients = [server.client() for _ in range(20)]
    results: dict[int, list] = {}
    barrier = threading.Barrier(20)

    def submit(index: int) -> None:
        client = clients[index]
        mix, query = write_pair(server.media, f"c{index:02d}", 1.0, seed=index)
        barrier.wait()
        client.send("/stemquery/separate", f"req-{index}", str(mix), str(query), str(server.media / f"out{index}"))
        results[index] = client.collect_until(DONE_OR_ERROR, timeout=240)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for client in clients:
        client.close()
    rows = server.journal_rows()
    assert len(rows) == 20 and all(r["state"] == "done" for r in rows)
    finished_order = [r["id"] for r in sorted(rows, key=lambda r: r["updated"])]
    assert finished_order == [r["id"] for r in rows]  # FIFO: finished in acceptance order
    for index, messages in results.items():
        assert messages[-1][0] == "/stemquery/done", messages
        assert {args[0] for _, args in messages} == {f"req-{index}"}
        stems = [args[2] for address, args in messages if address == "/stemquery/stem"]
        assert stems and all(f"out{index}/c{index:02d}-mix_(" in s for s in stems)


def test_refine_on_and_off_through_the_server(refiner_server):
    """The same bsmamba job over OSC with refine on (2 steps), off, and on again, then on through the hot folder:
    all finish; the refined stems are named for the refined engine; refining changes the target; and a refined
    run gives the same samples every time, whichever front end sent it (the refiner is seeded)."""
    server = refiner_server
    mix, query = write_pair(server.media, "song", 3.0)

    def separate(req_id: str, out: str, *options) -> dict[str, Path]:
        with server.client() as client:
            client.send("/stemquery/separate", req_id, str(mix), str(query), str(server.media / out),
                        "engine", "bsmamba", *options)
            messages = client.collect_until(DONE_OR_ERROR, timeout=180)
        assert messages and messages[-1][0] == "/stemquery/done", (messages, server.log.read_text())
        return {args[1]: Path(args[2]) for address, args in messages if address == "/stemquery/stem"}

    refined = separate("on", "refined", "refine", 1, "steps", 2)
    plain = separate("off", "plain", "refine", 0)
    again = separate("again", "again", "refine", 1, "steps", 2)
    drop_job(server.hotfolder, "hot-refined", {"mix": "a.wav", "query": ["q.wav"], "engine": "bsmamba",
                                               "refine": "1", "steps": 2}, {"a.wav": mix, "q.wav": query})
    hot = json.loads(wait_for_path(server.hotfolder / "done" / "hot-refined" / "result.json", 180).read_text())

    assert refined == {"target": server.media / "refined" / "song-mix_(target)_bsmamba-refined2.wav",
                       "residual": server.media / "refined" / "song-mix_(residual)_bsmamba-refined2.wav"}
    assert plain == {"target": server.media / "plain" / "song-mix_(target)_bsmamba.wav",
                     "residual": server.media / "plain" / "song-mix_(residual)_bsmamba.wav"}
    assert Path(hot["stems"]["target"]).name == "a_(target)_bsmamba-refined2.wav"
    rows = server.journal_rows()
    assert [r["state"] for r in rows] == ["done"] * 4
    assert [(json.loads(r["spec"])["refine"], json.loads(r["spec"])["steps"]) for r in rows] == \
        [(True, 2), (False, None), (True, 2), (True, 2)]

    original, _ = sf.read(mix, always_2d=True)
    audio = {name: sf.read(stems["target"], always_2d=True)[0]
             for name, stems in [("refined", refined), ("plain", plain), ("again", again),
                                 ("hot", {"target": hot["stems"]["target"]})]}
    assert all(target.shape == original.shape for target in audio.values())
    assert np.abs(audio["refined"] - audio["plain"]).mean() > 0.05 * np.abs(audio["plain"]).mean()
    np.testing.assert_array_equal(audio["again"], audio["refined"])
    np.testing.assert_array_equal(audio["hot"], audio["refined"])
    residual, _ = sf.read(refined["residual"], always_2d=True)
    np.testing.assert_allclose(audio["refined"] + residual, original, atol=1e-5)
