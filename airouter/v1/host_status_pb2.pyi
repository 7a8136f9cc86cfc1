import datetime

from airouter.v1 import generate_pb2 as _generate_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HostStatus(_message.Message):
    __slots__ = ("host_name", "device", "memory", "models", "cache", "observed_at", "draining", "gpus")
    HOST_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    host_name: str
    device: str
    memory: MemoryStatus
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    cache: CacheStatistics
    observed_at: _timestamp_pb2.Timestamp
    draining: bool
    gpus: _containers.RepeatedCompositeFieldContainer[GpuStatus]
    def __init__(self, host_name: _Optional[str] = ..., device: _Optional[str] = ..., memory: _Optional[_Union[MemoryStatus, _Mapping]] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., cache: _Optional[_Union[CacheStatistics, _Mapping]] = ..., observed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., draining: _Optional[bool] = ..., gpus: _Optional[_Iterable[_Union[GpuStatus, _Mapping]]] = ...) -> None: ...

class GpuStatus(_message.Message):
    __slots__ = ("index", "name", "memory_total_bytes", "memory_used_bytes", "utilization_percent", "temperature_celsius", "power_watts")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    POWER_WATTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_percent: int
    temperature_celsius: int
    power_watts: float
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., utilization_percent: _Optional[int] = ..., temperature_celsius: _Optional[int] = ..., power_watts: _Optional[float] = ...) -> None: ...

class MemoryStatus(_message.Message):
    __slots__ = ("total_bytes", "used_bytes", "budget_bytes", "models_bytes")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODELS_BYTES_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    used_bytes: int
    budget_bytes: int
    models_bytes: int
    def __init__(self, total_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., models_bytes: _Optional[int] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "state", "state_detail", "footprint_bytes", "footprint_measured", "slots", "slots_busy", "queue_depth", "requests_in_flight", "recent_tokens_per_second", "recent_time_to_first_token_ms", "pinned", "keep_alive_seconds", "last_used", "load_seconds", "tokens_generated", "cached_prefixes", "engine")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_DETAIL_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINT_MEASURED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_BUSY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    RECENT_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RECENT_TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    CACHED_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: _generate_pb2.ModelState
    state_detail: str
    footprint_bytes: int
    footprint_measured: bool
    slots: int
    slots_busy: int
    queue_depth: int
    requests_in_flight: int
    recent_tokens_per_second: float
    recent_time_to_first_token_ms: float
    pinned: bool
    keep_alive_seconds: float
    last_used: _timestamp_pb2.Timestamp
    load_seconds: float
    tokens_generated: int
    cached_prefixes: _containers.RepeatedCompositeFieldContainer[CachedPrefix]
    engine: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[_generate_pb2.ModelState, str]] = ..., state_detail: _Optional[str] = ..., footprint_bytes: _Optional[int] = ..., footprint_measured: _Optional[bool] = ..., slots: _Optional[int] = ..., slots_busy: _Optional[int] = ..., queue_depth: _Optional[int] = ..., requests_in_flight: _Optional[int] = ..., recent_tokens_per_second: _Optional[float] = ..., recent_time_to_first_token_ms: _Optional[float] = ..., pinned: _Optional[bool] = ..., keep_alive_seconds: _Optional[float] = ..., last_used: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., load_seconds: _Optional[float] = ..., tokens_generated: _Optional[int] = ..., cached_prefixes: _Optional[_Iterable[_Union[CachedPrefix, _Mapping]]] = ..., engine: _Optional[str] = ...) -> None: ...

class CachedPrefix(_message.Message):
    __slots__ = ("hash", "tokens")
    HASH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    hash: int
    tokens: int
    def __init__(self, hash: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class CacheStatistics(_message.Message):
    __slots__ = ("hits", "misses", "evictions", "loads", "load_failures", "load_seconds_total")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    evictions: int
    loads: int
    load_failures: int
    load_seconds_total: float
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., loads: _Optional[int] = ..., load_failures: _Optional[int] = ..., load_seconds_total: _Optional[float] = ...) -> None: ...
