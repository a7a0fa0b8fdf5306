import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from protos.fraud.v1 import transaction_pb2 as _transaction_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_APPROVE: _ClassVar[Decision]
    DECISION_REVIEW: _ClassVar[Decision]
    DECISION_DECLINE: _ClassVar[Decision]

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    SEVERITY_LOW: _ClassVar[Severity]
    SEVERITY_MEDIUM: _ClassVar[Severity]
    SEVERITY_HIGH: _ClassVar[Severity]
    SEVERITY_CRITICAL: _ClassVar[Severity]
DECISION_UNSPECIFIED: Decision
DECISION_APPROVE: Decision
DECISION_REVIEW: Decision
DECISION_DECLINE: Decision
SEVERITY_UNSPECIFIED: Severity
SEVERITY_LOW: Severity
SEVERITY_MEDIUM: Severity
SEVERITY_HIGH: Severity
SEVERITY_CRITICAL: Severity

class Reason(_message.Message):
    __slots__ = ("code", "text", "contribution", "source")
    class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SOURCE_UNSPECIFIED: _ClassVar[Reason.Source]
        SOURCE_RULE: _ClassVar[Reason.Source]
        SOURCE_MODEL: _ClassVar[Reason.Source]
        SOURCE_SHADOW_RULE: _ClassVar[Reason.Source]
        SOURCE_SYSTEM: _ClassVar[Reason.Source]
    SOURCE_UNSPECIFIED: Reason.Source
    SOURCE_RULE: Reason.Source
    SOURCE_MODEL: Reason.Source
    SOURCE_SHADOW_RULE: Reason.Source
    SOURCE_SYSTEM: Reason.Source
    CODE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    code: str
    text: str
    contribution: float
    source: Reason.Source
    def __init__(self, code: _Optional[str] = ..., text: _Optional[str] = ..., contribution: _Optional[float] = ..., source: _Optional[_Union[Reason.Source, str]] = ...) -> None: ...

class ScoredTransaction(_message.Message):
    __slots__ = ("transaction", "score", "decision", "reasons", "features", "model_version", "rules_version", "ingested_at", "scored_at", "degraded")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    INGESTED_AT_FIELD_NUMBER: _ClassVar[int]
    SCORED_AT_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    transaction: _transaction_pb2.Transaction
    score: float
    decision: Decision
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    features: _containers.ScalarMap[str, float]
    model_version: str
    rules_version: str
    ingested_at: _timestamp_pb2.Timestamp
    scored_at: _timestamp_pb2.Timestamp
    degraded: bool
    def __init__(self, transaction: _Optional[_Union[_transaction_pb2.Transaction, _Mapping]] = ..., score: _Optional[float] = ..., decision: _Optional[_Union[Decision, str]] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ..., features: _Optional[_Mapping[str, float]] = ..., model_version: _Optional[str] = ..., rules_version: _Optional[str] = ..., ingested_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., scored_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., degraded: _Optional[bool] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("alert_id", "account_id", "transaction_id", "severity", "score", "decision", "reasons", "created_at", "suppressed_count")
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_COUNT_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    account_id: str
    transaction_id: str
    severity: Severity
    score: float
    decision: Decision
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    created_at: _timestamp_pb2.Timestamp
    suppressed_count: int
    def __init__(self, alert_id: _Optional[str] = ..., account_id: _Optional[str] = ..., transaction_id: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., score: _Optional[float] = ..., decision: _Optional[_Union[Decision, str]] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., suppressed_count: _Optional[int] = ...) -> None: ...
