"""Fault injection against a real `stemquery serve`: the fault set of issue 19, and the account of what survived.

    python benchmarks/chaos.py [--keep]

Starts the server (engine nmf, a temporary hot folder and media folder) as a subprocess, injects each fault, and at
the end checks three things: every job the server accepted ended (done, failed or cancelled: none lost), every
input file the script made still exists with its bytes (in place, or moved into done/ or failed/), and the server
never died unasked (kill -9 and SIGTERM are asked). Prints one row per fault and the totals. Exit status 1 if any
job or input was lost, any crash happened, or a fault did not get the expected answer.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from stemquery.daw_bridge.client import OscClient
from stemquery.daw_bridge.osc import build

log = logging.getLogger("chaos")
RATE = 44100
WAIT_TIMEOUT_S = 6
FINAL_STATES = ("done", "failed", "cancelled")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        udp.bind(("127.0.0.1", port))
        return port


def tones(seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stereo mix of a low and a high decaying tone line, and a mono query of the low line."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.5 * RATE)) / RATE
    envelope = np.exp(-3 * t)

    def line(low: int, high: int, notes: int) -> np.ndarray:
        freqs = 440 * 2 ** ((rng.integers(low, high, notes) - 69) / 12)
        return np.concatenate([envelope * np.sign(np.sin(2 * np.pi * f * t)) * 0.2 for f in freqs])

    notes = max(2, int(seconds / 0.5))
    low, high = line(40, 55, notes), line(65, 80, notes)
    return np.stack([low + high, low + 0.5 * high]).astype(np.float32), line(40, 55, 3).astype(np.float32)


@dataclass
class Row:
    fault: str
    injected: int = 0
    expected: int = 0  # answers as expected
    note: str = ""


@dataclass
class Chaos:
    base: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    rows: list[Row] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)  # file name → sha256, for every input made
    crashes: int = 0

    @property
    def hot(self) -> Path:
        return self.base / "hot"

    @property
    def media(self) -> Path:
        return self.base / "media"

    # -- the server -------------------------------------------------------------------------------------------
    def command(self, hotfolder: Path | None = None, port: int | None = None) -> list[str]:
        return [sys.executable, "-m", "stemquery.daw_bridge", "-v", "serve", "--hotfolder", str(hotfolder or self.hot),
                "--allow-root", str(self.media), "--osc-port", str(port or self.port), "--engine", "nmf",
                "--wait-timeout", str(WAIT_TIMEOUT_S)]

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), stdout=(self.base / "server.log").open("a"),
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        with OscClient("127.0.0.1", self.port) as client:
            while time.monotonic() < deadline:
                self.check_alive()
                client.send("/stemquery/ping")
                if client.wait_for("/stemquery/pong", timeout=0.5) is not None:
                    return
        raise RuntimeError("the server did not answer ping; see " + str(self.base / "server.log"))

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            self.crashes += 1
            log.error("the server died unasked (exit %s); restarting it", self.proc.returncode)
            self.start()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.check_alive()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=120)
        if sig == signal.SIGTERM and code != 0:
            self.crashes += 1

    def journal(self) -> list[sqlite3.Row]:
        with sqlite3.connect(self.hot / "journal.sqlite3") as db:
            db.row_factory = sqlite3.Row
            return db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()

    # -- inputs -----------------------------------------------------------------------------------------------
    def make(self, folder: Path, name: str, seconds: float, seed: int, **kw) -> tuple[Path, Path]:
        mix, query = tones(seconds, seed)
        paths = folder / f"{name}.mix.wav", folder / f"{name}.query.wav"
        sf.write(paths[0], mix.T * kw.get("gain", 1.0), RATE, subtype="FLOAT")
        sf.write(paths[1], query, RATE)
        for path in paths:
            self.remember(path)
        return paths

    def remember(self, path: Path) -> None:
        self.inputs[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()

    def inputs_lost(self) -> list[str]:
        found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                 for root in (self.media, self.hot) for p in root.rglob("*") if p.is_file() and p.name in self.inputs}
        return [name for name, digest in self.inputs.items() if found.get(name) != digest]

    def row(self, fault: str, injected: int, expected: int, note: str = "") -> None:
        self.rows.append(Row(fault, injected, expected, note))
        log.info("%s: %d/%d as expected %s", fault, expected, injected, note)

    # -- faults -------------------------------------------------------------------------------------------------
    def refused_with_reply_port(self) -> None:
        mix, query = self.make(self.media, "ok", 1.0, 1)
        out = str(self.media / "out")
        requests = [
            ("/stemquery/separate", ["r", "/etc/passwd", str(query), out], "forbidden_path"),
            ("/stemquery/separate", ["r", str(self.media / ".." / "x.wav"), str(query), out], "forbidden_path"),
            ("/stemquery/separate", ["r", str(mix), str(query), "/tmp/elsewhere"], "forbidden_path"),
            ("/stemquery/separate", ["r", str(mix), str(query), out, "engine", "magic"], "bad_request"),
            ("/stemquery/separate", ["r", str(mix), str(query), out, "bit_depth", 12], "bad_request"),
            ("/stemquery/separate", ["r", str(mix), str(query), out, "format", "flac", "bit_depth", 32], "bad_request"),
            ("/stemquery/separate", ["r", str(mix)], "bad_request"),
            ("/stemquery/cancel", ["r", "no-such-job"], "bad_request"),
            ("/stemquery/nope", ["r"], "bad_request"),
        ]
        ok = 0
        with OscClient("127.0.0.1", self.port) as sender, OscClient("127.0.0.1", self.port) as listener:
            for address, args, code in requests:
                sender.send(address, *args, "reply_port", listener.port)
                reply = listener.wait_for("/stemquery/error", timeout=5)
                ok += reply is not None and reply[1] == code
            for address, args in (("/stemquery/ping", []), ("/stemquery/status", ["s"])):
                sender.send(address, *args, "reply_port", listener.port)
                ok += listener.wait_for(address.replace("ping", "pong"), timeout=5) is not None
            ok -= sender.receive(timeout=0.3) is not None  # nothing may reach the sender's port
        self.row("refused requests, errors to reply_port", len(requests) + 2, ok)

    def garbage(self) -> None:
        rng = np.random.default_rng(3)
        packets = [bytes(rng.integers(0, 256, rng.integers(1, 400), dtype=np.uint8)) for _ in range(50)]
        ok = 0
        with OscClient("127.0.0.1", self.port) as client:
            for packet in packets:
                client.send_raw(packet)
                reply = client.receive(timeout=5)
                ok += reply is not None and reply[0] == "/stemquery/error"
        self.row("garbage datagrams", len(packets), ok)

    def slow_copy_truncated_and_lonely(self) -> None:
        inbox = self.hot / "inbox"
        staging = self.base / "staging"
        staging.mkdir(exist_ok=True)
        slow_mix, slow_query = self.make(staging, "slow", 6.0, 2)
        stuck_mix, stuck_query = self.make(staging, "stuck", 6.0, 3)
        lonely, lonely_query = self.make(staging, "lonely", 1.0, 4)
        del self.inputs[lonely_query.name]  # never dropped: the mix waits for it in vain
        data = slow_mix.read_bytes()
        shutil.copyfile(slow_query, inbox / slow_query.name)
        shutil.copyfile(stuck_query, inbox / stuck_query.name)
        shutil.copyfile(lonely, inbox / lonely.name)
        stuck = stuck_mix.read_bytes()[: len(data) // 3]
        (inbox / stuck_mix.name).write_bytes(stuck)
        self.inputs[stuck_mix.name] = hashlib.sha256(stuck).hexdigest()  # what was dropped is what must survive
        with (inbox / slow_mix.name).open("wb") as copy:
            copy.write(data[: len(data) // 3])
            copy.flush()
            time.sleep(3)
            copy.write(data[len(data) // 3:])
        for path in staging.iterdir():
            path.unlink()  # the copies in the hot folder are the inputs now
        done = self.wait_json(self.hot / "done" / "slow" / "result.json", 90)
        length = sf.info(done["stems"]["target"]).duration if done else 0.0
        stuck_error = self.wait_json(self.hot / "failed" / "stuck" / "error.json", 60)
        lonely_error = self.wait_json(self.hot / "failed" / "lonely" / "error.json", 60)
        self.row("slow copy into inbox/", 1, int(abs(length - 6.0) < 0.01), f"stems {length:.1f} s of 6.0 s")
        self.row("truncated WAV never completed", 1, int(bool(stuck_error) and "truncated" in stuck_error["message"]))
        self.row("mix without its query", 1, int(bool(lonely_error) and "pair" in lonely_error["message"]))

    def full_disk(self) -> None:
        disk = self.media / "small-disk"
        disk.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)],
                          capture_output=True).returncode != 0:
            self.row("full disk (600 KB tmpfs)", 0, 0, "skipped: mounting needs root")
            disk.rmdir()
            return
        try:
            mix, query = self.make(self.media, "big", 10.0, 5)
            with OscClient("127.0.0.1", self.port) as client:
                client.send("/stemquery/separate", "d", str(mix), str(query), str(disk))
                reply = client.wait_for("/stemquery/error", timeout=120)
            ok = reply is not None and reply[1] == "bad_output" and "disk full" in reply[2] and not any(disk.iterdir())
            note = reply[2][reply[2].find("(") + 1: reply[2].find(")")] if reply else "no answer"
            self.row("full disk (600 KB tmpfs)", 1, int(ok), note)
        finally:
            subprocess.run(["umount", str(disk)], check=False)

    def second_server(self) -> None:
        second = subprocess.run(self.command(port=free_port()), capture_output=True, text=True, timeout=180)
        status = json.loads((self.hot / "status.json").read_text())
        ok = second.returncode == 1 and f"pid {self.proc.pid}" in second.stderr and status["state"] == "running"
        self.row("second server on the same hot folder", 1, int(ok))

    def kill_mid_job(self, sig: int, name: str) -> None:
        mix, query = self.make(self.media, name, 60.0, 6)
        out = self.media / f"out-{name}"
        with OscClient("127.0.0.1", self.port) as client:
            client.send("/stemquery/separate", name, str(mix), str(query), str(out))
            job = client.wait_for("/stemquery/accepted", timeout=10)[1]
            client.wait_for("/stemquery/progress", timeout=60)
            self.stop(sig)
            out.mkdir(exist_ok=True)
            orphan = out / f".{name}.mix_(target)_nmf.wav.deadbeef.part"
            orphan.write_bytes(b"half a stem")
            self.start()
            messages = client.collect_until({"/stemquery/done", "/stemquery/error"}, timeout=300)
        rows = {r["id"]: r for r in self.journal()}
        ok = messages and messages[-1][0] == "/stemquery/done" and rows[job]["state"] == "done" \
            and not orphan.exists()
        self.row(f"{'kill -9' if sig == signal.SIGKILL else 'SIGTERM'} mid-job, restart", 1, int(bool(ok)),
                 f"attempts {rows[job]['attempts']}")

    def tcp_framings(self) -> None:
        mix, query = self.make(self.media, "tcp", 1.0, 7)
        ok = 0
        for framing in ("slip", "length"):
            packet = build("/stemquery/separate", [framing, str(mix), str(query), str(self.media / f"tcp-{framing}")])
            frame = b"\xc0" + packet + b"\xc0" if framing == "slip" else struct.pack(">I", len(packet)) + packet
            with socket.create_connection(("127.0.0.1", self.port), timeout=120) as conn:
                conn.sendall(frame)
                data = b""
                while b"/stemquery/done" not in data and b"/stemquery/error" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            ok += b"/stemquery/done" in data
        self.row("OSC over TCP (SLIP, length-prefixed)", 2, ok)

    def hot_float_mix(self) -> None:
        mix, query = self.make(self.media, "hot", 2.0, 8, gain=6.0)
        with OscClient("127.0.0.1", self.port) as client:
            client.send("/stemquery/separate", "h", str(mix), str(query), str(self.media / "hot-out"), "bit_depth", 16)
            reply = client.wait_for("/stemquery/error", timeout=60)
        ok = reply is not None and reply[1] == "bad_output" and "peaks" in reply[2]
        self.row("hot float mix to 16-bit", 1, int(ok))

    def concurrent_clients(self, count: int = 10) -> None:
        results: list[bool] = []

        def one(index: int) -> None:
            mix, query = self.make(self.media, f"c{index}", 1.0, 100 + index)
            with OscClient("127.0.0.1", self.port) as client:
                client.send("/stemquery/separate", f"c{index}", str(mix), str(query), str(self.media / f"c{index}"))
                messages = client.collect_until({"/stemquery/done", "/stemquery/error"}, timeout=300)
            results.append(bool(messages) and messages[-1][0] == "/stemquery/done")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.row("concurrent clients", count, sum(results))

    @staticmethod
    def wait_json(path: Path, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return json.loads(path.read_text())
            time.sleep(0.2)
        return None

    # -- the account ------------------------------------------------------------------------------------------
    def report(self) -> bool:
        rows = self.journal()
        lost_jobs = [r["id"] for r in rows if r["state"] not in FINAL_STATES]
        lost_inputs = self.inputs_lost()
        tracebacks = (self.base / "server.log").read_text().count("Traceback")
        width = max(len(r.fault) for r in self.rows)
        print(f"\n{'fault':<{width}}  injected  as expected  note")
        for r in self.rows:
            print(f"{r.fault:<{width}}  {r.injected:>8}  {r.expected:>11}  {r.note}")
        injected, expected = sum(r.injected for r in self.rows), sum(r.expected for r in self.rows)
        print(f"{'total':<{width}}  {injected:>8}  {expected:>11}")
        print(f"\nfaults injected {injected}, jobs accepted {len(rows)}, jobs lost {len(lost_jobs)}, "
              f"inputs lost {len(lost_inputs)} of {len(self.inputs)}, crashes {self.crashes}, "
              f"tracebacks in the server log {tracebacks}")
        for name in lost_jobs + lost_inputs:
            print(f"  lost: {name}")
        return not lost_jobs and not lost_inputs and not self.crashes and expected == injected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = Path(tempfile.mkdtemp(prefix="stemquery-chaos-"))
    chaos = Chaos(base)
    chaos.media.mkdir(parents=True)
    chaos.start()
    try:
        chaos.refused_with_reply_port()
        chaos.garbage()
        chaos.second_server()
        chaos.slow_copy_truncated_and_lonely()
        chaos.full_disk()
        chaos.hot_float_mix()
        chaos.tcp_framings()
        chaos.kill_mid_job(signal.SIGKILL, "killed")
        chaos.kill_mid_job(signal.SIGTERM, "termed")
        chaos.concurrent_clients()
    finally:
        chaos.stop()
    ok = chaos.report()
    if args.keep:
        print(f"files: {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
