"""How fast a warm server answers: /stemquery/separate → /stemquery/accepted, and → the first progress message.

    python benchmarks/server_latency.py [--jobs 20]

Starts `stemquery serve` on a free port with a temporary hot folder, runs one job to warm it, then submits
`--jobs` jobs one after another (each waits for its own `done`) and prints the median and 95th percentile.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from stemquery.daw_bridge.client import OscClient


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each job's mix")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="stemquery-latency-"))
    rng = np.random.default_rng(0)
    mix, query = base / "mix.wav", base / "query.wav"
    sf.write(mix, rng.standard_normal((int(args.seconds * 44100), 2)).astype(np.float32) * 0.1, 44100)
    sf.write(query, rng.standard_normal((44100, 2)).astype(np.float32) * 0.1, 44100)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "stemquery.daw_bridge", "serve", "--hotfolder", str(base / "hot"),
                               "--allow-root", str(base), "--osc-port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    accepted, first_progress = [], []
    try:
        with OscClient("127.0.0.1", port) as client:
            deadline = time.monotonic() + 60
            while client.send("/stemquery/ping") or client.wait_for("/stemquery/pong", 0.5) is None:
                if time.monotonic() > deadline:
                    raise SystemExit("server did not start")
            for index in range(args.jobs + 1):
                sent = time.perf_counter()
                client.send("/stemquery/separate", f"r{index}", str(mix), str(query), str(base / "out"))
                got_accept = got_progress = None
                while True:
                    message = client.receive(120)
                    if message is None:
                        raise SystemExit("no reply")
                    address = message[0]
                    if address == "/stemquery/accepted" and got_accept is None:
                        got_accept = time.perf_counter() - sent
                    elif address == "/stemquery/progress" and got_progress is None:
                        got_progress = time.perf_counter() - sent
                    elif address in ("/stemquery/done", "/stemquery/error"):
                        break
                if index > 0:  # the first job warms the server
                    accepted.append(got_accept * 1000)
                    first_progress.append(got_progress * 1000)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    def summary(values):
        ordered = sorted(values)
        return f"median {statistics.median(ordered):.2f} ms, p95 {ordered[int(0.95 * (len(ordered) - 1))]:.2f} ms"

    print(f"warm server, {args.jobs} jobs of {args.seconds:g} s, 127.0.0.1 UDP")
    print(f"separate → accepted:        {summary(accepted)}")
    print(f"separate → first progress:  {summary(first_progress)}")


if __name__ == "__main__":
    main()
