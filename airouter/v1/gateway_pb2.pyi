import datetime

from airouter.v1 import generate_pb2 as _generate_pb2
from airouter.v1 import host_status_pb2 as _host_status_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoutingPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTING_POLICY_UNSPECIFIED: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_LOCAL_ONLY: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_LOCAL_FIRST: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_CLOUD_ONLY: _ClassVar[RoutingPolicy]

class HostState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOST_STATE_UNSPECIFIED: _ClassVar[HostState]
    HOST_STATE_UP: _ClassVar[HostState]
    HOST_STATE_DOWN: _ClassVar[HostState]
    HOST_STATE_COOLING_DOWN: _ClassVar[HostState]
    HOST_STATE_DRAINING: _ClassVar[HostState]
ROUTING_POLICY_UNSPECIFIED: RoutingPolicy
ROUTING_POLICY_LOCAL_ONLY: RoutingPolicy
ROUTING_POLICY_LOCAL_FIRST: RoutingPolicy
ROUTING_POLICY_CLOUD_ONLY: RoutingPolicy
HOST_STATE_UNSPECIFIED: HostState
HOST_STATE_UP: HostState
HOST_STATE_DOWN: HostState
HOST_STATE_COOLING_DOWN: HostState
HOST_STATE_DRAINING: HostState

class GatewayGenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "chat", "sampling", "stopping", "min_context_length", "routing_policy")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    MIN_CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ROUTING_POLICY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    chat: _generate_pb2.ChatMessages
    sampling: _generate_pb2.SamplingParameters
    stopping: _generate_pb2.StoppingCriteria
    min_context_length: int
    routing_policy: RoutingPolicy
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., chat: _Optional[_Union[_generate_pb2.ChatMessages, _Mapping]] = ..., sampling: _Optional[_Union[_generate_pb2.SamplingParameters, _Mapping]] = ..., stopping: _Optional[_Union[_generate_pb2.StoppingCriteria, _Mapping]] = ..., min_context_length: _Optional[int] = ..., routing_policy: _Optional[_Union[RoutingPolicy, str]] = ...) -> None: ...

class GatewayGenerateResponse(_message.Message):
    __slots__ = ("token", "finished")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    token: _generate_pb2.TokenDelta
    finished: _generate_pb2.Finished
    def __init__(self, token: _Optional[_Union[_generate_pb2.TokenDelta, _Mapping]] = ..., finished: _Optional[_Union[_generate_pb2.Finished, _Mapping]] = ...) -> None: ...

class GatewayListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GatewayListModelsResponse(_message.Message):
    __slots__ = ("models", "unreachable_hosts")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_HOSTS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_generate_pb2.ModelInfo]
    unreachable_hosts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[_Union[_generate_pb2.ModelInfo, _Mapping]]] = ..., unreachable_hosts: _Optional[_Iterable[str]] = ...) -> None: ...

class ListHostsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListHostsResponse(_message.Message):
    __slots__ = ("hosts",)
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    hosts: _containers.RepeatedCompositeFieldContainer[HostInfo]
    def __init__(self, hosts: _Optional[_Iterable[_Union[HostInfo, _Mapping]]] = ...) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("address", "state", "state_detail", "status", "state_since", "requests_in_flight")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_DETAIL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATE_SINCE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    address: str
    state: HostState
    state_detail: str
    status: _host_status_pb2.HostStatus
    state_since: _timestamp_pb2.Timestamp
    requests_in_flight: int
    def __init__(self, address: _Optional[str] = ..., state: _Optional[_Union[HostState, str]] = ..., state_detail: _Optional[str] = ..., status: _Optional[_Union[_host_status_pb2.HostStatus, _Mapping]] = ..., state_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requests_in_flight: _Optional[int] = ...) -> None: ...
