import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Channel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANNEL_UNSPECIFIED: _ClassVar[Channel]
    CHANNEL_CARD_PRESENT: _ClassVar[Channel]
    CHANNEL_CARD_NOT_PRESENT: _ClassVar[Channel]
    CHANNEL_ECOMMERCE: _ClassVar[Channel]
    CHANNEL_ATM: _ClassVar[Channel]
    CHANNEL_MOBILE: _ClassVar[Channel]
    CHANNEL_TRANSFER: _ClassVar[Channel]
CHANNEL_UNSPECIFIED: Channel
CHANNEL_CARD_PRESENT: Channel
CHANNEL_CARD_NOT_PRESENT: Channel
CHANNEL_ECOMMERCE: Channel
CHANNEL_ATM: Channel
CHANNEL_MOBILE: Channel
CHANNEL_TRANSFER: Channel

class Money(_message.Message):
    __slots__ = ("units", "currency")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    units: int
    currency: str
    def __init__(self, units: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...

class Transaction(_message.Message):
    __slots__ = ("transaction_id", "account_id", "card_id", "merchant_id", "merchant_category", "terminal_id", "amount", "event_time", "country", "latitude", "longitude", "channel", "device_id", "ip_address", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_ID_FIELD_NUMBER: _ClassVar[int]
    MERCHANT_ID_FIELD_NUMBER: _ClassVar[int]
    MERCHANT_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    LATITUDE_FIELD_NUMBER: _ClassVar[int]
    LONGITUDE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    IP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    account_id: str
    card_id: str
    merchant_id: str
    merchant_category: str
    terminal_id: str
    amount: Money
    event_time: _timestamp_pb2.Timestamp
    country: str
    latitude: float
    longitude: float
    channel: Channel
    device_id: str
    ip_address: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, transaction_id: _Optional[str] = ..., account_id: _Optional[str] = ..., card_id: _Optional[str] = ..., merchant_id: _Optional[str] = ..., merchant_category: _Optional[str] = ..., terminal_id: _Optional[str] = ..., amount: _Optional[_Union[Money, _Mapping]] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., country: _Optional[str] = ..., latitude: _Optional[float] = ..., longitude: _Optional[float] = ..., channel: _Optional[_Union[Channel, str]] = ..., device_id: _Optional[str] = ..., ip_address: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("transaction_id", "account_id", "terminal_id", "is_fraud", "source", "reported_at", "event_time")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_ID_FIELD_NUMBER: _ClassVar[int]
    IS_FRAUD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REPORTED_AT_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    account_id: str
    terminal_id: str
    is_fraud: bool
    source: str
    reported_at: _timestamp_pb2.Timestamp
    event_time: _timestamp_pb2.Timestamp
    def __init__(self, transaction_id: _Optional[str] = ..., account_id: _Optional[str] = ..., terminal_id: _Optional[str] = ..., is_fraud: _Optional[bool] = ..., source: _Optional[str] = ..., reported_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
