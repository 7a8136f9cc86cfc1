import datetime

from airouter.v1 import embed_pb2 as _embed_pb2
from airouter.v1 import generate_pb2 as _generate_pb2
from airouter.v1 import host_status_pb2 as _host_status_pb2
from airouter.v1 import keys_pb2 as _keys_pb2
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

class BatchState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_STATE_UNSPECIFIED: _ClassVar[BatchState]
    BATCH_STATE_IN_PROGRESS: _ClassVar[BatchState]
    BATCH_STATE_COMPLETED: _ClassVar[BatchState]
    BATCH_STATE_CANCELLING: _ClassVar[BatchState]
    BATCH_STATE_CANCELLED: _ClassVar[BatchState]

class BatchItemState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_ITEM_STATE_UNSPECIFIED: _ClassVar[BatchItemState]
    BATCH_ITEM_STATE_PENDING: _ClassVar[BatchItemState]
    BATCH_ITEM_STATE_RUNNING: _ClassVar[BatchItemState]
    BATCH_ITEM_STATE_SUCCEEDED: _ClassVar[BatchItemState]
    BATCH_ITEM_STATE_FAILED: _ClassVar[BatchItemState]
    BATCH_ITEM_STATE_CANCELLED: _ClassVar[BatchItemState]
ROUTING_POLICY_UNSPECIFIED: RoutingPolicy
ROUTING_POLICY_LOCAL_ONLY: RoutingPolicy
ROUTING_POLICY_LOCAL_FIRST: RoutingPolicy
ROUTING_POLICY_CLOUD_ONLY: RoutingPolicy
HOST_STATE_UNSPECIFIED: HostState
HOST_STATE_UP: HostState
HOST_STATE_DOWN: HostState
HOST_STATE_COOLING_DOWN: HostState
HOST_STATE_DRAINING: HostState
BATCH_STATE_UNSPECIFIED: BatchState
BATCH_STATE_IN_PROGRESS: BatchState
BATCH_STATE_COMPLETED: BatchState
BATCH_STATE_CANCELLING: BatchState
BATCH_STATE_CANCELLED: BatchState
BATCH_ITEM_STATE_UNSPECIFIED: BatchItemState
BATCH_ITEM_STATE_PENDING: BatchItemState
BATCH_ITEM_STATE_RUNNING: BatchItemState
BATCH_ITEM_STATE_SUCCEEDED: BatchItemState
BATCH_ITEM_STATE_FAILED: BatchItemState
BATCH_ITEM_STATE_CANCELLED: BatchItemState

class GatewayGenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "chat", "infill", "sampling", "stopping", "min_context_length", "routing_policy", "conversation_id", "output")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    INFILL_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    MIN_CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ROUTING_POLICY_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    chat: _generate_pb2.ChatMessages
    infill: _generate_pb2.Infill
    sampling: _generate_pb2.SamplingParameters
    stopping: _generate_pb2.StoppingCriteria
    min_context_length: int
    routing_policy: RoutingPolicy
    conversation_id: str
    output: _generate_pb2.OutputOptions
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., chat: _Optional[_Union[_generate_pb2.ChatMessages, _Mapping]] = ..., infill: _Optional[_Union[_generate_pb2.Infill, _Mapping]] = ..., sampling: _Optional[_Union[_generate_pb2.SamplingParameters, _Mapping]] = ..., stopping: _Optional[_Union[_generate_pb2.StoppingCriteria, _Mapping]] = ..., min_context_length: _Optional[int] = ..., routing_policy: _Optional[_Union[RoutingPolicy, str]] = ..., conversation_id: _Optional[str] = ..., output: _Optional[_Union[_generate_pb2.OutputOptions, _Mapping]] = ...) -> None: ...

class GatewayGenerateResponse(_message.Message):
    __slots__ = ("token", "finished", "tool_call")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    token: _generate_pb2.TokenDelta
    finished: _generate_pb2.Finished
    tool_call: _generate_pb2.ToolCallDelta
    def __init__(self, token: _Optional[_Union[_generate_pb2.TokenDelta, _Mapping]] = ..., finished: _Optional[_Union[_generate_pb2.Finished, _Mapping]] = ..., tool_call: _Optional[_Union[_generate_pb2.ToolCallDelta, _Mapping]] = ...) -> None: ...

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

class BatchItem(_message.Message):
    __slots__ = ("custom_id", "request")
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    custom_id: str
    request: GatewayGenerateRequest
    def __init__(self, custom_id: _Optional[str] = ..., request: _Optional[_Union[GatewayGenerateRequest, _Mapping]] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("batch_id", "items")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    def __init__(self, batch_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("batch",)
    BATCH_FIELD_NUMBER: _ClassVar[int]
    batch: Batch
    def __init__(self, batch: _Optional[_Union[Batch, _Mapping]] = ...) -> None: ...

class GetBatchRequest(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    def __init__(self, batch_id: _Optional[str] = ...) -> None: ...

class GetBatchResponse(_message.Message):
    __slots__ = ("batch",)
    BATCH_FIELD_NUMBER: _ClassVar[int]
    batch: Batch
    def __init__(self, batch: _Optional[_Union[Batch, _Mapping]] = ...) -> None: ...

class ListBatchesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBatchesResponse(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[Batch]
    def __init__(self, batches: _Optional[_Iterable[_Union[Batch, _Mapping]]] = ...) -> None: ...

class StreamBatchResultsRequest(_message.Message):
    __slots__ = ("batch_id", "after_sequence")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    after_sequence: int
    def __init__(self, batch_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class StreamBatchResultsResponse(_message.Message):
    __slots__ = ("result", "counts")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    result: BatchItemResult
    counts: BatchCounts
    def __init__(self, result: _Optional[_Union[BatchItemResult, _Mapping]] = ..., counts: _Optional[_Union[BatchCounts, _Mapping]] = ...) -> None: ...

class CancelBatchRequest(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    def __init__(self, batch_id: _Optional[str] = ...) -> None: ...

class CancelBatchResponse(_message.Message):
    __slots__ = ("batch",)
    BATCH_FIELD_NUMBER: _ClassVar[int]
    batch: Batch
    def __init__(self, batch: _Optional[_Union[Batch, _Mapping]] = ...) -> None: ...

class BatchCounts(_message.Message):
    __slots__ = ("total", "pending", "running", "succeeded", "failed", "cancelled")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    total: int
    pending: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    def __init__(self, total: _Optional[int] = ..., pending: _Optional[int] = ..., running: _Optional[int] = ..., succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("id", "state", "counts", "created_at", "finished_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: BatchState
    counts: BatchCounts
    created_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[BatchState, str]] = ..., counts: _Optional[_Union[BatchCounts, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class BatchItemResult(_message.Message):
    __slots__ = ("custom_id", "index", "sequence", "state", "text", "finished", "error_code", "error_message", "attempts", "chat", "choices")
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    custom_id: str
    index: int
    sequence: int
    state: BatchItemState
    text: str
    finished: _generate_pb2.Finished
    error_code: str
    error_message: str
    attempts: int
    chat: bool
    choices: _containers.RepeatedCompositeFieldContainer[ChoiceOutput]
    def __init__(self, custom_id: _Optional[str] = ..., index: _Optional[int] = ..., sequence: _Optional[int] = ..., state: _Optional[_Union[BatchItemState, str]] = ..., text: _Optional[str] = ..., finished: _Optional[_Union[_generate_pb2.Finished, _Mapping]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., attempts: _Optional[int] = ..., chat: _Optional[bool] = ..., choices: _Optional[_Iterable[_Union[ChoiceOutput, _Mapping]]] = ...) -> None: ...

class ChoiceOutput(_message.Message):
    __slots__ = ("index", "text", "tool_calls", "logprobs", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[_generate_pb2.ToolCall]
    logprobs: _containers.RepeatedCompositeFieldContainer[_generate_pb2.TokenLogprob]
    reason: _generate_pb2.FinishReason
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[_generate_pb2.ToolCall, _Mapping]]] = ..., logprobs: _Optional[_Iterable[_Union[_generate_pb2.TokenLogprob, _Mapping]]] = ..., reason: _Optional[_Union[_generate_pb2.FinishReason, str]] = ...) -> None: ...

class GatewayCountTokensRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: GatewayGenerateRequest
    def __init__(self, request: _Optional[_Union[GatewayGenerateRequest, _Mapping]] = ...) -> None: ...

class GatewayCountTokensResponse(_message.Message):
    __slots__ = ("input_tokens", "model", "host")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    model: str
    host: str
    def __init__(self, input_tokens: _Optional[int] = ..., model: _Optional[str] = ..., host: _Optional[str] = ...) -> None: ...

class GatewayEmbedRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _embed_pb2.EmbedRequest
    def __init__(self, request: _Optional[_Union[_embed_pb2.EmbedRequest, _Mapping]] = ...) -> None: ...

class GatewayEmbedResponse(_message.Message):
    __slots__ = ("response", "host")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    response: _embed_pb2.EmbedResponse
    host: str
    def __init__(self, response: _Optional[_Union[_embed_pb2.EmbedResponse, _Mapping]] = ..., host: _Optional[str] = ...) -> None: ...
