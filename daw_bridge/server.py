"""`stemquery serve`: one process, engines warm, jobs from OSC and hot folders, journalled, never lost."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from importlib.metadata import version as package_version
from pathlib import Path

from stemquery.daw_bridge.config import ServerConfig
from stemquery.daw_bridge.hotfolder import HotFolder, write_json_atomic
from stemquery.daw_bridge.jobs import Limits, parse_device
from stemquery.daw_bridge.journal import Job, Journal
from stemquery.daw_bridge.osc import OscApi, OscTcpServer, OscUdpServer
from stemquery.daw_bridge.paths import PathPolicy
from stemquery.daw_bridge.spec import resolve_spec_paths, validate_spec
from stemquery.daw_bridge.worker import SeparatorPool, Worker
from stemquery.model import StemqueryError, available_engines

log = logging.getLogger(__name__)


class StemqueryServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.version = package_version("stemquery")
        if config.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s: other machines on the network can send jobs to this server", config.host)
        self.policy = PathPolicy(config.roots)
        device = parse_device(config.device)
        self.hotfolders: list[HotFolder] = []
        try:
            for root in config.hotfolders:  # first: each takes its folder's lock, so a second server changes nothing
                self.hotfolders.append(HotFolder(root, self, poll=config.poll, stable_s=config.stable_s,
                                                 wait_timeout_s=config.wait_timeout_s))
            self.journal = Journal(config.journal_path)
            self.pool = SeparatorPool(config.engine, str(device))
            self.worker = Worker(self.journal, self.pool, Limits(config.max_duration_s, config.max_file_mb),
                                 self.resolve_for_run)
            self.osc = OscApi(self)
            self.udp, self.tcp = self._bind(config.host, config.osc_port)
        except BaseException:
            for folder in self.hotfolders:
                folder.release()
            raise
        self.worker.listeners = [self.osc, *self.hotfolders]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _bind(self, host: str, port: int) -> tuple[OscUdpServer, OscTcpServer]:
        try:
            udp = OscUdpServer((host, port), self.osc)
        except OSError as exc:
            raise StemqueryError(f"cannot listen for OSC on {host}:{port} (UDP): {exc.strerror or exc}; another "
                                 "program (another stemquery serve?) may use it: give --osc-port") from None
        try:
            return udp, OscTcpServer((host, udp.server_address[1]), self.osc)
        except OSError as exc:
            udp.server_close()
            raise StemqueryError(f"cannot listen for OSC on {host}:{udp.server_address[1]} (TCP): "
                                 f"{exc.strerror or exc}; give another --osc-port") from None

    @property
    def udp_socket(self):
        return self.udp.socket

    @property
    def osc_port(self) -> int:
        return self.udp.server_address[1]

    # -- jobs -----------------------------------------------------------------------------------------------------
    def prepare_spec(self, spec: dict, *, base: Path | None, default_out: Path | None) -> dict:
        spec = resolve_spec_paths(spec, self.policy, base=base, default_out=default_out)
        spec["engine"] = spec.get("engine") or self.config.engine
        return spec

    def resolve_for_run(self, job: Job) -> dict:
        """Check the paths again when the job runs: a file may have become an escaping symlink since."""
        spec = dict(job.spec)
        spec["mix"] = str(self.policy.resolve(spec["mix"]))
        spec["query"] = [str(self.policy.resolve(q)) for q in spec["query"]]
        spec["stems"] = [{**stem, "query": [str(self.policy.resolve(q)) for q in stem["query"]]}
                         for stem in spec.get("stems") or []]
        spec["out_dir"] = str(self.policy.resolve(spec["out_dir"]))
        return spec

    def submit(self, job_id: str, *, source: str, spec: dict, req_id: str = "", reply: dict | None = None) -> Job:
        """Journal the job (durably) before anyone is told it was accepted, then wake the worker."""
        job = self.journal.add(job_id, source=source, spec=spec, req_id=req_id, reply=reply)
        log.info("job %s accepted from %s", job_id, source)
        self.worker.notify()
        return job

    def submit_spec(self, job_id: str, raw: dict, *, source: str, base: Path, default_out: Path,
                    extra: dict) -> Job:
        spec = self.prepare_spec(validate_spec(raw), base=base, default_out=default_out)
        return self.submit(job_id, source=source, spec={**spec, **extra})

    def cancel(self, job_id: str) -> bool:
        return self.worker.cancel(job_id)

    def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "version": self.version,
            "device": self.pool.device_name,
            "engines": [e.name for e in available_engines() if e.available],
            "default_engine": self.config.engine,
            "queue": self.journal.queue_length(),
            "running": self.worker.current_job,
            "host": self.config.host,
            "osc_port": self.osc_port,
            "updated": time.time(),
        }

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            self._write_heartbeat("running")
            self._stop.wait(self.config.heartbeat_s)

    def _write_heartbeat(self, state: str) -> None:
        status = {**self.status(), "state": state}
        for folder in self.hotfolders:
            try:
                write_json_atomic(folder.root / "status.json", {**status, "waiting": folder.waiting()})
            except OSError:
                log.exception("cannot write the heartbeat in %s", folder.root)

    def start(self) -> None:
        recovered = self.journal.recover()
        if recovered:
            log.info("%d unfinished job(s) from the last run are queued again", len(recovered))
        self.worker.start()
        for folder in self.hotfolders:
            folder.start()
        self._spawn(self.udp.serve_forever, "osc-udp")
        self._spawn(self.tcp.serve_forever, "osc-tcp")
        self._spawn(self._heartbeat, "heartbeat")
        self.osc.announce_startup(self.udp.socket)
        log.info("stemquery %s serving OSC on %s:%d (UDP and TCP), hot folders: %s", self.version,
                 self.config.host, self.osc_port, ", ".join(str(f.root) for f in self.hotfolders) or "none")

    def shutdown(self) -> None:
        """Stop taking work; the running job is interrupted and requeued; the journal is closed."""
        log.info("shutting down")
        self._stop.set()
        self.udp.shutdown()
        self.tcp.shutdown()
        for folder in self.hotfolders:
            folder.stop()
        self.worker.stop()
        self.worker.join(timeout=60)
        self._write_heartbeat("stopped")
        self.udp.server_close()
        self.tcp.server_close()
        self.journal.close()
        for folder in self.hotfolders:
            folder.release()

    def serve_forever(self) -> None:
        def stop(signum, frame):
            log.info("signal %d received", signum)
            self._stop.set()

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.shutdown()
