"""Hot folders: drop a job in `inbox/`, find the stems in `done/<job>/`. See docs/hotfolder.md.

    ROOT/inbox/          *.job.json (written to .tmp/ first, then renamed here), or NAME.mix.EXT + NAME.query.EXT
    ROOT/processing/JOB/ the job's inputs, status.json while queued or running
    ROOT/done/JOB/       inputs, stems, result.json
    ROOT/failed/JOB/     inputs, error.json
    ROOT/.tmp/           where writers prepare files before renaming them into inbox/
    ROOT/status.json     the server's heartbeat (pid, version, device, queue length, updated)

watchdog events only wake the scanner; the scanner lists the folders itself, so events lost while the server was
down (or never sent, on network shares) cost a moment, not a job.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from stemquery.daw_bridge.journal import FINISHED, Job
from stemquery.model.errors import StemqueryError

log = logging.getLogger(__name__)

SUBFOLDERS = ("inbox", "processing", "done", "failed", ".tmp")
JOB_SUFFIX = ".job.json"
IGNORED = re.compile(r"(\.part|\.tmp)$|^\._|^\.DS_Store$|^\.")
PAIR = re.compile(r"^(?P<name>.+)\.(?P<role>mix|query)\.(?P<ext>[A-Za-z0-9]+)$")
SCAN_INTERVAL_S = 0.5


def write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_job_id(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "job"
    return cleaned[:100]


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_any_event(self, event) -> None:
        self.event.set()


class HotFolder:
    """One watched root. The server owns the journal and the worker; this class moves files and writes JSON."""

    def __init__(self, root: Path, server, *, poll: bool, stable_s: float) -> None:
        self.root = root.expanduser().resolve()
        self.server = server
        self.stable_s = stable_s
        for sub in SUBFOLDERS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._sizes: dict[Path, tuple[int, float]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._observer = (PollingObserver(timeout=1) if poll else Observer())
        self._observer.schedule(_Wake(self._wake), str(self.root / "inbox"), recursive=False)
        self._observer.schedule(_Wake(self._wake), str(self.root / "processing"), recursive=True)
        self._thread = threading.Thread(target=self._loop, name=f"hotfolder:{self.root.name}", daemon=True)

    def folder(self, name: str) -> Path:
        return self.root / name

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._observer.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._observer.stop()
        self._observer.join(timeout=5)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:  # a strange file must not stop the folder being served
                log.exception("hot folder scan of %s failed", self.root)
            self._wake.wait(timeout=SCAN_INTERVAL_S)
            self._wake.clear()

    def recover(self) -> None:
        """Finish what a crash interrupted: job folders the journal does not know, or knows as finished."""
        for job_dir in sorted(p for p in self.folder("processing").iterdir() if p.is_dir()):
            job = self.server.journal.get(job_dir.name)
            if job is None:
                self._submit_folder(job_dir)
            elif job.state in FINISHED:
                self._finalise(job)
            else:
                self.write_status(job)

    # -- the inbox ----------------------------------------------------------------------------------------------
    def _stable(self, path: Path) -> bool:
        """True once `path` kept its size for stable_s (Windows and network shares give no close event)."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        now = time.monotonic()
        previous = self._sizes.get(path)
        if previous is None or previous[0] != size:
            self._sizes[path] = (size, now)
            return False
        return now - previous[1] >= self.stable_s

    def scan(self) -> None:
        inbox = self.folder("inbox")
        entries = sorted(p for p in inbox.iterdir() if p.is_file() and not IGNORED.search(p.name))
        pairs: dict[str, dict[str, Path]] = {}
        for path in entries:
            if path.name.endswith(JOB_SUFFIX):
                if self._stable(path) or path.stat().st_size > 0 and self._parses(path):
                    self._take_job_file(path)
            elif match := PAIR.match(path.name):
                pairs.setdefault(match["name"], {})[match["role"]] = path
        for name, pair in pairs.items():
            if len(pair) == 2 and all(self._stable(p) for p in pair.values()):
                self._take_pair(name, pair["mix"], pair["query"])
        # Cancels after jobs: a job and its cancel can arrive in the same scan.
        for path in inbox.glob("*.cancel"):
            job = path.name[: -len(".cancel")]
            if self.server.journal.exists(job):
                self.server.cancel(job)
                path.unlink(missing_ok=True)
        for job_dir in self.folder("processing").iterdir():
            if (job_dir / "cancel").exists():
                self.server.cancel(job_dir.name)
        self._sizes = {p: v for p, v in self._sizes.items() if p.exists()}

    @staticmethod
    def _parses(path: Path) -> bool:
        try:
            json.loads(path.read_text())
            return True
        except (OSError, ValueError):
            return False

    def _new_job_dir(self, name: str) -> Path:
        base = safe_job_id(name)
        candidate, n = base, 1
        while any((self.folder(sub) / candidate).exists() for sub in ("processing", "done", "failed")) \
                or self.server.journal.exists(candidate):
            n += 1
            candidate = f"{base}-{n}"
        job_dir = self.folder("processing") / candidate
        job_dir.mkdir()
        return job_dir

    def _take_job_file(self, path: Path) -> None:
        job_dir = self._new_job_dir(path.name[: -len(JOB_SUFFIX)])
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            os.replace(path, job_dir / "job.json")
            self._reject(job_dir, "bad_request", f"{path.name}: not valid JSON ({exc}); see docs/hotfolder.md")
            return
        # Files the job names by a bare relative name, placed beside it in the inbox, move with it.
        if isinstance(raw, dict):
            names = [raw.get("mix")] + (raw.get("query") if isinstance(raw.get("query"), list)
                                        else str(raw.get("query") or "").split("|"))
            for name in names:
                if isinstance(name, str) and name and "/" not in name and "\\" not in name and name != "..":
                    beside = path.parent / name
                    if beside.is_file():
                        os.replace(beside, job_dir / name)
        os.replace(path, job_dir / "job.json")
        self._submit_folder(job_dir)

    def _take_pair(self, name: str, mix: Path, query: Path) -> None:
        job_dir = self._new_job_dir(name)
        os.replace(mix, job_dir / mix.name)
        os.replace(query, job_dir / query.name)
        write_json_atomic(job_dir / "job.json", {"mix": mix.name, "query": [query.name]})
        self._submit_folder(job_dir)

    def _submit_folder(self, job_dir: Path) -> None:
        try:
            raw = json.loads((job_dir / "job.json").read_text())
            job = self.server.submit_spec(job_dir.name, raw, source="hotfolder", base=job_dir, default_out=job_dir,
                                          extra={"hotfolder": str(self.root)})
        except (OSError, ValueError) as exc:
            self._reject(job_dir, "bad_request", f"job.json: cannot read it ({exc})")
            return
        except StemqueryError as exc:
            self._reject(job_dir, exc.code, str(exc))
            return
        self.write_status(job)

    def _reject(self, job_dir: Path, code: str, message: str) -> None:
        """A job that cannot even be queued: it goes straight to failed/, inputs intact."""
        log.warning("hot-folder job %s refused: %s", job_dir.name, message)
        write_json_atomic(job_dir / "error.json", {"code": code, "message": message})
        write_json_atomic(job_dir / "status.json", {"state": "failed", "progress": 0.0, "stage": "",
                                                    "error": {"code": code, "message": message}})
        os.replace(job_dir, self.folder("failed") / job_dir.name)

    # -- job events → files -------------------------------------------------------------------------------------
    def owns(self, job: Job) -> bool:
        return job.source == "hotfolder" and job.spec.get("hotfolder") == str(self.root)

    def write_status(self, job: Job, **data) -> None:
        job_dir = self.folder("processing") / job.id
        if job_dir.is_dir():
            write_json_atomic(job_dir / "status.json", {
                "job": job.id, "state": job.state, "progress": data.get("fraction", job.progress),
                "stage": data.get("stage", job.stage), "error": job.error, "updated": time.time()})

    def on_event(self, event: str, job: Job, **data) -> None:
        if not self.owns(job):
            return
        if event in ("done", "failed", "cancelled"):
            self._finalise(job)
        else:
            self.write_status(job, **data)

    def _finalise(self, job: Job) -> None:
        """Write result.json or error.json, then move the job folder to done/ or failed/ in one rename."""
        job_dir = self.folder("processing") / job.id
        if not job_dir.is_dir():
            return
        final = self.folder("done" if job.state == "done" else "failed") / job.id
        if job.state == "done":
            result = {name: str(final / Path(p).name) if Path(p).parent == job_dir else p
                      for name, p in (job.result or {}).items()}
            write_json_atomic(job_dir / "result.json", {"job": job.id, "stems": result})
        else:
            error = job.error or {"code": "cancelled", "message": f"job {job.id} was cancelled"}
            write_json_atomic(job_dir / "error.json", error)
        write_json_atomic(job_dir / "status.json", {"job": job.id, "state": job.state, "progress": job.progress,
                                                    "stage": job.stage, "error": job.error, "updated": time.time()})
        (job_dir / "cancel").unlink(missing_ok=True)
        n = 1
        while final.exists():  # never overwrite an earlier job's folder
            n += 1
            final = final.with_name(f"{job.id}-{n}")
        os.replace(job_dir, final)
