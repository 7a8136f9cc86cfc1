"""Reads the metadata at the start of a GGUF file, without loading the model.

The residency manager sizes a model before loading it, and a file that is not a GGUF is
refused with a clear reason instead of an opaque llama.cpp failure. Only scalar values are
kept; arrays (the tokenizer's vocabulary) are skipped without decoding.
"""

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MAGIC = b"GGUF"
# struct formats of GGUF's fixed-size value types, by type id (ggml's gguf.h).
_SCALARS = {
    0: struct.Struct("<B"),  # uint8
    1: struct.Struct("<b"),  # int8
    2: struct.Struct("<H"),  # uint16
    3: struct.Struct("<h"),  # int16
    4: struct.Struct("<I"),  # uint32
    5: struct.Struct("<i"),  # int32
    6: struct.Struct("<f"),  # float32
    7: struct.Struct("<?"),  # bool
    10: struct.Struct("<Q"),  # uint64
    11: struct.Struct("<q"),  # int64
    12: struct.Struct("<d"),  # float64
}
_STRING = 8
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_ARRAY = 9


class GGUFError(Exception):
    """The file is not a readable GGUF; the message says what is wrong."""


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    file_bytes: int
    tensor_count: int
    metadata: dict[str, int | float | bool | str]
    array_lengths: dict[str, int]  # items of each array value, such as the vocabulary

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_int(self, key: str, default: int = 0) -> int:
        """An integer hyperparameter such as `block_count` for the file's architecture."""
        value = self.metadata.get(f"{self.architecture}.{key}", default)
        return int(value) if isinstance(value, int | float) else default


def read_gguf_header(path: Path) -> GGUFHeader:
    """The file's scalar metadata; raises GGUFError for a truncated or foreign file."""
    try:
        with path.open("rb") as f:
            file_bytes = os.fstat(f.fileno()).st_size
            if file_bytes < len(_MAGIC):
                raise GGUFError(f"{path} is not a GGUF file (it is {file_bytes} bytes long)")
            # Mapped, not read: the header of a 262k-token vocabulary is walked in tens of
            # milliseconds where one read per string took a quarter of a second at launch.
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(path, file_bytes, _Cursor(data))
    except OSError as exc:
        raise GGUFError(f"cannot read {path}: {exc.strerror}") from exc
    except (struct.error, UnicodeDecodeError) as exc:
        raise GGUFError(f"{path} is truncated or corrupt: its header does not parse") from exc


def _parse(path: Path, file_bytes: int, cursor: "_Cursor") -> GGUFHeader:
    if cursor.take(4) != _MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    version = cursor.unpack(_U32)
    if version not in (2, 3):
        raise GGUFError(f"{path} is GGUF version {version}; llama.cpp reads 2 and 3")
    tensor_count = cursor.unpack(_U64)
    kv_count = cursor.unpack(_U64)
    metadata: dict[str, int | float | bool | str] = {}
    array_lengths: dict[str, int] = {}
    for _ in range(kv_count):
        key = cursor.string()
        value_type = cursor.unpack(_U32)
        if value_type == _ARRAY:
            array_lengths[key] = cursor.skip_array()
        else:
            metadata[key] = cursor.scalar(value_type)
    return GGUFHeader(path, file_bytes, tensor_count, metadata, array_lengths)


class _Cursor:
    """Reads GGUF values from a buffer, front to back."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int) -> bytes:
        end = self.offset + size
        if end > len(self.data):
            raise struct.error("short read")
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def unpack(self, fmt: struct.Struct) -> Any:
        value = fmt.unpack_from(self.data, self.offset)[0]
        self.offset += fmt.size
        return value

    def string(self) -> str:
        return self.take(self.unpack(_U64)).decode("utf-8")

    def scalar(self, value_type: int) -> int | float | bool | str:
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type])  # type: ignore[no-any-return]
        if value_type == _STRING:
            return self.string()
        raise struct.error(f"unknown value type {value_type}")

    def skip_array(self) -> int:
        """Moves past an array value; returns its length."""
        item_type = self.unpack(_U32)
        count: int = self.unpack(_U64)
        if item_type in _SCALARS:
            self.offset += count * _SCALARS[item_type].size
        elif item_type == _STRING:
            length, data, offset = _U64.unpack_from, self.data, self.offset
            for _ in range(count):
                offset += 8 + length(data, offset)[0]
            self.offset = offset
        else:
            raise struct.error(f"array of type {item_type}")
        if self.offset > len(self.data):
            raise struct.error("short read")
        return count
