"""Protocol enum values as the lowercase words logs, metrics and tables use."""

import re

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper


def enum_label(enum: EnumTypeWrapper, value: int) -> str:
    """FINISH_REASON_LENGTH -> "length", MODEL_STATE_NOT_LOADED -> "not_loaded": the value's
    name without the prefix buf's lint gives every value (the enum's name in UPPER_SNAKE)."""
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.DESCRIPTOR.name).upper() + "_"
    return enum.Name(value).removeprefix(prefix).lower()
