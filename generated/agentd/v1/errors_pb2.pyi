from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_ARGUMENT: _ClassVar[ErrorReason]
    ERROR_REASON_UNAUTHENTICATED: _ClassVar[ErrorReason]
    ERROR_REASON_PERMISSION_DENIED: _ClassVar[ErrorReason]
    ERROR_REASON_AGENT_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_RUN_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_TRACE_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_AGENT_EXISTS: _ClassVar[ErrorReason]
    ERROR_REASON_AGENT_READ_ONLY: _ClassVar[ErrorReason]
    ERROR_REASON_VERSION_CONFLICT: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_EXISTS: _ClassVar[ErrorReason]
    ERROR_REASON_DUPLICATE_REQUEST: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_BUSY: _ClassVar[ErrorReason]
    ERROR_REASON_RUN_NOT_WAITING: _ClassVar[ErrorReason]
    ERROR_REASON_ANSWER_CONFLICT: _ClassVar[ErrorReason]
    ERROR_REASON_QUEUE_FULL: _ClassVar[ErrorReason]
    ERROR_REASON_TENANT_LIMIT: _ClassVar[ErrorReason]
    ERROR_REASON_SERVER_OVERLOADED: _ClassVar[ErrorReason]
    ERROR_REASON_STREAM_LAGGED: _ClassVar[ErrorReason]
    ERROR_REASON_STORE_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_DRAINING: _ClassVar[ErrorReason]
    ERROR_REASON_AUTH_UNAVAILABLE: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_INVALID_ARGUMENT: ErrorReason
ERROR_REASON_UNAUTHENTICATED: ErrorReason
ERROR_REASON_PERMISSION_DENIED: ErrorReason
ERROR_REASON_AGENT_NOT_FOUND: ErrorReason
ERROR_REASON_SESSION_NOT_FOUND: ErrorReason
ERROR_REASON_RUN_NOT_FOUND: ErrorReason
ERROR_REASON_TRACE_NOT_FOUND: ErrorReason
ERROR_REASON_AGENT_EXISTS: ErrorReason
ERROR_REASON_AGENT_READ_ONLY: ErrorReason
ERROR_REASON_VERSION_CONFLICT: ErrorReason
ERROR_REASON_SESSION_EXISTS: ErrorReason
ERROR_REASON_DUPLICATE_REQUEST: ErrorReason
ERROR_REASON_SESSION_BUSY: ErrorReason
ERROR_REASON_RUN_NOT_WAITING: ErrorReason
ERROR_REASON_ANSWER_CONFLICT: ErrorReason
ERROR_REASON_QUEUE_FULL: ErrorReason
ERROR_REASON_TENANT_LIMIT: ErrorReason
ERROR_REASON_SERVER_OVERLOADED: ErrorReason
ERROR_REASON_STREAM_LAGGED: ErrorReason
ERROR_REASON_STORE_UNAVAILABLE: ErrorReason
ERROR_REASON_DRAINING: ErrorReason
ERROR_REASON_AUTH_UNAVAILABLE: ErrorReason
