"""Where `bsmamba`'s inference time goes: torch.profiler's top operators and the share of each part of the network.

    python benchmarks/profile_bsmamba.py [--seconds 20] [--threads 2] [--rows 15]

Runs the shipped weights (or the shipped config with random weights: the cost does not depend on the values) on
one segment of stereo noise, after a warm-up, as the engine runs it (on CPU: the sequence layers slice by slice on
worker threads, `model/parallel.py`). Prints the wall time of each part (band split, the time-axis and band-axis
BiMamba2 layers, FiLM, mask) as a median of 7, then the profiler's operator table for one forward pass on one
thread (the profiler does not see the worker threads; this is the work they share).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def median_ms(function, runs: int = 7) -> float:
    function()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="Segment length (the engine's is 20 s).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()

    import torch
    from einops import rearrange
    from torch.profiler import ProfilerActivity, profile

    from speed import bsmamba_separator  # the same weights the speed benchmark uses
    from stemquery.model.parallel import whole

    torch.set_num_threads(args.threads)
    separator, note = bsmamba_separator("bsmamba")
    engine = separator.engine
    model = engine.model
    audio = torch.randn(2, int(args.seconds * engine.sample_rate)) * 0.1
    with torch.inference_mode():
        spec = engine._stereo_spec(audio)
        query = model.embed_queries([spec[..., : spec.shape[-1] // 4]])
        from stemquery.model.bsmamba import relative_log_power

        match = (relative_log_power(spec) - query.profile[..., None])[:, None]
        x = model.split(spec, match)
        block, run = model.blocks[0], engine.parallel or whole
        along_time = rearrange(x, "b k t d -> (b k) t d").contiguous()
        along_bands = rearrange(x, "b k t d -> (b t) k d").contiguous()
        layers = len(model.blocks)
        parts = {
            "whole network": median_ms(lambda: model(spec, query, parallel=engine.parallel)),
            "band split": median_ms(lambda: model.split(spec, match, engine.parallel)),
            f"time-axis BiMamba2 × {layers}": layers * median_ms(lambda: run(block.time, along_time)),
            f"band-axis BiMamba2 × {layers}": layers * median_ms(lambda: run(block.band, along_bands)),
            f"FiLM × {layers}": layers * median_ms(lambda: block.film(x, query.embedding)),
            "mask estimation": median_ms(lambda: model.mask(x, engine.parallel)),
            "STFT + iSTFT": median_ms(lambda: engine.stft.inverse(engine._stereo_spec(audio)[0], audio.shape[-1])),
        }
        # The profiler sees the calling thread only: the operator table is of the plain call on one thread,
        # which is the work the slice workers share.
        torch.set_num_threads(1)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
            model(spec, query)
    whole = parts["whole network"]
    print(f"bsmamba, {args.seconds:g} s stereo segment, {args.threads} threads ({note})")
    for name, ms in parts.items():
        print(f"  {name:<24} {ms:8.1f} ms  {100 * ms / whole:5.1f} %")
    print(profiler.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=24, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
