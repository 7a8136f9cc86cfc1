"""Reads the metadata at the start of a GGUF file, without loading the model.

The residency manager sizes a model before loading it, and a file that is not a GGUF is
refused with a clear reason instead of an opaque llama.cpp failure. Only scalar values are
kept; arrays (the tokenizer's vocabulary) are skipped without decoding.
"""

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"GGUF"
# struct formats of GGUF's fixed-size value types, by type id (ggml's gguf.h).
_SCALARS = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_STRING = 8
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
            file_bytes = path.stat().st_size
            if f.read(4) != _MAGIC:
                raise GGUFError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
            version = _unpack(f, "<I")
            if version not in (2, 3):
                raise GGUFError(f"{path} is GGUF version {version}; llama.cpp reads 2 and 3")
            tensor_count = _unpack(f, "<Q")
            kv_count = _unpack(f, "<Q")
            metadata: dict[str, int | float | bool | str] = {}
            array_lengths: dict[str, int] = {}
            for _ in range(kv_count):
                key = _read_string(f)
                value_type = _unpack(f, "<I")
                if value_type == _ARRAY:
                    array_lengths[key] = _skip_array(f)
                else:
                    metadata[key] = _read_scalar(f, value_type)
    except OSError as exc:
        raise GGUFError(f"cannot read {path}: {exc.strerror}") from exc
    except (struct.error, UnicodeDecodeError) as exc:
        raise GGUFError(f"{path} is truncated or corrupt: its header does not parse") from exc
    return GGUFHeader(path, file_bytes, tensor_count, metadata, array_lengths)


def _unpack(f: BinaryIO, fmt: str) -> int:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise struct.error("short read")
    return struct.unpack(fmt, data)[0]


def _read_string(f: BinaryIO) -> str:
    length = _unpack(f, "<Q")
    data = f.read(length)
    if len(data) != length:
        raise struct.error("short read")
    return data.decode("utf-8")


def _read_scalar(f: BinaryIO, value_type: int) -> int | float | bool | str:
    if value_type in _SCALARS:
        return _unpack(f, _SCALARS[value_type])
    if value_type == _STRING:
        return _read_string(f)
    raise struct.error(f"unknown value type {value_type}")


def _skip_array(f: BinaryIO) -> int:
    """Moves past an array value; returns its length."""
    item_type = _unpack(f, "<I")
    count = _unpack(f, "<Q")
    if item_type in _SCALARS:
        f.seek(count * struct.calcsize(_SCALARS[item_type]), 1)
    elif item_type == _STRING:
        for _ in range(count):
            f.seek(_unpack(f, "<Q"), 1)
    else:
        raise struct.error(f"array of type {item_type}")
    return count
