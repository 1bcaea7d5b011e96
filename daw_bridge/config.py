"""Server settings: defaults, overridden by a TOML file (--config), overridden by command-line options."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from stemquery.model.api import DEFAULT_ENGINE
from stemquery.model.errors import StemqueryError

DEFAULT_OSC_PORT = 9130
DEFAULT_HOTFOLDER = Path.home() / "stemquery"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    osc_port: int = DEFAULT_OSC_PORT
    #: Watched roots; each gets inbox/, processing/, done/, failed/, .tmp/ and a status.json heartbeat.
    hotfolders: tuple[Path, ...] = (DEFAULT_HOTFOLDER,)
    #: Folders OSC and hot-folder jobs may read from and write to, besides the hot folders themselves.
    allow_roots: tuple[Path, ...] = ()
    device: str = "auto"
    engine: str = DEFAULT_ENGINE
    max_duration_s: float = 20 * 60.0
    max_file_mb: float = 1024.0
    #: Use watchdog's PollingObserver (network shares, some mounted volumes give no file events).
    poll: bool = False
    heartbeat_s: float = 2.0
    #: Where the SQLite job journal lives; default: inside the first hot folder.
    journal: Path | None = None
    #: A hand-dropped mix/query pair is taken once neither file has changed size for this long (and a WAV's
    #: data is as long as its header says).
    stable_s: float = 1.0
    #: A file in inbox/ still without its pair, or still incomplete, after this long goes to failed/ with the reason.
    wait_timeout_s: float = 600.0
    extra: dict = field(default_factory=dict)

    @property
    def journal_path(self) -> Path:
        if self.journal:
            return self.journal
        if self.hotfolders:
            return self.hotfolders[0] / "journal.sqlite3"
        return Path.home() / ".stemquery" / "journal.sqlite3"

    @property
    def roots(self) -> tuple[Path, ...]:
        return tuple(self.hotfolders) + tuple(self.allow_roots)

    def with_overrides(self, **overrides) -> "ServerConfig":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None and v != ()})


_PATH_LISTS = {"hotfolders", "allow_roots"}
#: The command line's names for settings whose field name differs (after '-' → '_'): a config file may use either.
FLAG_NAMES = {"hotfolder": "hotfolders", "allow_root": "allow_roots", "max_duration": "max_duration_s",
              "wait_timeout": "wait_timeout_s"}


def _setting_name(key: str) -> str:
    key = key.replace("-", "_")
    return FLAG_NAMES.get(key, key)


def load_config(path: Path | None) -> ServerConfig:
    """Read a TOML config file whose keys are ServerConfig's field names or `serve`'s flag names
    (`max_duration_s` or `max-duration`, `hotfolders` or `hotfolder`)."""
    if path is None:
        return ServerConfig()
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StemqueryError(f"{path}: cannot read the config file ({exc}); fix or remove --config") from None
    known = {f.name for f in fields(ServerConfig)} - {"extra"}
    data: dict = {}
    for key, value in raw.items():
        name = _setting_name(key)
        if name in data:
            raise StemqueryError(f"{path}: {key} is given twice (under two names); keep one")
        data[name] = value
    unknown = [key for key in raw if _setting_name(key) not in known]
    if unknown:
        raise StemqueryError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(sorted(known))} (or the flag names of `stemquery serve`)")
    for key in _PATH_LISTS & set(data):
        value = data[key]
        data[key] = tuple(Path(p).expanduser() for p in ([value] if isinstance(value, str) else value))
    if "journal" in data:
        data["journal"] = Path(data["journal"]).expanduser()
    return ServerConfig(**data)
