"""The dead-letter contract: header names every fraudstream service puts on a DLQ record.

One reader of `transactions.dlq` understands records from any stage: the original key and value,
plus these headers naming the error (a stable code, a human message, the field at fault), where
the record came from, and which service and version rejected it.
"""

from __future__ import annotations

from importlib import metadata

__all__ = [
    "DLQ_HEADER_CODE",
    "DLQ_HEADER_FIELD",
    "DLQ_HEADER_MESSAGE",
    "DLQ_HEADER_PREFIX",
    "DLQ_HEADER_REDACTED",
    "DLQ_HEADER_SERVICE",
    "DLQ_HEADER_SOURCE_OFFSET",
    "DLQ_HEADER_SOURCE_PARTITION",
    "DLQ_HEADER_SOURCE_TOPIC",
    "DLQ_HEADER_VERSION",
    "SERVICE_VERSION",
]

DLQ_HEADER_PREFIX = "fraudstream."
DLQ_HEADER_CODE = "fraudstream.error.code"
DLQ_HEADER_MESSAGE = "fraudstream.error.message"
DLQ_HEADER_FIELD = "fraudstream.error.field"
DLQ_HEADER_SOURCE_TOPIC = "fraudstream.source.topic"
DLQ_HEADER_SOURCE_PARTITION = "fraudstream.source.partition"
DLQ_HEADER_SOURCE_OFFSET = "fraudstream.source.offset"
DLQ_HEADER_SERVICE = "fraudstream.service"
DLQ_HEADER_VERSION = "fraudstream.service.version"
DLQ_HEADER_REDACTED = "fraudstream.redacted"  # a raw card number found in the record was masked


def _service_version() -> str:
    try:
        return metadata.version("fraudstream")
    except metadata.PackageNotFoundError:  # running from a source tree that was not installed
        return "0+unknown"


SERVICE_VERSION = _service_version()
