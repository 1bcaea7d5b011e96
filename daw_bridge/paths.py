"""Which files a job may touch: only under the configured roots, after resolving links."""
from __future__ import annotations

import os
from pathlib import Path

from stemquery.model.errors import StemqueryError


class PathRejected(StemqueryError):
    code = "forbidden_path"


class PathPolicy:
    """Resolve user-supplied paths and refuse any that lead outside the allowed roots.

    `..` components are refused outright (even when they would land inside a root: a request that climbs is a
    request we do not trust); everything else is resolved through symlinks first and then checked, so a link
    inside a root that points elsewhere is refused too.
    """

    def __init__(self, roots: tuple[Path, ...] | list[Path]) -> None:
        self.roots = tuple(Path(r).expanduser().resolve() for r in roots)

    def _inside(self, resolved: Path) -> bool:
        return any(resolved == root or root in resolved.parents for root in self.roots)

    def resolve(self, raw: str | os.PathLike, *, base: Path | None = None) -> Path:
        text = os.fspath(raw)
        if not text or "\x00" in text:
            raise PathRejected(f"{text!r}: not a usable path")
        path = Path(text).expanduser()
        if ".." in path.parts:
            raise PathRejected(f"{text}: paths with '..' are refused; give the file's full path")
        if not path.is_absolute():
            if base is None:
                raise PathRejected(f"{text}: relative path; give the file's full path")
            path = base / path
        resolved = path.resolve()
        if not self._inside(resolved):
            where = ", ".join(map(str, self.roots)) or "nowhere (no --hotfolder or --allow-root set)"
            raise PathRejected(
                f"{text}: outside the folders this server may use ({where}); "
                "move the file there or start the server with --allow-root"
            )
        return resolved
