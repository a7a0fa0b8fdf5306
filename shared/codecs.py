"""Wire codecs: protobuf (the default) and the proto3 JSON mapping of Transaction.

Producers without our schema publish JSON (field names per the protobuf JSON mapping,
camelCase or the original snake_case). Decoding never raises anything but `DecodeError`, whose
`field` names the culprit (dotted, e.g. `amount.units`), so ingest can dead-letter the record with
a message the producer can act on.
"""

from __future__ import annotations

import json
import re
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtobufDecodeError

from protos.fraud.v1 import transaction_pb2
from shared.errors import DecodeError

__all__ = [
    "JSON_CONTENT_TYPE",
    "PROTOBUF_CONTENT_TYPE",
    "decode_transaction",
    "decode_transaction_json",
    "decode_transaction_protobuf",
    "looks_like_json",
    "transaction_to_json",
]

JSON_CONTENT_TYPE = "application/json"
PROTOBUF_CONTENT_TYPE = "application/x-protobuf"

_FAILED_FIELD = re.compile(r"Failed to parse (\w+) field")
_AT_FIELD = re.compile(r" at Transaction\.([\w.]+)")
_NO_FIELD = re.compile(r'has no field named "([^"]+)"')


def looks_like_json(payload: bytes) -> bool:
    """A JSON object starts with `{` (after whitespace); a Transaction in protobuf never does,
    since its first byte is a field tag and `{` (0x7b) would be field 15 with wire type 3, a
    deprecated group that our schema does not have."""
    return payload.lstrip()[:1] == b"{"


def decode_transaction_protobuf(payload: bytes) -> transaction_pb2.Transaction:
    message = transaction_pb2.Transaction()
    try:
        message.ParseFromString(payload)
    except (ProtobufDecodeError, RuntimeError, ValueError) as e:
        raise DecodeError("UNDECODABLE", f"not a protobuf Transaction: {e}") from None
    return message


def _field_from_parse_error(text: str) -> str:
    if match := _NO_FIELD.search(text):
        return match.group(1)
    if match := _AT_FIELD.search(text):
        return match.group(1).rstrip(".")
    return ".".join(_FAILED_FIELD.findall(text))


def decode_transaction_json(payload: bytes | str | dict[str, Any]) -> transaction_pb2.Transaction:
    """Decode the JSON mapping of Transaction; unknown fields are an error, not ignored, so a
    producer's typo (`ammount`) is reported instead of silently dropping the amount."""
    if isinstance(payload, dict):
        document: Any = payload
    else:
        try:
            document = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise DecodeError("INVALID_JSON", f"payload is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise DecodeError(
            "INVALID_JSON", f"a Transaction must be a JSON object, got {type(document).__name__}"
        )
    message = transaction_pb2.Transaction()
    try:
        json_format.ParseDict(document, message, ignore_unknown_fields=False)
    except json_format.ParseError as e:
        text = str(e)
        field = _field_from_parse_error(text)
        code = "UNKNOWN_FIELD" if _NO_FIELD.search(text) else "INVALID_FIELD"
        raise DecodeError(code, f"{field or 'transaction'}: {text}", field=field) from None
    except (TypeError, ValueError, RecursionError, AttributeError) as e:
        raise DecodeError("INVALID_JSON", f"payload does not map to a Transaction: {e}") from None
    return message


def decode_transaction(
    payload: bytes | None, content_type: str | None = None
) -> transaction_pb2.Transaction:
    """Protobuf by default; JSON when the content-type header says so or the payload is a JSON
    object."""
    if payload is None:
        raise DecodeError("EMPTY_PAYLOAD", "record has no value (tombstone or null payload)")
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared == JSON_CONTENT_TYPE:
        return decode_transaction_json(payload)
    if declared == PROTOBUF_CONTENT_TYPE or not looks_like_json(payload):
        return decode_transaction_protobuf(payload)
    try:
        return decode_transaction_json(payload)
    except DecodeError as json_error:
        # Rare but possible: protobuf bytes that start like JSON after whitespace stripping
        # (a 0x0a tag then a length byte of 123). Only when the bytes are not JSON at all.
        if json_error.code != "INVALID_JSON":
            raise
        try:
            return decode_transaction_protobuf(payload)
        except DecodeError:
            raise json_error from None


def transaction_to_json(transaction: transaction_pb2.Transaction) -> str:
    return json.dumps(json_format.MessageToDict(transaction), separators=(",", ":"))
