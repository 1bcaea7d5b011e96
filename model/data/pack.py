"""A small, compressed excerpt of a rendered corpus, for training where the corpus cannot go.

    stemquery data pack --corpus data/train --out packs/train --tracks 90 --seconds 7

An accelerator lent for a few minutes takes a working tree of some tens of MiB, while the training corpus is
13 GB. A pack keeps, for evenly spaced tracks of the corpus, the `seconds` where most of their stems play, each
stem as Ogg Vorbis (per stereo stem about 12 kB/s and 32 dB SNR against the FLAC at compression 0.6, 18 kB/s and
36 dB at 0.4; a mix is summed from the decoded stems, so target and mixture stay consistent), with its
`meta.json` (notes shifted to the excerpt). It is a
corpus like any other: `load_corpus` decodes and caches it, and a training config names it as `train_corpus`.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from stemquery.model.data.dataset import ACTIVITY_HOP_S, ACTIVE_DBFS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackConfig:
    corpus: Path
    out: Path
    tracks: int = 90
    seconds: float = 7.0
    #: libsndfile's Vorbis compression level, 0 (best quality) to 1 (smallest).
    compression: float = 0.6


def excerpt_start(stems: list[np.ndarray], sample_rate: int, seconds: float) -> int:
    """The start (samples, on the activity grid) of the `seconds` window in which the stems (channels, samples)
    are active the most, summed over stems."""
    hop = int(ACTIVITY_HOP_S * sample_rate)
    frames = min(s.shape[1] for s in stems) // hop
    window = int(round(seconds / ACTIVITY_HOP_S))
    if frames <= window:
        return 0
    active = np.zeros(frames)
    for audio in stems:
        power = np.square(audio[:, : frames * hop].astype(np.float32)).mean(axis=0).reshape(frames, hop).mean(axis=1)
        active += power > 10 ** (ACTIVE_DBFS / 10)
    csum = np.concatenate([[0.0], np.cumsum(active)])
    return int(np.argmax(csum[window:] - csum[:-window])) * hop


def _excerpt_notes(notes: list, start_s: float, seconds: float) -> list:
    """Notes (onset, offset, pitch, velocity) that sound in the excerpt, shifted and clipped to it."""
    kept = []
    for onset, offset, pitch, velocity in notes:
        if offset > start_s and onset < start_s + seconds:
            kept.append([max(onset - start_s, 0.0), min(offset - start_s, seconds), pitch, velocity])
    return kept


def pack_track(track_dir: Path, out: Path, config: PackConfig) -> int:
    """Write one track's excerpt (stems as Vorbis, meta.json) under `out`; returns the bytes written."""
    meta = json.loads((track_dir / "meta.json").read_text())
    stems, rate = [], None
    for record in meta["stems"]:
        audio, rate = sf.read(track_dir / record["file"], dtype="float32", always_2d=True)
        stems.append(np.ascontiguousarray(audio.T))
    start = excerpt_start(stems, rate, config.seconds)
    length = min(int(config.seconds * rate), min(s.shape[1] for s in stems) - start)
    records = []
    staging = out.with_name(out.name + ".part")  # a track appears whole or not at all
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "stems").mkdir(parents=True)
    for record, audio in zip(meta["stems"], stems):
        name = f"stems/{Path(record['file']).stem}.ogg"
        sf.write(staging / name, audio[:, start: start + length].T, rate, format="OGG", subtype="VORBIS",
                 compression_level=config.compression)
        notes = _excerpt_notes(record.get("notes", []), start / rate, length / rate)
        records.append({**record, "file": name, "notes": notes})
    packed = {**meta, "stems": records, "samples": length, "seconds": length / rate,
              "excerpt": {"corpus_track": track_dir.name, "start_s": start / rate}}
    (staging / "meta.json").write_text(json.dumps(packed))
    size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return size


def pack_corpus(config: PackConfig) -> tuple[int, int]:
    """Pack `config.tracks` evenly spaced tracks of the corpus; returns (tracks, bytes)."""
    tracks = sorted(p for p in config.corpus.iterdir() if (p / "meta.json").exists())
    if not tracks:
        raise ValueError(f"{config.corpus} holds no rendered tracks (no */meta.json); render one with "
                         "`stemquery data prepare`")
    chosen = [tracks[i] for i in np.unique(np.linspace(0, len(tracks) - 1, min(config.tracks, len(tracks)))
                                           .round().astype(int))]
    config.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for track_dir in chosen:
        total += pack_track(track_dir, config.out / track_dir.name, config)
    index = {"packed_from": str(config.corpus), "seconds": config.seconds, "compression": config.compression,
             "tracks": [p.name for p in chosen]}
    (config.out / "index.json").write_text(json.dumps(index, indent=1))
    log.info("packed %d tracks of %s into %s: %.1f MB", len(chosen), config.corpus, config.out, total / 1e6)
    return len(chosen), total
