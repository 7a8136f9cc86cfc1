"""How protocol enum values and sizes are shown: the words logs, metrics and tables use."""

import functools
import json
import re

from google.protobuf import json_format
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import Message


@functools.cache  # a handful of values, several lookups per request
def enum_label(enum: EnumTypeWrapper, value: int) -> str:
    """FINISH_REASON_LENGTH -> "length", MODEL_STATE_NOT_LOADED -> "not_loaded": the value's
    name without the prefix buf's lint gives every value (the enum's name in UPPER_SNAKE)."""
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.DESCRIPTOR.name).upper() + "_"
    return enum.Name(value).removeprefix(prefix).lower()


def format_bytes(n: float) -> str:
    """A size as people read it: GiB from one GiB up, else MiB."""
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


JSON_HELP = "print the protocol's JSON (lowerCamelCase names, every field) instead of a table"


def message_json(message: Message, indent: int | None = None) -> str:
    """A message as the CLI's --json prints it: the protocol's JSON names (lowerCamelCase),
    enum names, and every field, zeros and empty strings included, so a script finds the same
    keys in every object."""
    fields = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return json.dumps(fields, indent=indent)
