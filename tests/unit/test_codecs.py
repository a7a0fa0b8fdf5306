"""Codecs: protobuf and the JSON mapping; every failure is a DecodeError naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.fraud.v1 import transaction_pb2
from shared.codecs import decode_transaction, decode_transaction_json, transaction_to_json
from shared.errors import DecodeError

VALID = {
    "transactionId": "tx-1",
    "accountId": "acct-1",
    "cardId": "card-1",
    "merchantId": "m-1",
    "merchantCategory": "5411",
    "terminalId": "t-1",
    "amount": {"units": "1234", "currency": "EUR"},
    "eventTime": "2026-11-25T10:00:00Z",
    "country": "NL",
    "latitude": 52.37,
    "longitude": 4.89,
    "channel": "CHANNEL_CARD_PRESENT",
    "deviceId": "dev-1",
    "ipAddress": "192.0.2.1",
    "attributes": {"wallet": "apple"},
}


def test_json_round_trip_matches_protobuf() -> None:
    message = decode_transaction(json.dumps(VALID).encode())
    assert message.amount.units == 1234
    assert message.channel == transaction_pb2.CHANNEL_CARD_PRESENT
    assert message.HasField("latitude")
    again = decode_transaction(message.SerializeToString())
    assert again == message
    assert decode_transaction_json(transaction_to_json(message)) == message


def test_snake_case_names_and_content_type_header() -> None:
    document = {"transaction_id": "tx-2", "account_id": "a", "amount": {"units": 5}}
    message = decode_transaction(json.dumps(document).encode(), "application/json; charset=utf-8")
    assert message.transaction_id == "tx-2"
    assert message.amount.units == 5


@pytest.mark.parametrize(
    ("document", "code", "field"),
    [
        ({"amount": {"units": "abc"}}, "INVALID_FIELD", "amount.units"),
        ({"amount": {"units": 12.5}}, "INVALID_FIELD", "amount.units"),
        ({"eventTime": "yesterday"}, "INVALID_FIELD", "eventTime"),
        ({"channel": "PIGEON"}, "INVALID_FIELD", "channel"),
        ({"latitude": "north"}, "INVALID_FIELD", "latitude"),
        ({"ammount": {"units": 1}}, "UNKNOWN_FIELD", "ammount"),
        ({"attributes": {"a": 1}}, "INVALID_FIELD", "attributes"),
    ],
)
def test_json_errors_name_the_field(document: dict[str, Any], code: str, field: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_transaction(json.dumps(document).encode())
    assert caught.value.code == code
    assert caught.value.field == field
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", "INVALID_JSON"),
        (b"[1, 2]", "UNDECODABLE"),  # not an object: tried as protobuf, fails as protobuf
        (b"\xff\xff\xff", "UNDECODABLE"),
        (None, "EMPTY_PAYLOAD"),
    ],
)
def test_undecodable_payloads(payload: bytes | None, code: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_transaction(payload)
    assert caught.value.code == code


def test_json_header_on_non_object() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_transaction(b"[1, 2]", "application/json")
    assert caught.value.code == "INVALID_JSON"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*VALID.keys(), "extra", "units"]), json_values, max_size=8))
def test_arbitrary_json_is_decoded_or_rejected_with_a_code(document: dict[str, Any]) -> None:
    try:
        payload = json.dumps(document).encode()
    except ValueError:
        return
    try:
        decode_transaction(payload)
    except DecodeError as e:
        assert e.code in {"INVALID_JSON", "INVALID_FIELD", "UNKNOWN_FIELD"}
        assert str(e)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_else(payload: bytes) -> None:
    try:
        decode_transaction(payload)
    except DecodeError as e:
        assert e.code


@settings(max_examples=100, deadline=None)
@given(
    transaction_id=st.text(min_size=1, max_size=40),
    units=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    latitude=st.floats(allow_nan=False, allow_infinity=False),
)
def test_valid_json_round_trips(transaction_id: str, units: int, latitude: float) -> None:
    document = {**VALID, "transactionId": transaction_id, "latitude": latitude}
    document["amount"] = {"units": str(units), "currency": "EUR"}
    message = decode_transaction_json(json.dumps(document))
    assert message.transaction_id == transaction_id
    assert message.amount.units == units
    assert message.latitude == latitude
