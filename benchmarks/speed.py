"""Speed and memory of every stemquery engine beside HTDemucs, in one run on one machine.

    python benchmarks/speed.py [--lengths 10 60 600] [--runs 3] [--threads 2] [--out docs/performance.json]
                               [--systems ...] [--plot docs/performance.png] [--weights CANDIDATE]

Set-up: `pip install -e '.[bench]' && pip install --no-deps demucs==4.1.0`.

Each (system, length) is measured in a fresh subprocess: load, one warm-up on 2 s (not timed), then `--runs`
timed separations of stereo 44.1 kHz noise-like music of that length; the median wall time is reported, with
the real-time factor (wall / audio seconds) and the process's peak RSS, which includes the mix and the two stems
it returns (three copies of the audio, shown beside it). Ratios are to HTDemucs at the same
length: absolute times on a shared machine drift, ratios measured in one run hold.

Peers: HTDemucs from the `demucs` package (4.1.0 imports without torchaudio) with RANDOM weights, since its
weights cannot be downloaded here; speed does not depend on the weights' values. Open-Unmix is left out: the
`openunmix` package imports torchaudio at import time, and torchaudio has no build for torch 2.13 on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RATE = 44100
#: stemquery's engines (the refiner at 1 step, the shipped default, and at 5 and 10) and the peer.
SYSTEMS = ["nmf", "bsmamba", "bsmamba-refine1", "bsmamba-refine5", "bsmamba-refine10", "htdemucs"]
WEIGHTS_NOTE = "HTDemucs: random weights (speed does not depend on weight values); Open-Unmix: not measured " \
               "(openunmix imports torchaudio, which has no build for torch 2.13 CPU)"


def test_signal(seconds: float, seed: int = 0):
    """Harmonic tones with noise bursts: a stand-in for music (speed does not depend on the content). Built in
    float32, 10 s at a time, so that making it does not set the process's peak RSS."""
    import numpy as np

    rng = np.random.default_rng(seed)
    frequencies = rng.uniform(80, 2000, 6)
    total, block = int(seconds * RATE), 10 * RATE
    mono = np.empty(total, np.float32)
    for start in range(0, total, block):
        t = np.arange(start, min(total, start + block)) / RATE
        tones = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate(frequencies, 1))
        noise = rng.standard_normal(t.size) * (np.sin(2 * np.pi * 2 * t) > 0.5)
        mono[start: start + t.size] = 0.2 * tones + 0.05 * noise
    return np.stack([mono, 0.8 * mono]), np.stack([mono[: 4 * RATE]] * 2)


def make_runner(system: str, weights: Path | None = None):
    """A function mix → target for `system`, with everything loaded (the warm part); `weights`: the bsmamba
    systems' separator weights instead of the shipped ones (a candidate's: its speed before it ships)."""
    import torch

    if system == "htdemucs":
        from demucs.apply import apply_model
        from demucs.htdemucs import HTDemucs

        model = HTDemucs(sources=["drums", "bass", "other", "vocals"]).eval()

        def run(mix, query):
            with torch.inference_mode():
                return apply_model(model, torch.from_numpy(mix)[None], split=True, overlap=0.25)[0]

        return run, "random weights"
    from stemquery.model import Separator

    if system.startswith("bsmamba"):
        separator, note = bsmamba_separator(system, weights)
    else:
        separator, note = Separator(system, device="cpu"), ""

    def run(mix, query):
        return separator.separate(mix, RATE, [query]).target

    return run, note


def bsmamba_separator(system: str, weights: Path | None = None):
    """`weights`, else the shipped weights where they exist, else the shipped configs with random weights (same
    speed)."""
    import tempfile

    from stemquery.model import Separator
    from stemquery.model.bsmamba import BSMamba
    from stemquery.model.engines.bsmamba import BSMambaEngine, REFINER_NAME, save_weights, weights_paths

    options, notes = {}, []
    if weights:
        options["weights"] = weights
        notes.append(f"separator: {weights}")
    elif BSMambaEngine.unavailable_reason():
        from stemquery.model.train import SeparatorTrainConfig

        path = Path(tempfile.mkdtemp()) / "random"
        save_weights(BSMamba(SeparatorTrainConfig.load(Path("model/configs/bsmamba.toml")).model), path)
        options["weights"] = path
        notes.append("separator: random weights")
    else:
        notes.append("separator: shipped weights")
    if "-refine" in system:
        options.update(refine=True, steps=int(system.rpartition("refine")[2]))
        if not weights_paths(REFINER_NAME)[0].exists():
            from stemquery.model.refiner import LatentRefiner
            from stemquery.model.refiner import save_refiner
            from stemquery.model.train_refiner import RefinerTrainConfig, VAETrainConfig
            from stemquery.model.vae import TimbrePitchVAE

            vae = TimbrePitchVAE(VAETrainConfig.load(Path("model/configs/vae.toml")).model)
            refiner = LatentRefiner(RefinerTrainConfig.load(Path("model/configs/refiner.toml")).model, vae)
            path = Path(tempfile.mkdtemp()) / "refiner"
            save_refiner(refiner, path)
            options["refiner_weights"] = path
            notes.append("refiner: random weights")
        else:
            notes.append("refiner: shipped weights")
    return Separator("bsmamba", device="cpu", **options), "; ".join(notes)


def measure(system: str, seconds: float, runs: int, weights: Path | None = None) -> dict:
    """Runs inside the child process."""
    mix, query = test_signal(seconds)
    run, note = make_runner(system, weights)
    run(*test_signal(2.0, seed=1))  # warm-up, not timed
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run(mix, query)
        times.append(time.perf_counter() - started)
    wall = statistics.median(times)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"system": system, "seconds": seconds, "runs": runs, "wall_s": wall, "rtf": wall / seconds,
            "peak_rss_mb": peak_mb, "audio_mb": mix.nbytes / 2**20, "times": times, "note": note}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.child, args.length, args.runs, args.weights)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=float, nargs="+", default=[10, 60, 600])
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/performance.json"))
    parser.add_argument("--plot", type=Path, default=None, help="Save time and peak RSS against length (PNG).")
    parser.add_argument("--weights", type=Path, default=None,
                        help="Separator weights for the bsmamba systems (a candidate's), instead of the shipped.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows = []
    for seconds in args.lengths:
        for system in args.systems:
            result = subprocess.run([sys.executable, __file__, "--child", system, "--length", str(seconds),
                                     "--runs", str(args.runs), "--threads", str(args.threads),
                                     *(["--weights", str(args.weights)] if args.weights else [])],
                                    capture_output=True, text=True, env=env)
            if result.returncode != 0:
                print(f"{system} at {seconds:g} s failed:\n{result.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"{system:>9} {seconds:6.0f} s  wall {row['wall_s']:8.2f} s  RTF {row['rtf']:.4f}  "
                  f"peak RSS {row['peak_rss_mb']:7.0f} MB  ({row['note'] or 'n/a'})", flush=True)
    reference = {r["seconds"]: r["rtf"] for r in rows if r["system"] == "htdemucs"}
    for row in rows:
        row["speedup_vs_htdemucs"] = reference[row["seconds"]] / row["rtf"] if row["seconds"] in reference else None
    report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "threads": args.threads, "torch": version("torch"),
              "allocator": os.environ.get("LD_PRELOAD") or "glibc malloc",
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "note": WEIGHTS_NOTE,
              "gpu": "not measured: every row is on the CPU (this script does not time CUDA)", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print()
    print(markdown_table(report))
    if args.plot:
        plot_scaling(report, args.plot)


def plot_scaling(report: dict, path: Path) -> None:
    """Wall time and peak RSS against audio length, one line per system (log-log: linear time is slope 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for system in dict.fromkeys(r["system"] for r in report["rows"]):
        rows = sorted((r for r in report["rows"] if r["system"] == system), key=lambda r: r["seconds"])
        lengths = [r["seconds"] for r in rows]
        time_axis.loglog(lengths, [r["wall_s"] for r in rows], "o-", label=system)
        memory_axis.semilogx(lengths, [r["peak_rss_mb"] for r in rows], "o-", label=system)
    lengths = sorted({r["seconds"] for r in report["rows"]})
    audio_mb = {r["seconds"]: r["audio_mb"] for r in report["rows"]}
    memory_axis.semilogx(lengths, [3 * audio_mb[s] for s in lengths], "k--", label="mix + target + residual")
    memory_axis.legend(fontsize=8)
    time_axis.set(xlabel="audio length (s, stereo 44.1 kHz)", ylabel="wall time (s, median)",
                  title=f"time ({report['threads']} threads)")
    memory_axis.set(xlabel="audio length (s)", ylabel="peak RSS (MB)", title="memory")
    time_axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def markdown_table(report: dict) -> str:
    lines = ["| system | audio | wall (median) | RTF | × faster than HTDemucs | peak RSS | of which mix + stems |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        ratio = f"{r['speedup_vs_htdemucs']:.1f}×" if r["speedup_vs_htdemucs"] else "n/a"
        lines.append(f"| {r['system']} | {r['seconds']:.0f} s | {r['wall_s']:.2f} s | {r['rtf']:.4f} | {ratio} | "
                     f"{r['peak_rss_mb']:.0f} MB | {3 * r['audio_mb']:.0f} MB |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
