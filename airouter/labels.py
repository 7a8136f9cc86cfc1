"""How protocol enum values and sizes are shown: the words logs, metrics and tables use."""

import functools
import re

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper


@functools.cache  # a handful of values, several lookups per request
def enum_label(enum: EnumTypeWrapper, value: int) -> str:
    """FINISH_REASON_LENGTH -> "length", MODEL_STATE_NOT_LOADED -> "not_loaded": the value's
    name without the prefix buf's lint gives every value (the enum's name in UPPER_SNAKE)."""
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.DESCRIPTOR.name).upper() + "_"
    return enum.Name(value).removeprefix(prefix).lower()


def format_bytes(n: float) -> str:
    """A size as people read it: GiB from one GiB up, else MiB."""
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"
