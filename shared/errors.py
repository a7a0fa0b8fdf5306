"""The exceptions fraudstream raises, and what a caller can catch.

    FraudstreamError                 anything of ours
    ├── ConfigError                  a bad environment variable or config value (names it)
    ├── InputError                   a transaction or request that breaks the contract
    │   ├── DecodeError              bytes that are not a Transaction (protobuf or JSON)
    │   └── ValidationError          a decoded Transaction with a bad field
    ├── InfraError                   local Kafka/Redis could not be fetched, started or reached
    ├── RulesFileError               a rules file that cannot be used (old rules stay in force)
    └── ModelFileError               a model artifact that cannot be used (old model stays)

Input errors carry a stable machine `code` (for DLQ headers, metrics and gRPC details) and the
`field` at fault, so a producer can fix its message without reading our source.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DecodeError",
    "FraudstreamError",
    "InputError",
    "ModelFileError",
    "RulesFileError",
    "ValidationError",
]


class FraudstreamError(Exception):
    """Base of every error fraudstream raises on purpose."""


class ConfigError(FraudstreamError):
    """A configuration value is missing or malformed; the message names the variable."""


class InputError(FraudstreamError):
    """An input message breaks the contract. `code` is stable; `field` names the culprit."""

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.field = field
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, field={self.field!r}, {self.message!r})"


class DecodeError(InputError):
    """The bytes could not be decoded into a Transaction at all."""


class ValidationError(InputError):
    """The Transaction decoded but a field is missing, malformed or out of range."""


class RulesFileError(FraudstreamError):
    """A rules file was rejected; the message names the rule and position."""


class ModelFileError(FraudstreamError):
    """A model artifact was rejected; the message names the file and what is wrong."""
