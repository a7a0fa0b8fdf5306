"""`fraudstream topics`: create every topic with its configured partitions (idempotent)."""

from __future__ import annotations

import argparse
from typing import Any

from shared.config import load_settings
from shared.kafka import ensure_topics
from shared.logging import configure_logging

__all__ = ["register"]


async def _create(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging("topics", settings.log_level, settings.log_format)
    created = await ensure_topics(settings)
    print(f"created: {', '.join(created) or 'none (all topics exist)'}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "topics", help="create the fraudstream topics (idempotent)", description=__doc__
    )
    parser.set_defaults(handler=_create)
