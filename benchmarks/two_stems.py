"""Does asking for a second stem change the first? On every case of an eval set: the target by its clip alone
(`Separator.separate`) against the same clip beside a second stem named after another instrument of the mixture
(`Separator.separate_stems`), SI-SDR of the target estimate against the true target, and whether the files sum to
the mix.

    python benchmarks/two_stems.py data/eval_test [--engine bsmamba] [--limit N]

The other instrument is one of the case's other sources in its rendered track (the corpus named in meta.json),
asked for by its GM program's name, so its bundled example clips are the second query.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from stemquery.model.api import Separator, StemQuery
from stemquery.model.evaluate import case_folders, read_case, si_sdr
from stemquery.model.instruments import name_for_program


def other_instrument(meta: dict) -> str | None:
    """The name of an instrument of the case's track other than the target's (the first such stem), or None."""
    track = json.loads((Path(meta["corpus"]) / meta["track"] / "meta.json").read_text())
    target = name_for_program(meta["program"], meta["family"] == "drums")
    for stem in track["stems"]:
        name = name_for_program(stem["program"], stem["is_drum"])
        if stem["part"] != meta["target"] and name != target:
            return name
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_set", type=Path)
    parser.add_argument("--engine", default="bsmamba")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    separator = Separator(args.engine, device="cpu")
    differences, worst_sum = [], 0.0
    for folder in case_folders(args.eval_set)[: args.limit]:
        case = read_case(folder)
        other = other_instrument(case.meta)
        if other is None:
            continue
        alone = separator.separate(case.mixture, case.sample_rate, [case.query]).target
        stems = separator.separate_stems(case.mixture, case.sample_rate,
                                         {"target": StemQuery(clips=[case.query]), other: StemQuery()})
        worst_sum = max(worst_sum, float(np.abs(sum(stems.values()) - case.mixture).max()))
        differences.append(si_sdr(stems["target"], case.target) - si_sdr(alone, case.target))
    differences = np.array(differences)
    print(f"{args.eval_set}: {len(differences)} cases, engine {args.engine}")
    print(f"SI-SDR of the target, two-stem request minus one-stem request (dB): mean {differences.mean():+.3f}, "
          f"median {np.median(differences):+.3f}, 5th percentile {np.percentile(differences, 5):+.3f}")
    print(f"largest |stems + residual - mix| over every case: {worst_sum:.2e}")


if __name__ == "__main__":
    main()
