"""
Types of the generated C{message_pb2} (from C{message.proto}; protoc writes no types): the one
C{Message}, its fields and its C{Type} values.  Regenerate the module with protoc, then check that
this stub still matches C{message.proto}.
"""

from typing import Iterable, Optional

from google.protobuf.descriptor import Descriptor, FileDescriptor
from google.protobuf.internal.containers import RepeatedScalarFieldContainer
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import Message as _ProtobufMessage

DESCRIPTOR: FileDescriptor

class Message(_ProtobufMessage):
    DESCRIPTOR: Descriptor
    # enum Type: the values, and the wrapper (Message.Type.Name(value), Message.Type.Value(name))
    Type: EnumTypeWrapper
    UNKNOWN: int
    DATA: int
    STREAM_START: int
    STREAM_RESET: int
    SESSION_RESET: int
    SERVICE_IDS: int
    CONNECTION_START: int
    CONNECTION_RESET: int
    # the fields
    type: int
    streamId: int
    ignorable: bool
    payload: bytes
    serviceId: str
    connectionId: int
    @property
    def availableServiceIds(self) -> RepeatedScalarFieldContainer[str]: ...
    def __init__(
        self,
        *,
        type: Optional[int] = ...,
        streamId: Optional[int] = ...,
        ignorable: Optional[bool] = ...,
        payload: Optional[bytes] = ...,
        serviceId: Optional[str] = ...,
        availableServiceIds: Optional[Iterable[str]] = ...,
        connectionId: Optional[int] = ...,
    ) -> None: ...
