"""The `fraudstream` command: one front door for operators.

    fraudstream infra up|down|status     local Kafka and Redis without Docker
    fraudstream topics                   create the topics (idempotent)
    fraudstream run                      the whole suite with the simulator and a live view
    fraudstream simulate                 publish a simulated workload with known fraud
    fraudstream train                    fit the model from labeled transactions
    fraudstream evaluate                 AUC, average precision, card precision@100
    fraudstream alerts tail              print alerts live

Each subcommand lives in its own module with a `register(subparsers)` function; a module that
is not importable (a missing optional piece) is left out of the help rather than breaking it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

_COMMAND_MODULES = (
    "shared.infra",
    "shared.topics_cli",
    "shared.run",
    "shared.simulation.cli",
    "shared.training",
    "shared.evaluation",
    "shared.alerts_tail",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fraudstream",
        description="Real-time fraud detection on Kafka and Redis.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Configuration comes from environment variables; see the README's table.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue  # that command is not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    result = handler(args)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
