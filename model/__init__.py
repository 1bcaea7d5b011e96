"""stemquery's audio side: audio I/O, the engine-agnostic Separator API and the engines.

Nothing here knows about OSC, folders or jobs; the DAW bridge reaches the model only through `Separator`.
"""
import os

# Must happen before torch is imported: with OpenMP's default busy-wait policy two threads on two cores
# spin against each other; PASSIVE measured twice as fast on the 2-core build machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from stemquery.model.errors import StemqueryError, AudioInputError, QueryError, OutputError  # noqa: E402
from stemquery.model.api import Separator, StemQuery, Stems, available_engines, DEFAULT_ENGINE  # noqa: E402

__all__ = [
    "Separator",
    "StemQuery",
    "Stems",
    "available_engines",
    "DEFAULT_ENGINE",
    "StemqueryError",
    "AudioInputError",
    "QueryError",
    "OutputError",
]
