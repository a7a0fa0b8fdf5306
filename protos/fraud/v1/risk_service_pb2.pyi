import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from protos.fraud.v1 import transaction_pb2 as _transaction_pb2
from protos.fraud.v1 import scoring_pb2 as _scoring_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckTransactionRequest(_message.Message):
    __slots__ = ("transaction", "record")
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    transaction: _transaction_pb2.Transaction
    record: bool
    def __init__(self, transaction: _Optional[_Union[_transaction_pb2.Transaction, _Mapping]] = ..., record: _Optional[bool] = ...) -> None: ...

class CheckTransactionResponse(_message.Message):
    __slots__ = ("transaction_id", "score", "decision", "reasons", "features", "model_version", "rules_version", "degraded", "recorded")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    score: float
    decision: _scoring_pb2.Decision
    reasons: _containers.RepeatedCompositeFieldContainer[_scoring_pb2.Reason]
    features: _containers.ScalarMap[str, float]
    model_version: str
    rules_version: str
    degraded: bool
    recorded: bool
    def __init__(self, transaction_id: _Optional[str] = ..., score: _Optional[float] = ..., decision: _Optional[_Union[_scoring_pb2.Decision, str]] = ..., reasons: _Optional[_Iterable[_Union[_scoring_pb2.Reason, _Mapping]]] = ..., features: _Optional[_Mapping[str, float]] = ..., model_version: _Optional[str] = ..., rules_version: _Optional[str] = ..., degraded: _Optional[bool] = ..., recorded: _Optional[bool] = ...) -> None: ...

class GetAccountRiskRequest(_message.Message):
    __slots__ = ("account_id",)
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    def __init__(self, account_id: _Optional[str] = ...) -> None: ...

class Assessment(_message.Message):
    __slots__ = ("transaction_id", "score", "decision", "reasons", "scored_at", "model_version", "rules_version")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    SCORED_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    score: float
    decision: _scoring_pb2.Decision
    reasons: _containers.RepeatedCompositeFieldContainer[_scoring_pb2.Reason]
    scored_at: _timestamp_pb2.Timestamp
    model_version: str
    rules_version: str
    def __init__(self, transaction_id: _Optional[str] = ..., score: _Optional[float] = ..., decision: _Optional[_Union[_scoring_pb2.Decision, str]] = ..., reasons: _Optional[_Iterable[_Union[_scoring_pb2.Reason, _Mapping]]] = ..., scored_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_version: _Optional[str] = ..., rules_version: _Optional[str] = ...) -> None: ...

class AccountRisk(_message.Message):
    __slots__ = ("account_id", "velocity", "latest", "open_alert_count")
    class VelocityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    VELOCITY_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    OPEN_ALERT_COUNT_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    velocity: _containers.ScalarMap[str, float]
    latest: Assessment
    open_alert_count: int
    def __init__(self, account_id: _Optional[str] = ..., velocity: _Optional[_Mapping[str, float]] = ..., latest: _Optional[_Union[Assessment, _Mapping]] = ..., open_alert_count: _Optional[int] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("account_id", "page_size", "page_token")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    page_size: int
    page_token: str
    def __init__(self, account_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts", "next_page_token")
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[_scoring_pb2.Alert]
    next_page_token: str
    def __init__(self, alerts: _Optional[_Iterable[_Union[_scoring_pb2.Alert, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchAlertsRequest(_message.Message):
    __slots__ = ("account_id", "after_alert_id")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    after_alert_id: str
    def __init__(self, account_id: _Optional[str] = ..., after_alert_id: _Optional[str] = ...) -> None: ...
