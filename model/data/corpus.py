"""Music sources for the renderer: the music21 corpus (parsed once, cached as MIDI) and MMA grooves.

A *work* is the unit of the train/val/test split: its parts are rendered as stems of one mixture, and a work
never appears in two splits.
"""
from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

from stemquery.model.data.splits import MUSIC21, split_of

log = logging.getLogger(__name__)

#: Formats in the music21 corpus that hold notes for several parts (rntxt is harmonic analysis, no notes).
SCORE_SUFFIXES = {".mxl", ".xml", ".musicxml", ".krn", ".abc"}
MIN_PARTS = 2
#: Collections of single-line folk tunes (thousands of them, slow to parse, and never two parts).
MONOPHONIC_COLLECTIONS = {"airdsAirs", "essenFolksong", "ryansMammoth", "oneills1850", "nottingham-dataset",
                          "miscFolk", "theoryExercises"}


def music21_work_paths() -> list[tuple[str, Path]]:
    """(work id, file) for every score in music21's bundled corpus, in a stable order."""
    from music21 import corpus

    root = Path(corpus.getComposer("bach")[0]).parents[1]
    paths = sorted(p for p in corpus.getPaths() if p.suffix in SCORE_SUFFIXES)
    works = [(str(p.relative_to(root)), p) for p in paths]
    return [(work_id, p) for work_id, p in works if work_id.split("/")[0] not in MONOPHONIC_COLLECTIONS]


def cache_name(work_id: str, index: int | None = None) -> str:
    stem = work_id.replace("/", "__")
    return f"{stem}.mid" if index is None else f"{stem}#{index:03d}.mid"


def _cache_one(args: tuple[str, Path, Path]) -> list[str]:
    """Parse one corpus file and write every multi-part score in it as MIDI; return the cached work ids."""
    work_id, path, out_dir = args
    from music21 import converter, stream

    try:
        parsed = converter.parse(path)
    except Exception as exc:  # music21 raises many types on malformed corpus files
        log.warning("skipping %s: %s", work_id, exc)
        return []
    scores = list(parsed.scores) if isinstance(parsed, stream.Opus) else [parsed]
    cached = []
    for index, score in enumerate(scores):
        if len(score.parts) < MIN_PARTS:
            continue
        name = cache_name(work_id, index if len(scores) > 1 else None)
        target = out_dir / name
        try:
            score.write("midi", fp=str(target.with_suffix(".part")))
            target.with_suffix(".part").rename(target)
        except Exception as exc:
            log.warning("skipping %s: MIDI export failed: %s", name, exc)
            continue
        cached.append(name)
    return cached


def cache_music21_corpus(out_dir: Path, *, workers: int = 2) -> list[str]:
    """Write every multi-part music21 corpus work as MIDI into out_dir (resumable: existing files are kept)."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    done = {p.name.split("#")[0].removesuffix(".mid") for p in out_dir.glob("*.mid")}
    todo = [(wid, p, out_dir) for wid, p in music21_work_paths() if cache_name(wid)[:-4] not in done]
    # held-out works first: the eval sets need only them, and can be rendered while the rest is still parsing
    todo.sort(key=lambda item: split_of(MUSIC21 + item[0]) == "train")
    cached: list[str] = []
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for names in tqdm(pool.imap_unordered(_cache_one, todo), total=len(todo), desc="music21 → MIDI"):
            cached.extend(names)
    return sorted(p.name for p in out_dir.glob("*.mid"))
