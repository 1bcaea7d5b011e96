"""Submit one separation over OSC and follow it to the end.

    stemquery serve --allow-root ~/Music &
    python examples/osc_client.py --mix ~/Music/song.wav --query ~/Music/solo.wav --out ~/Music/stems

Paths must be absolute and under a folder the server allows (--hotfolder or --allow-root).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stemquery.daw_bridge.client import OscClient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mix", type=Path, required=True)
    parser.add_argument("--query", type=Path, action="append", default=[])
    parser.add_argument("--query-range", help="START:END seconds of the mix to use as the query")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9130)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    options = []
    if args.query_range:
        start, end = (float(x) for x in args.query_range.split(":"))
        options += ["query_start", start, "query_end", end]
    queries = "|".join(str(q.resolve()) for q in args.query)
    with OscClient(args.host, args.port) as client:
        client.send("/stemquery/separate", "example", str(args.mix.resolve()), queries, str(args.out.resolve()),
                    *options)
        while True:
            message = client.receive(timeout=args.timeout)
            if message is None:
                print(f"no answer from {args.host}:{args.port}: is `stemquery serve` running?", file=sys.stderr)
                return 1
            address, values = message
            if address == "/stemquery/accepted":
                print(f"accepted as job {values[1]}")
            elif address == "/stemquery/progress":
                print(f"\r{values[2] * 100:5.1f}% {values[3]:<12}", end="", flush=True)
            elif address == "/stemquery/stem":
                print(f"\n{values[1]}: {values[2]}")
            elif address == "/stemquery/done":
                return 0
            elif address == "/stemquery/error":
                print(f"\nerror ({values[1]}): {values[2]}", file=sys.stderr)
                return 2


if __name__ == "__main__":
    sys.exit(main())
