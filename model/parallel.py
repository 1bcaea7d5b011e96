"""CPU inference over a batch of independent sequences: slices of it on worker threads of one intra-op thread each.

PyTorch's own intra-op threading splits every operator over all cores, and at inference sizes each operator of a
BiMamba2 layer streams tensors of tens of MB (a 20 s segment: 32 bands × 862 frames × 324 projections) through
memory, with a barrier after each. Slices of about 2,000 rows (sequences × length), one per worker thread at a
time, keep a slice's tensors in cache and the cores busy between operators: on the 2-core build machine the
time-axis layers run 1.4× and the band-axis layers 1.6× faster (docs/performance.md). The layers treat sequences
independently, so the result equals the whole-batch call to float rounding. The per-band maps of the band split
and the mask estimator (32 small MLPs) share the same workers, band by band (mask: 1.7× faster).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch


def whole(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The plain call, for where no `SliceParallel` is given (training, GPUs)."""
    return layer(x)


class SliceParallel:
    def __init__(self, workers: int, *, rows: int = 2048) -> None:
        self.rows = rows
        # torch.set_num_threads in a worker sets that thread's OpenMP team size only; the caller's is unchanged.
        self._pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,),
                                        thread_name_prefix="stemquery-slice")

    def map(self, function: Callable, items) -> list:
        """[function(item) for item in items], on the workers."""
        if torch.is_grad_enabled():
            raise RuntimeError("SliceParallel is for inference: call it under torch.no_grad or inference_mode")
        inference = torch.is_inference_mode_enabled()

        def run(item):
            with torch.inference_mode(inference), torch.no_grad():  # grad modes are per thread
                return function(item)

        return list(self._pool.map(run, items))

    def __call__(self, layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """`layer` on (sequences, length, features), slice by slice on the workers."""
        return torch.cat(self.map(layer, x.split(max(1, self.rows // x.shape[1]))))

    def close(self) -> None:
        self._pool.shutdown()
