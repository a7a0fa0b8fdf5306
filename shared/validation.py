"""Validate and normalize a decoded Transaction: the contract every stage after ingest relies on.

Pure: no I/O, no clock (the caller passes `now`), no global state. Ingest runs it on every
record from `transactions.raw`; the gRPC query service runs the same function on a
`CheckTransaction` request, so a transaction is judged the same way on both paths.

`validate_transaction` returns a normalized copy (strings trimmed, codes upper-cased, IP
addresses in canonical form, unknown protobuf fields dropped) or raises `ValidationError` with a
stable `code` and the `field` at fault (proto field names, dotted: `amount.units`). Codes:

    MISSING_FIELD               a required field is empty or absent
    FIELD_TOO_LONG              an id, or an attribute key or value, is longer than allowed
    INVALID_CHARACTERS          an id contains control characters
    PAN_IN_CARD_ID              card_id looks like a raw card number (13-19 digits, Luhn valid)
    INVALID_AMOUNT              amount.units is zero or negative
    AMOUNT_TOO_LARGE            amount.units is above the configured maximum
    UNKNOWN_CURRENCY            amount.currency is not an active ISO 4217 code
    UNKNOWN_COUNTRY             country is not an ISO 3166-1 alpha-2 code
    INVALID_COORDINATES         latitude/longitude out of range, not finite, or only one given
    INVALID_EVENT_TIME          event_time is not a valid timestamp
    EVENT_TIME_IN_FUTURE        event_time is further ahead of `now` than the allowed skew
    EVENT_TIME_TOO_OLD          event_time is older than the retention window
    INVALID_MERCHANT_CATEGORY   merchant_category is not a 4-digit MCC
    INVALID_IP_ADDRESS          ip_address is not an IPv4 or IPv6 address
    INVALID_CHANNEL             channel is not a value of the Channel enum
    TOO_MANY_ATTRIBUTES         more free attributes than allowed

The first violation found is reported (ids, amount, time, codes, location, attributes), so a
producer fixes one thing at a time but always gets a message naming the field.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from protos.fraud.v1 import transaction_pb2
from shared.config import IngestSettings
from shared.errors import ValidationError

__all__ = [
    "COUNTRIES",
    "CURRENCY_EXPONENTS",
    "OPTIONAL_IDS",
    "REQUIRED_IDS",
    "ValidationLimits",
    "currency_exponent",
    "is_luhn_valid",
    "looks_like_pan",
    "validate_transaction",
]


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Active ISO 4217 codes and their minor-unit exponents (digits after the decimal point). Only
# codes with a defined exponent: precious metals, SDR and test codes (XAU, XDR, XTS, XXX...) have
# none and are not money we score. Codes withdrawn but still in a changeover (ANG -> XCG in 2025,
# BGN -> EUR in 2026) stay accepted until producers have moved; fully withdrawn ones (HRK, ZWL,
# SLL, VEF, MRO, STD) are rejected.
CURRENCY_EXPONENTS: Final[Mapping[str, int]] = MappingProxyType(
    {
        **dict.fromkeys(
            _words(
                "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD "
                "BTN BWP BYN BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUC CUP CVE CZK DKK DOP DZD "
                "EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR "
                "IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP "
                "MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN "
                "QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB "
                "TJS TMT TOP TRY TTD TWD TZS UAH USD USN UYU UZS VED VES WST XCD XCG YER ZAR ZMW "
                "ZWG"
            ),
            2,
        ),
        **dict.fromkeys(
            _words("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"), 0
        ),
        **dict.fromkeys(_words("BHD IQD JOD KWD LYD OMR TND"), 3),
        **dict.fromkeys(_words("CLF UYW"), 4),
    }
)

# Officially assigned ISO 3166-1 alpha-2 codes (249). User-assigned codes such as XK (Kosovo)
# are not in the standard and are rejected.
COUNTRIES: Final[frozenset[str]] = frozenset(
    _words(
        "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ "
        "BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ "
        "CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ "
        "DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR "
        "GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY "
        "HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP "
        "KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY "
        "MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ "
        "NA NC NE NF NG NI NL NO NP NR NU NZ OM "
        "PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW "
        "SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ "
        "TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ "
        "VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW"
    )
)

# Ids every transaction needs: the idempotency key, the partitioning key, and the two entities
# the velocity features are built on. Terminal and device are absent on some channels (a
# transfer has no terminal, a card-present payment no device), so they are checked only if set.
REQUIRED_IDS: Final[tuple[str, ...]] = ("transaction_id", "account_id", "card_id", "merchant_id")
OPTIONAL_IDS: Final[tuple[str, ...]] = ("terminal_id", "device_id")

# Valid google.protobuf.Timestamp range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
_TIMESTAMP_MIN_S = -62_135_596_800
_TIMESTAMP_MAX_S = 253_402_300_799
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PAN_SEPARATORS = re.compile(r"[ \-]")
_MCC = re.compile(r"[0-9]{4}")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_CANONICAL = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")
_CHANNELS: Final[frozenset[int]] = frozenset(transaction_pb2.Channel.values())


@dataclass(frozen=True)
class ValidationLimits:
    """The configurable bounds of validation; build it with `from_settings` in services."""

    max_amount_minor: int = 100_000_000
    max_future_skew_s: int = 300
    max_age_s: int = 30 * 86400
    max_id_length: int = 128
    max_attributes: int = 64
    max_attribute_key_length: int = 128
    max_attribute_value_length: int = 1024

    @classmethod
    def from_settings(cls, ingest: IngestSettings) -> ValidationLimits:
        return cls(
            max_amount_minor=ingest.max_amount_minor,
            max_future_skew_s=ingest.max_future_skew_s,
            max_age_s=ingest.max_age_s,
        )


def currency_exponent(code: str) -> int:
    """Minor-unit digits of an ISO 4217 code (EUR 2, JPY 0, BHD 3); KeyError if unknown.

    Scoring turns minor units into major units with it (`units / 10**exponent`) so that amount
    features compare across currencies."""
    return CURRENCY_EXPONENTS[code.strip().upper()]


def is_luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check every payment card number passes; `digits` must be all digits."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def looks_like_pan(value: str) -> bool:
    """13-19 digits (spaces and dashes ignored, as PANs are often printed) passing Luhn."""
    value = value.strip()
    if len(value) < 13 or not (value[0].isdigit() and value[-1].isdigit()):
        return False  # the common case, a token: no regex needed
    digits = _PAN_SEPARATORS.sub("", value)
    return (
        13 <= len(digits) <= 19 and digits.isascii() and digits.isdigit() and is_luhn_valid(digits)
    )


def _normalized_id(
    tx: transaction_pb2.Transaction, name: str, limits: ValidationLimits, required: bool
) -> None:
    raw: str = getattr(tx, name)
    value = raw.strip()
    if not value:
        if required:
            raise ValidationError("MISSING_FIELD", f"{name} is required and was empty", name)
    elif len(value) > limits.max_id_length:
        raise ValidationError(
            "FIELD_TOO_LONG",
            f"{name} is {len(value)} characters long; at most {limits.max_id_length} allowed",
            name,
        )
    elif _CONTROL.search(value):
        raise ValidationError("INVALID_CHARACTERS", f"{name} contains control characters", name)
    if value is not raw:  # str.strip returns the same object when there is nothing to strip
        setattr(tx, name, value)


def _check_ids(tx: transaction_pb2.Transaction, limits: ValidationLimits) -> None:
    for name in REQUIRED_IDS:
        _normalized_id(tx, name, limits, True)
    for name in OPTIONAL_IDS:
        _normalized_id(tx, name, limits, False)
    if looks_like_pan(tx.card_id):
        # Never echo the number itself: the message goes to logs and DLQ headers.
        raise ValidationError(
            "PAN_IN_CARD_ID",
            "card_id looks like a raw card number (PAN); send the card token instead",
            "card_id",
        )


def _check_amount(tx: transaction_pb2.Transaction, limits: ValidationLimits) -> None:
    if not tx.HasField("amount"):
        raise ValidationError("MISSING_FIELD", "amount is required", "amount")
    amount = tx.amount
    units = amount.units
    if units <= 0:
        raise ValidationError(
            "INVALID_AMOUNT", f"amount.units must be positive, got {units}", "amount.units"
        )
    if units > limits.max_amount_minor:
        raise ValidationError(
            "AMOUNT_TOO_LARGE",
            f"amount.units {units} exceeds the maximum of {limits.max_amount_minor} minor units",
            "amount.units",
        )
    raw_currency = amount.currency
    currency = raw_currency.strip().upper()
    if not currency:
        raise ValidationError("MISSING_FIELD", "amount.currency is required", "amount.currency")
    if currency not in CURRENCY_EXPONENTS:
        raise ValidationError(
            "UNKNOWN_CURRENCY",
            f"amount.currency {_shown(currency)} is not an active ISO 4217 code",
            "amount.currency",
        )
    if currency != raw_currency:  # protobuf setters cost; most producers send it normalized
        amount.currency = currency


def _check_event_time(
    tx: transaction_pb2.Transaction, limits: ValidationLimits, now: float
) -> None:
    if not tx.HasField("event_time"):
        raise ValidationError("MISSING_FIELD", "event_time is required", "event_time")
    timestamp = tx.event_time
    seconds, nanos = timestamp.seconds, timestamp.nanos
    if not (_TIMESTAMP_MIN_S <= seconds <= _TIMESTAMP_MAX_S and 0 <= nanos < 1_000_000_000):
        raise ValidationError(
            "INVALID_EVENT_TIME",
            f"event_time (seconds={seconds}, nanos={nanos}) is not a valid timestamp",
            "event_time",
        )
    event = seconds + nanos / 1e9
    if event > now + limits.max_future_skew_s:
        raise ValidationError(
            "EVENT_TIME_IN_FUTURE",
            f"event_time is {event - now:.0f} s in the future; "
            f"at most {limits.max_future_skew_s} s of clock skew is allowed",
            "event_time",
        )
    if event < now - limits.max_age_s:
        raise ValidationError(
            "EVENT_TIME_TOO_OLD",
            f"event_time is {now - event:.0f} s old; at most {limits.max_age_s} s is accepted",
            "event_time",
        )


def _check_location(tx: transaction_pb2.Transaction) -> None:
    has_lat, has_lon = tx.HasField("latitude"), tx.HasField("longitude")
    if has_lat != has_lon:
        missing = "longitude" if has_lat else "latitude"
        raise ValidationError(
            "INVALID_COORDINATES", "latitude and longitude must be given together", missing
        )
    if not has_lat:
        return
    for name, value, bound in (("latitude", tx.latitude, 90.0), ("longitude", tx.longitude, 180.0)):
        if not (math.isfinite(value) and -bound <= value <= bound):
            raise ValidationError(
                "INVALID_COORDINATES", f"{name} {value} is outside [-{bound}, {bound}]", name
            )


def _check_codes(tx: transaction_pb2.Transaction) -> None:
    raw_country = tx.country
    country = raw_country.strip().upper()
    if not country:
        raise ValidationError("MISSING_FIELD", "country is required", "country")
    if country not in COUNTRIES:
        raise ValidationError(
            "UNKNOWN_COUNTRY",
            f"country {_shown(country)} is not an ISO 3166-1 alpha-2 code",
            "country",
        )
    if country != raw_country:
        tx.country = country
    raw_mcc = tx.merchant_category
    mcc = raw_mcc.strip()
    if mcc and not _MCC.fullmatch(mcc):
        raise ValidationError(
            "INVALID_MERCHANT_CATEGORY",
            f"merchant_category {_shown(mcc)} is not a 4-digit ISO 18245 code",
            "merchant_category",
        )
    if mcc is not raw_mcc:
        tx.merchant_category = mcc
    if tx.channel not in _CHANNELS:
        raise ValidationError(
            "INVALID_CHANNEL", f"channel {tx.channel} is not a known Channel value", "channel"
        )


def _check_ip(tx: transaction_pb2.Transaction) -> None:
    given = tx.ip_address
    raw = given.strip()
    if not raw:
        if given:
            tx.ip_address = ""
        return
    if _IPV4_CANONICAL.fullmatch(raw):  # the common case, already canonical: skip the parse
        if raw is not given:
            tx.ip_address = raw
        return
    try:
        # Canonical form, so one address is one value in "distinct IPs" features.
        tx.ip_address = str(ipaddress.ip_address(raw))
    except ValueError:
        raise ValidationError(
            "INVALID_IP_ADDRESS",
            f"ip_address {_shown(raw)} is not an IPv4 or IPv6 address",
            "ip_address",
        ) from None


def _check_attributes(tx: transaction_pb2.Transaction, limits: ValidationLimits) -> None:
    # Carried through untouched, but bounded: one producer must not bloat every topic downstream.
    attributes = tx.attributes
    if not attributes:
        return
    if len(attributes) > limits.max_attributes:
        raise ValidationError(
            "TOO_MANY_ATTRIBUTES",
            f"{len(attributes)} attributes; at most {limits.max_attributes} allowed",
            "attributes",
        )
    for key, value in attributes.items():
        if len(key) > limits.max_attribute_key_length:
            raise ValidationError(
                "FIELD_TOO_LONG",
                f"attributes: a key is {len(key)} characters long; "
                f"at most {limits.max_attribute_key_length} allowed",
                "attributes",
            )
        if len(value) > limits.max_attribute_value_length:
            raise ValidationError(
                "FIELD_TOO_LONG",
                f"attributes[{_shown(key)}] is {len(value)} characters long; "
                f"at most {limits.max_attribute_value_length} allowed",
                f"attributes.{key}"
                if len(key) <= 64 and not _CONTROL.search(key)
                else "attributes",
            )


def _shown(value: str, limit: int = 32) -> str:
    """A producer's value quoted for a message, cut short: messages go into headers and logs."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def validate_transaction(
    transaction: transaction_pb2.Transaction,
    limits: ValidationLimits,
    now: float,
    *,
    in_place: bool = False,
) -> transaction_pb2.Transaction:
    """Return a normalized copy of `transaction`, or raise ValidationError(code, message, field).

    `now` is the current time in seconds since the epoch (the caller's clock, so tests and
    replays decide what "now" is). The input message is not modified, unless `in_place`: for a
    caller that owns a freshly decoded message (ingest), which then is normalized and returned
    itself, saving a copy per transaction; after a rejection it may be partly normalized.
    """
    if in_place:
        tx = transaction
    else:
        tx = transaction_pb2.Transaction()
        tx.CopyFrom(transaction)
    # Fields of a newer schema version we do not know would otherwise ride along unchecked.
    tx.DiscardUnknownFields()
    _check_ids(tx, limits)
    _check_amount(tx, limits)
    _check_event_time(tx, limits, now)
    _check_codes(tx)
    _check_location(tx)
    _check_ip(tx)
    _check_attributes(tx, limits)
    return tx
