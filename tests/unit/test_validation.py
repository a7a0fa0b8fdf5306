"""Validation: one test per rejection class, normalization, and bad input never escapes uncoded."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from protos.fraud.v1 import transaction_pb2
from shared.codecs import decode_transaction
from shared.config import IngestSettings
from shared.errors import InputError, ValidationError
from shared.validation import (
    COUNTRIES,
    CURRENCY_EXPONENTS,
    ValidationLimits,
    currency_exponent,
    is_luhn_valid,
    looks_like_pan,
    validate_transaction,
)

NOW = 1_790_000_000.0  # a fixed "now": validation takes the clock as an argument
LIMITS = ValidationLimits()


def make_tx(**overrides: Any) -> transaction_pb2.Transaction:
    """A valid transaction; keyword overrides replace fields (None clears a field)."""
    tx = transaction_pb2.Transaction(
        transaction_id="tx-1",
        account_id="acct-1",
        card_id="card-tok-1",
        merchant_id="m-1",
        merchant_category="5411",
        terminal_id="t-1",
        amount=transaction_pb2.Money(units=1234, currency="EUR"),
        country="NL",
        latitude=52.37,
        longitude=4.89,
        channel=transaction_pb2.CHANNEL_CARD_PRESENT,
        device_id="dev-1",
        ip_address="192.0.2.1",
        attributes={"wallet": "apple"},
    )
    tx.event_time.FromSeconds(int(NOW) - 60)
    for name, value in overrides.items():
        if value is None:
            tx.ClearField(name)
        elif name == "amount":
            tx.amount.CopyFrom(value)
        elif name == "event_time_s":
            tx.event_time.FromSeconds(value)
        else:
            setattr(tx, name, value)
    return tx


def rejection(
    tx: transaction_pb2.Transaction, limits: ValidationLimits = LIMITS
) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        validate_transaction(tx, limits, NOW)
    error = caught.value
    assert error.field, "every rejection names a field"
    assert error.field.split(".")[0] in error.message or error.code == "PAN_IN_CARD_ID"
    return error


def test_valid_transaction_passes_and_is_not_mutated() -> None:
    tx = make_tx()
    before = tx.SerializeToString(deterministic=True)
    result = validate_transaction(tx, LIMITS, NOW)
    assert result == tx
    assert result is not tx
    assert tx.SerializeToString(deterministic=True) == before


def test_in_place_normalizes_the_given_message() -> None:
    tx = make_tx(country=" nl ")
    assert validate_transaction(tx, LIMITS, NOW, in_place=True) is tx
    assert tx.country == "NL"


def test_normalizes_strings_codes_and_ip() -> None:
    tx = make_tx(
        transaction_id="  tx-9 \t",
        account_id=" acct-9",
        merchant_category=" 5999 ",
        country=" nl ",
        amount=transaction_pb2.Money(units=5, currency=" eur"),
        ip_address=" 2001:DB8:0:0:0:0:0:1 ",
        device_id="   ",
    )
    result = validate_transaction(tx, LIMITS, NOW)
    assert result.transaction_id == "tx-9"
    assert result.account_id == "acct-9"
    assert result.merchant_category == "5999"
    assert result.country == "NL"
    assert result.amount.currency == "EUR"
    assert result.ip_address == "2001:db8::1"
    assert result.device_id == ""


def test_optional_fields_may_be_absent() -> None:
    tx = make_tx(
        terminal_id="",
        device_id="",
        ip_address="",
        merchant_category="",
        latitude=None,
        longitude=None,
        channel=transaction_pb2.CHANNEL_UNSPECIFIED,
    )
    tx.attributes.clear()
    validate_transaction(tx, LIMITS, NOW)


def test_unknown_protobuf_fields_are_dropped() -> None:
    # Field 99, varint 1: what a newer schema's producer could send.
    payload = make_tx().SerializeToString() + b"\x98\x06\x01"
    decoded = transaction_pb2.Transaction.FromString(payload)
    result = validate_transaction(decoded, LIMITS, NOW)
    assert result.SerializeToString(deterministic=True) == make_tx().SerializeToString(
        deterministic=True
    )


@pytest.mark.parametrize("name", ["transaction_id", "account_id", "card_id", "merchant_id"])
def test_missing_required_id(name: str) -> None:
    error = rejection(make_tx(**{name: "   "}))
    assert (error.code, error.field) == ("MISSING_FIELD", name)


@pytest.mark.parametrize(
    ("field", "message"),
    [("amount", "amount is required"), ("event_time", "event_time is required")],
)
def test_missing_required_message(field: str, message: str) -> None:
    error = rejection(make_tx(**{field: None}))
    assert (error.code, error.field, error.message) == ("MISSING_FIELD", field, message)


def test_missing_country_and_currency() -> None:
    assert rejection(make_tx(country="")).field == "country"
    error = rejection(make_tx(amount=transaction_pb2.Money(units=1, currency="")))
    assert (error.code, error.field) == ("MISSING_FIELD", "amount.currency")


@pytest.mark.parametrize("name", ["transaction_id", "account_id", "terminal_id", "device_id"])
def test_id_too_long(name: str) -> None:
    error = rejection(make_tx(**{name: "x" * 129}))
    assert (error.code, error.field) == ("FIELD_TOO_LONG", name)
    validate_transaction(make_tx(**{name: "x" * 128}), LIMITS, NOW)


@pytest.mark.parametrize("value", ["tx\x00-1", "tx\n1", "a\x1bb", "a\x85b"])
def test_control_characters_in_ids(value: str) -> None:
    error = rejection(make_tx(transaction_id=value))
    assert (error.code, error.field) == ("INVALID_CHARACTERS", "transaction_id")


@pytest.mark.parametrize(
    "card_id",
    ["4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111", "378282246310005"],
)
def test_raw_card_number_in_card_id(card_id: str) -> None:
    error = rejection(make_tx(card_id=card_id))
    assert (error.code, error.field) == ("PAN_IN_CARD_ID", "card_id")
    digits = card_id.replace(" ", "").replace("-", "")
    assert digits not in error.message, "the number itself must never be echoed"


@pytest.mark.parametrize(
    "card_id", ["4111111111111112", "tok_4111111111111111", "411111111111", "card-1"]
)
def test_tokens_that_are_not_pans_pass(card_id: str) -> None:
    validate_transaction(make_tx(card_id=card_id), LIMITS, NOW)


def test_luhn() -> None:
    assert is_luhn_valid("79927398713")
    assert not is_luhn_valid("79927398710")
    assert looks_like_pan("5555555555554444")
    assert not looks_like_pan("55555555555544445555")  # 20 digits: not a PAN length


@pytest.mark.parametrize("units", [0, -1, -(2**63)])
def test_amount_not_positive(units: int) -> None:
    error = rejection(make_tx(amount=transaction_pb2.Money(units=units, currency="EUR")))
    assert (error.code, error.field) == ("INVALID_AMOUNT", "amount.units")


def test_amount_too_large() -> None:
    limits = ValidationLimits(max_amount_minor=10_000)
    validate_transaction(
        make_tx(amount=transaction_pb2.Money(units=10_000, currency="EUR")), limits, NOW
    )
    error = rejection(make_tx(amount=transaction_pb2.Money(units=10_001, currency="EUR")), limits)
    assert (error.code, error.field) == ("AMOUNT_TOO_LARGE", "amount.units")


@pytest.mark.parametrize("currency", ["XYZ", "EURO", "HRK", "XAU", "€"])
def test_unknown_currency(currency: str) -> None:
    error = rejection(make_tx(amount=transaction_pb2.Money(units=1, currency=currency)))
    assert (error.code, error.field) == ("UNKNOWN_CURRENCY", "amount.currency")


def test_currency_exponents() -> None:
    assert (currency_exponent("EUR"), currency_exponent("JPY"), currency_exponent("BHD")) == (
        2,
        0,
        3,
    )
    assert currency_exponent(" usd ") == 2
    assert currency_exponent("CLF") == 4
    assert all(len(code) == 3 and code.isupper() for code in CURRENCY_EXPONENTS)
    with pytest.raises(KeyError):
        currency_exponent("XXX")


@pytest.mark.parametrize("country", ["XX", "UK", "NLD", "EU", "XK", "1"])
def test_unknown_country(country: str) -> None:
    error = rejection(make_tx(country=country))
    assert (error.code, error.field) == ("UNKNOWN_COUNTRY", "country")


def test_country_table() -> None:
    assert len(COUNTRIES) == 249
    assert {"NL", "US", "GB", "JP", "SS", "BQ", "AQ"} <= COUNTRIES


@pytest.mark.parametrize(
    ("latitude", "longitude", "field"),
    [
        (90.5, 0.0, "latitude"),
        (-91.0, 0.0, "latitude"),
        (0.0, 180.01, "longitude"),
        (0.0, -200.0, "longitude"),
        (math.nan, 0.0, "latitude"),
        (0.0, math.inf, "longitude"),
        (10.0, None, "longitude"),
        (None, 10.0, "latitude"),
    ],
)
def test_invalid_coordinates(latitude: float | None, longitude: float | None, field: str) -> None:
    error = rejection(make_tx(latitude=latitude, longitude=longitude))
    assert (error.code, error.field) == ("INVALID_COORDINATES", field)


def test_coordinate_bounds_are_inclusive() -> None:
    validate_transaction(make_tx(latitude=-90.0, longitude=180.0), LIMITS, NOW)


def test_event_time_in_future() -> None:
    limits = ValidationLimits(max_future_skew_s=300)
    validate_transaction(make_tx(event_time_s=int(NOW) + 300), limits, NOW)
    error = rejection(make_tx(event_time_s=int(NOW) + 301), limits)
    assert (error.code, error.field) == ("EVENT_TIME_IN_FUTURE", "event_time")


def test_event_time_too_old() -> None:
    limits = ValidationLimits(max_age_s=86_400)
    validate_transaction(make_tx(event_time_s=int(NOW) - 86_400), limits, NOW)
    error = rejection(make_tx(event_time_s=int(NOW) - 86_401), limits)
    assert (error.code, error.field) == ("EVENT_TIME_TOO_OLD", "event_time")


@pytest.mark.parametrize(("seconds", "nanos"), [(0, -1), (0, 1_000_000_000), (2**62, 0)])
def test_invalid_event_time(seconds: int, nanos: int) -> None:
    tx = make_tx()
    tx.event_time.seconds = seconds
    tx.event_time.nanos = nanos
    error = rejection(tx)
    assert (error.code, error.field) == ("INVALID_EVENT_TIME", "event_time")


@pytest.mark.parametrize("mcc", ["541", "54111", "ABCD", "54 1"])
def test_invalid_merchant_category(mcc: str) -> None:
    error = rejection(make_tx(merchant_category=mcc))
    assert (error.code, error.field) == ("INVALID_MERCHANT_CATEGORY", "merchant_category")


@pytest.mark.parametrize("ip", ["999.1.1.1", "localhost", "1.2.3", "::g"])
def test_invalid_ip_address(ip: str) -> None:
    error = rejection(make_tx(ip_address=ip))
    assert (error.code, error.field) == ("INVALID_IP_ADDRESS", "ip_address")


def test_invalid_channel() -> None:
    # proto3 enums are open: binary input can carry a number the enum does not define.
    tx = transaction_pb2.Transaction.FromString(make_tx().SerializeToString() + b"\x60\x63")
    error = rejection(tx)
    assert (error.code, error.field) == ("INVALID_CHANNEL", "channel")


def test_attribute_bounds() -> None:
    tx = make_tx()
    tx.attributes.update({f"k{i}": "v" for i in range(65)})
    error = rejection(tx)
    assert (error.code, error.field) == ("TOO_MANY_ATTRIBUTES", "attributes")
    long_value = make_tx()
    long_value.attributes["note"] = "x" * 1025
    error = rejection(long_value)
    assert (error.code, error.field) == ("FIELD_TOO_LONG", "attributes.note")
    long_key = make_tx()
    long_key.attributes["k" * 129] = "v"
    assert rejection(long_key).code == "FIELD_TOO_LONG"


def test_limits_from_settings() -> None:
    limits = ValidationLimits.from_settings(
        IngestSettings(max_amount_minor=7, max_future_skew_s=8, max_age_s=9)
    )
    assert (limits.max_amount_minor, limits.max_future_skew_s, limits.max_age_s) == (7, 8, 9)


# --- never anything but a coded rejection ----------------------------------------------------


def check(payload: bytes, content_type: str | None = None) -> transaction_pb2.Transaction | str:
    """The ingest path for one payload: a normalized transaction, or the rejection code."""
    try:
        return validate_transaction(decode_transaction(payload, content_type), LIMITS, NOW)
    except InputError as error:
        assert isinstance(error.code, str) and error.code.isupper() and error.code
        assert error.message
        return error.code


FUZZ = hypothesis_settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

FIELD_NAMES = [
    "transactionId",
    "account_id",
    "cardId",
    "merchantId",
    "merchantCategory",
    "amount",
    "eventTime",
    "country",
    "latitude",
    "longitude",
    "channel",
    "ipAddress",
    "attributes",
]


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_accepted_or_rejected_with_a_code(payload: bytes) -> None:
    check(payload)
    check(payload, "application/json")


@FUZZ
@given(json_values)
def test_arbitrary_json_is_accepted_or_rejected_with_a_code(document: Any) -> None:
    check(json.dumps(document).encode())


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=len(FIELD_NAMES)))
def test_transaction_shaped_json_is_accepted_or_rejected_with_a_code(
    document: dict[str, Any],
) -> None:
    check(json.dumps(document).encode(), "application/json")


@FUZZ
@given(
    st.fixed_dictionaries(
        {
            "transaction_id": st.text(max_size=140),
            "account_id": st.text(max_size=20),
            "card_id": st.text(alphabet="0123456789 -abc", max_size=22),
            "merchant_id": st.text(max_size=5),
            "merchant_category": st.text(max_size=5),
            "country": st.sampled_from(["NL", "nl", "XX", "", " us "]) | st.text(max_size=3),
            "ip_address": st.text(max_size=10),
            "units": st.integers(min_value=-(2**63), max_value=2**63 - 1),
            "currency": st.sampled_from(["EUR", "jpy", "XYZ", ""]),
            "seconds": st.integers(min_value=-(2**63), max_value=2**63 - 1),
            "nanos": st.integers(min_value=-(2**31), max_value=2**31 - 1),
            "latitude": st.none() | st.floats(),
            "longitude": st.none() | st.floats(),
            "channel": st.integers(min_value=-(2**31), max_value=2**31 - 1),
        }
    )
)
def test_arbitrary_protobuf_fields_are_accepted_or_rejected_with_a_code(
    fields: dict[str, Any],
) -> None:
    tx = transaction_pb2.Transaction()
    for name in ("transaction_id", "account_id", "card_id", "merchant_id", "merchant_category"):
        setattr(tx, name, fields[name])
    tx.country, tx.ip_address = fields["country"], fields["ip_address"]
    tx.amount.units, tx.amount.currency = fields["units"], fields["currency"]
    tx.event_time.seconds, tx.event_time.nanos = fields["seconds"], fields["nanos"]
    for name in ("latitude", "longitude"):
        if fields[name] is not None:
            setattr(tx, name, fields[name])
    tx.channel = fields["channel"]  # an open enum: any int32 is valid on the wire
    result = check(tx.SerializeToString())
    if not isinstance(result, str):
        # Anything accepted is normalized: validating it again changes nothing.
        assert validate_transaction(result, LIMITS, NOW) == result
