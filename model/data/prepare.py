"""Everything the separator trains and is measured on, in one resumable command (a new machine has no data/):

    stemquery data prepare            # music21 cache, four renders, three eval sets (about an hour on 2 cores)

Each step is skipped when its output is complete (a render's index.json, written last; an eval set's folder,
renamed into place when complete), so an interrupted run continues where it stopped (a render keeps its finished
tracks). The seeds and sizes are the documented ones (docs/data.md).
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Render:
    name: str  # data/<name>
    timbres: str
    hours: float
    seed: int


@dataclass(frozen=True)
class EvalSet:
    name: str  # data/eval_<corpus>
    corpus: str
    seed: int
    cases: int = 160  # 40 per query protocol
    segment_s: float = 10.0
    query_s: float = 4.0
    protocols: tuple[str, ...] | None = None  # None: every protocol of `dataset.PROTOCOLS`, in turn


RENDERS = (Render("train", "train", 4.0, 0), Render("val", "val", 0.6, 101),
           Render("val_unseen", "val_unseen", 0.6, 303), Render("test", "test", 0.6, 202))
EVAL_SETS = (EvalSet("eval_val", "val", 1), EvalSet("eval_val_unseen", "val_unseen", 3),
             EvalSet("eval_test", "test", 2))


def prepare(root: Path, *, workers: int = 2, only: tuple[str, ...] = ()) -> list[str]:
    """Run every missing step under `root` (`only`: just these renders / eval sets, by name). Returns what ran."""
    from stemquery.model.data.corpus import cache_music21_corpus
    from stemquery.model.data.render import RenderConfig, render_dataset
    from stemquery.model.evaluate import build_evalset

    ran = []
    midi = root / "midi_music21"
    if not (midi / "done").exists():
        cache_music21_corpus(midi, workers=workers)
        (midi / "done").write_text("")
        ran.append("midi_music21")
    for step in RENDERS:
        out = root / step.name
        if (only and step.name not in only) or (out / "index.json").exists():
            continue
        log.info("rendering %s (%s timbres, %.1f h, seed %d)", out, step.timbres, step.hours, step.seed)
        render_dataset(RenderConfig(out=out, timbres=step.timbres, hours=step.hours, seed=step.seed,
                                    workers=workers, midi_cache=midi))
        ran.append(step.name)
    for step in EVAL_SETS:
        out = root / step.name
        if (only and step.name not in only) or out.exists():
            continue
        # drawn beside and renamed when complete: a training run validating on it never sees half a set
        partial = root / f"{step.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        log.info("drawing %s from %s (%d cases, seed %d)", out, root / step.corpus, step.cases, step.seed)
        build_evalset(root / step.corpus, partial, cases=step.cases, seed=step.seed, segment_s=step.segment_s,
                      query_s=step.query_s, protocols=step.protocols)
        partial.rename(out)
        ran.append(step.name)
    return ran
