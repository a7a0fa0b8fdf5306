"""`make bench`: every benchmark under bench/, one after the other, with their own defaults.

Each benchmark prints its figures and the machine it ran on; run one alone with
`python -m bench.<name> --help` for its options.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys

BENCHMARKS = ("ingest_bench", "velocity_bench", "engine_bench", "scoring_bench", "query_bench")


def main() -> int:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.platform()}"
    )
    failures = 0
    for name in BENCHMARKS:
        print(f"\n=== bench.{name}", flush=True)
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as e:
            print(f"skipped: {e}")
            continue
        code = module.main([])
        failures += code != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
