"""Hot folders: drop a job in `inbox/`, find the stems in `done/<job>/`. See docs/hotfolder.md.

    ROOT/inbox/          *.job.json (written to .tmp/ first, then renamed here), or NAME.mix.EXT + NAME.query.EXT
    ROOT/processing/JOB/ the job's inputs, status.json while queued or running
    ROOT/done/JOB/       inputs, stems, result.json
    ROOT/failed/JOB/     inputs, error.json
    ROOT/.tmp/           where writers prepare files before renaming them into inbox/
    ROOT/status.json     the server's heartbeat (pid, version, device, queue length, waiting files, updated)
    ROOT/.lock           held (flock) by the one server serving this folder; holds its pid

watchdog events only wake the scanner; the scanner lists the folders itself, so events lost while the server was
down (or never sent, on network shares) cost a moment, not a job.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from stemquery.daw_bridge.journal import FINISHED, Job
from stemquery.daw_bridge.spec import named_query_files
from stemquery.model.audio import create_temp_beside, wav_length
from stemquery.model.errors import StemqueryError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

log = logging.getLogger(__name__)

SUBFOLDERS = ("inbox", "processing", "done", "failed", ".tmp")
JOB_SUFFIX = ".job.json"
IGNORED = re.compile(r"(\.part|\.tmp)$|^\._|^\.DS_Store$|^\.")
PAIR = re.compile(r"^(?P<name>.+)\.(?P<role>mix|query)\.(?P<ext>[A-Za-z0-9]+)$")
SCAN_INTERVAL_S = 0.5


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `path` whole or not at all: a temp file beside it (mode 0666 less the umask), then a rename."""
    fd, tmp = create_temp_beside(path, ".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class HotFolderBusy(StemqueryError):
    code = "busy"


class FolderLock:
    """One server per hot folder: an exclusive lock on ROOT/.lock while the server runs. The OS drops it when the
    process ends, kill -9 included, so a stale lock cannot block a restart. The file holds the holder's pid."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _lock(fd)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise HotFolderBusy(f"{self.root}: this hot folder is served by another stemquery server (pid {holder}); "
                                "stop that one first, or give this one another --hotfolder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def _lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


@dataclass
class Waiting:
    """An inbox file not taken yet, and why; it goes to failed/ once it has waited `wait_timeout_s`."""

    since: float  # time.monotonic()
    seen_at: float  # time.time(), for status.json
    reason: str
    code: str = "bad_request"


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

    def __init__(self, root: Path, server, *, poll: bool, stable_s: float, wait_timeout_s: float = 600.0) -> None:
        self.root = root.expanduser().resolve()
        self.server = server
        self.stable_s = stable_s
        self.wait_timeout_s = wait_timeout_s
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = FolderLock(self.root)
        self.lock.acquire()  # before touching anything: a second server must change nothing
        for sub in SUBFOLDERS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._sizes: dict[Path, tuple[int, float]] = {}
        self._waiting: dict[Path, Waiting] = {}  # as of the last scan (status.json shows it)
        self._renewed: dict[Path, Waiting] = {}  # being built by the running scan
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
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def release(self) -> None:
        """Give the folder up to the next server (after stop, and after the last status.json is written)."""
        self.lock.release()

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

    def _incomplete(self, path: Path) -> str | None:
        """Why a file cannot be taken yet although its size may be stable (a WAV shorter than its header)."""
        length = wav_length(path)
        return None if length is None or length.complete else f"{path.name}: {length.describe()}"

    def _ready(self, path: Path) -> bool:
        if not self._stable(path):
            self._wait(path, f"{path.name}: waiting for its size to settle (a copy may be running)")
            return False
        if problem := self._incomplete(path):
            self._wait(path, f"{problem}; waiting for the copy to finish", code="bad_audio")
            return False
        return True

    def _wait(self, path: Path, reason: str, code: str = "bad_request") -> None:
        """Note that `path` waits, for `reason`, since it first waited (an entry lives only while each scan
        renews it, so a reason never outlives its cause)."""
        entry = self._renewed.get(path) or self._waiting.get(path)
        since, seen_at = (entry.since, entry.seen_at) if entry else (time.monotonic(), time.time())
        self._renewed[path] = Waiting(since, seen_at, reason, code)

    def waiting(self) -> list[dict]:
        """The inbox files not taken yet, for status.json."""
        return [{"file": f"inbox/{path.name}", "since": entry.seen_at, "reason": entry.reason,
                 "fails_at": entry.seen_at + self.wait_timeout_s}
                for path, entry in sorted(self._waiting.copy().items())]

    def scan(self) -> None:
        inbox = self.folder("inbox")
        self._renewed = {}
        entries = sorted(p for p in inbox.iterdir() if p.is_file() and not IGNORED.search(p.name))
        groups: dict[str, dict[str, list[Path]]] = {}
        for path in entries:
            if path.name.endswith(JOB_SUFFIX):
                if self._job_file_ready(path):
                    self._take_job_file(path)
            elif match := PAIR.match(path.name):
                groups.setdefault(match["name"], {"mix": [], "query": []})[match["role"]].append(path)
            elif not path.name.endswith(".cancel"):
                self._wait(path, f"{path.name}: not a job; name a pair NAME.mix.EXT and NAME.query.EXT, "
                                 f"or write NAME{JOB_SUFFIX} (docs/hotfolder.md)")
        for name, group in groups.items():
            self._consider_pair(name, group)
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
        self._waiting = self._renewed  # one assignment: status.json never sees a half-built list
        self._fail_overdue()

    def _consider_pair(self, name: str, group: dict[str, list[Path]]) -> None:
        files = group["mix"] + group["query"]
        for role, other in (("mix", "query"), ("query", "mix")):
            if len(group[role]) > 1:
                names = ", ".join(p.name for p in group[role])
                for path in files:
                    self._wait(path, f"{len(group[role])} {role} files named {name} ({names}); keep one")
                return
            if not group[other]:
                (path,) = group[role]
                self._wait(path, f"{path.name}: waiting for its pair {name}.{other}.EXT")
                return
        if all([self._ready(p) for p in files]):  # a list: every file's readiness is tracked, not just the first
            self._take_pair(name, group["mix"][0], group["query"][0])

    def _job_file_ready(self, path: Path) -> bool:
        if not (self._stable(path) or self._parses(path)):
            self._wait(path, f"{path.name}: waiting for it to be complete JSON")
            return False
        for beside in self._files_beside(path):
            if problem := self._incomplete(beside):
                self._wait(path, f"{problem}; waiting for the copy to finish", code="bad_audio")
                return False
        return True

    def _fail_overdue(self) -> None:
        """Files that waited wait_timeout_s go to failed/NAME/ (a pair's files together) with error.json saying why;
        the files themselves are kept there."""
        now = time.monotonic()
        for path, entry in sorted(self._waiting.copy().items(), key=lambda item: item[1].since):
            if now - entry.since < self.wait_timeout_s or not path.exists():
                continue
            match = PAIR.match(path.name)
            name = match["name"] if match else path.name.removesuffix(JOB_SUFFIX)
            together = [p for p in self.folder("inbox").iterdir()
                        if (m := PAIR.match(p.name)) and m["name"] == name] if match else [path]
            job_dir = self._new_job_dir(name)
            for item in together:
                os.replace(item, job_dir / item.name)
                self._waiting.pop(item, None)
            self._reject(job_dir, entry.code, f"{entry.reason}; gave up after {self.wait_timeout_s:g} s in inbox/ "
                                              "(--wait-timeout)")

    @staticmethod
    def _parses(path: Path) -> bool:
        try:
            json.loads(path.read_text())  # an empty file (or one just renamed away) does not parse
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
        for beside in self._files_beside(path, raw):  # files it names by a bare name move with it
            os.replace(beside, job_dir / beside.name)
        os.replace(path, job_dir / "job.json")
        self._submit_folder(job_dir)

    @staticmethod
    def _files_beside(path: Path, raw=None) -> list[Path]:
        """The files a job file names by a bare file name that lie beside it in the inbox."""
        if raw is None:
            try:
                raw = json.loads(path.read_text())
            except (OSError, ValueError):
                return []
        if not isinstance(raw, dict):
            return []
        names = [raw.get("mix")] + named_query_files(raw)
        found = []
        for name in names:
            if isinstance(name, str) and name and "/" not in name and "\\" not in name and name != "..":
                if (path.parent / name).is_file():
                    found.append(path.parent / name)
        return found

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
        final = self._final_dir(job_dir.name, "failed")
        error = {"code": code, "message": message.replace(str(job_dir), str(final))}
        log.warning("hot-folder job %s refused (%s): %s", job_dir.name, code, error["message"])
        write_json_atomic(job_dir / "error.json", error)
        write_json_atomic(job_dir / "status.json", {"job": job_dir.name, "state": "failed", "progress": 0.0,
                                                    "stage": "", "error": error, "updated": time.time()})
        os.replace(job_dir, final)

    def _final_dir(self, job_id: str, state: str) -> Path:
        """done/JOB or failed/JOB, made unique with -2, -3, ...: never overwrite an earlier job's folder."""
        final = self.folder("done" if state == "done" else "failed") / job_id
        n = 1
        while final.exists():
            n += 1
            final = final.with_name(f"{job_id}-{n}")
        return final

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
        """Write result.json or error.json, then move the job folder to done/ or failed/ in one rename. Paths in
        them name the files where they end up, not processing/."""
        job_dir = self.folder("processing") / job.id
        if not job_dir.is_dir():
            return
        final = self._final_dir(job.id, job.state)
        error = job.error
        if job.state == "done":
            stems = {name: str(final / Path(p).name) if Path(p).parent == job_dir else p
                     for name, p in job.stems.items()}
            write_json_atomic(job_dir / "result.json", {"job": job.id, "stems": stems, "warnings": job.warnings})
        else:
            error = job.error or {"code": "cancelled", "message": f"job {job.id} was cancelled"}
            error = {**error, "message": error["message"].replace(str(job_dir), str(final))}
            write_json_atomic(job_dir / "error.json", error)
        write_json_atomic(job_dir / "status.json", {"job": job.id, "state": job.state, "progress": job.progress,
                                                    "stage": job.stage, "error": error, "updated": time.time()})
        (job_dir / "cancel").unlink(missing_ok=True)
        os.replace(job_dir, final)
