"""The single worker that runs jobs in journal order, and the event fan-out to the front ends.

Front ends (OSC, hot folders) never wait on the worker: they add a job to the journal, wake the worker, and are
told about progress through `JobListener.on_event`.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Protocol

from stemquery.daw_bridge.journal import CANCELLED, DONE, FAILED, Job, Journal
from stemquery.daw_bridge.jobs import Limits, SeparationResult, clean_orphan_parts, run_separation
from stemquery.daw_bridge.spec import request_from_spec
from stemquery.model import Separator, StemqueryError

log = logging.getLogger(__name__)

#: Progress is passed on when it moved by this much, or the stage changed.
PROGRESS_STEP = 0.01
#: ... and at least this often (the last known fraction again) while the engine is quiet.
PROGRESS_INTERVAL_S = 0.5


class JobListener(Protocol):
    def on_event(self, event: str, job: Job, **data) -> None:
        """event: accepted | progress | done | failed | cancelled."""


class _Interrupted(Exception):
    def __init__(self, requeue: bool) -> None:
        super().__init__("interrupted")
        self.requeue = requeue


class _Progress:
    """A running job's progress reports: passed on when they moved PROGRESS_STEP or changed stage, and repeated
    every PROGRESS_INTERVAL_S by a heartbeat thread while the engine says nothing, so clients see a live job."""

    def __init__(self, worker: "Worker", job: Job) -> None:
        self.worker, self.job = worker, job
        self.fraction, self.stage = 0.0, "starting"
        self._sent_at = 0.0
        self._lock = threading.Lock()
        self._done = threading.Event()

    def _send(self, fraction: float, stage: str, *, journal: bool) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.fraction, self.stage, self._sent_at = fraction, stage, time.monotonic()
            if journal:
                self.worker.journal.progress(self.job.id, fraction, stage)
            self.worker.emit("progress", self.job, fraction=fraction, stage=stage)

    def report(self, fraction: float, stage: str) -> None:
        """The engine's callback: stop or cancel take effect here."""
        self.worker.check_interrupt()
        if fraction - self.fraction >= PROGRESS_STEP or stage != self.stage or fraction >= 1.0:
            self._send(max(fraction, self.fraction), stage, journal=True)

    def _beat(self) -> None:
        while not self._done.wait(PROGRESS_INTERVAL_S / 5):
            if time.monotonic() - self._sent_at >= PROGRESS_INTERVAL_S:
                self._send(self.fraction, self.stage, journal=False)

    @contextmanager
    def running(self):
        """Send `starting` now, beat while the block runs, and never after it."""
        self._send(0.0, "starting", journal=True)
        beat = threading.Thread(target=self._beat, name=f"progress:{self.job.id}", daemon=True)
        beat.start()
        try:
            yield self
        finally:
            with self._lock:
                self._done.set()
            beat.join()


class SeparatorPool:
    """Engines loaded once and kept warm; the default is loaded at start, others on first use."""

    def __init__(self, default_engine: str, device: str) -> None:
        self.device = device
        self.default_engine = default_engine
        self._separators: dict[tuple, Separator] = {}
        self._lock = threading.Lock()
        started = time.perf_counter()
        self.get(default_engine)
        log.info("engine %s loaded in %.2f s", default_engine, time.perf_counter() - started)

    def get(self, engine: str, **options) -> Separator:
        """The warm Separator for an engine run with these options (e.g. refine, steps), built on first use."""
        key = (engine, *sorted(options.items()))
        with self._lock:
            if key not in self._separators:
                self._separators[key] = Separator(engine, device=self.device, **options)
            return self._separators[key]

    @property
    def device_name(self) -> str:
        return str(self.get(self.default_engine).device)


class Worker(threading.Thread):
    def __init__(self, journal: Journal, pool: SeparatorPool, limits: Limits, resolve_spec) -> None:
        super().__init__(name="stemquery-worker", daemon=True)
        self.journal = journal
        self.pool = pool
        self.limits = limits
        #: resolve_spec(job) -> spec with every path checked against the path policy (raises PathRejected).
        self.resolve_spec = resolve_spec
        self.listeners: list[JobListener] = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._current: str | None = None
        self._cancel_current = False

    # -- control, from any thread -------------------------------------------------------------------------------
    def emit(self, event: str, job: Job, **data) -> None:
        for listener in self.listeners:
            try:
                listener.on_event(event, job, **data)
            except Exception:  # a broken reply channel must not stop the worker
                log.exception("listener %s failed on %s for job %s", listener, event, job.id)

    def notify(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job at once, or a running one at its next progress report."""
        if self.journal.cancel_if_queued(job_id):
            self.emit("cancelled", self.journal.get(job_id))
            return True
        if self._current == job_id:
            self._cancel_current = True
            return True
        return False

    def stop(self) -> None:
        """Stop after the running job gives up (it is requeued and runs again at the next start)."""
        self._stopping.set()
        self._wake.set()

    @property
    def current_job(self) -> str | None:
        return self._current

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> None:
        while not self._stopping.is_set():
            job = self.journal.next_queued()
            if job is None:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            self._execute(job)

    def check_interrupt(self) -> None:
        if self._stopping.is_set():
            raise _Interrupted(requeue=True)
        if self._cancel_current:
            raise _Interrupted(requeue=False)

    def _execute(self, job: Job) -> None:
        self._current, self._cancel_current = job.id, False
        self.journal.start(job.id)
        job = self.journal.get(job.id)
        log.info("job %s started (%s, attempt %d)", job.id, job.source, job.attempts)
        started = time.perf_counter()
        try:
            with _Progress(self, job).running() as progress:
                result = self._run(job, progress)
        except _Interrupted as stop:
            if stop.requeue:
                self.journal.requeue(job.id)
                log.info("job %s interrupted by shutdown; requeued", job.id)
            else:
                self.journal.finish(job.id, CANCELLED)
                log.info("job %s cancelled", job.id)
                self.emit("cancelled", self.journal.get(job.id))
        except StemqueryError as exc:
            self._fail(job, exc.code, str(exc))
        except Exception as exc:  # the server keeps serving whatever one job does
            log.exception("job %s crashed", job.id)
            self._fail(job, "internal", f"{type(exc).__name__}: {exc}")
        else:
            for warning in result.warnings:
                log.warning("job %s: %s", job.id, warning)
            self.journal.finish(job.id, DONE, result={"stems": {name: str(path) for name, path in result.paths.items()},
                                                      "warnings": result.warnings})
            log.info("job %s done in %.2f s", job.id, time.perf_counter() - started)
            self.emit("done", self.journal.get(job.id))
        finally:
            self._current = None

    def _run(self, job: Job, progress: _Progress) -> SeparationResult:
        request = request_from_spec(self.resolve_spec(job))
        separator = self.pool.get(request.engine, **request.engine_options)
        if job.attempts > 1:  # an earlier attempt was killed: its half-written stems are ours to remove
            for orphan in clean_orphan_parts(request, separator.engine.label):
                log.info("job %s: removed %s, left by the interrupted attempt", job.id, orphan)
        return run_separation(separator, request, progress=progress.report, limits=self.limits)

    def _fail(self, job: Job, code: str, message: str) -> None:
        log.warning("job %s failed (%s): %s", job.id, code, message)
        self.journal.finish(job.id, FAILED, error={"code": code, "message": message})
        self.emit("failed", self.journal.get(job.id))
