"""Fill-in-the-middle requests (what code editors send for completions at the cursor), as both
services hold them, and how a host lays one out in tokens with its model's FIM tokens.

The layout is the one code models are trained on (prefix-suffix-middle, as in Qwen2.5-Coder's
report, arXiv 2409.12186, and StarCoder 2): the other files first, each after the file
separator and its name, then the prefix, the suffix and the middle marker, after which the
model writes the code between them. What does not fit the room is dropped from
the far ends: the oldest extra files first, then the prefix's start and the suffix's end, so
the text nearest the cursor stays.
"""

from collections.abc import Callable
from dataclasses import dataclass

# The most extra files one request may carry.
MAX_INFILL_FILES = 256


@dataclass(frozen=True, slots=True)
class Infill:
    prefix: str
    suffix: str = ""
    extra: tuple[tuple[str, str], ...] = ()  # (filename, text) of other files, as context

    def texts(self) -> list[str]:
        return [self.prefix, self.suffix, *(part for file in self.extra for part in file)]

    def routing_text(self) -> str:
        """The text in the order the prompt lays it out up to the cursor, for prefix routing."""
        return "".join(f"{name}\n{text}" for name, text in self.extra) + self.prefix


@dataclass(frozen=True, slots=True)
class FimTokens:
    """A vocabulary's fill-in-the-middle tokens; the file separator is optional (without it,
    extra files are left out)."""

    prefix: int
    suffix: int
    middle: int
    file_separator: int | None = None


def infill_tokens(
    infill: Infill,
    fim: FimTokens,
    tokenize: Callable[[str], list[int]],
    room: int,
    bos: int | None = None,
) -> list[int]:
    """The prompt's tokens, at most `room` of them. `tokenize` turns text into tokens without
    a BOS and without reading special tokens in it (a file that contains "<fim_middle>" is
    text)."""
    head = [bos] if bos is not None else []
    fixed = len(head) + 3  # the prefix, suffix and middle markers
    prefix, suffix = tokenize(infill.prefix), tokenize(infill.suffix)
    # The suffix may take a quarter of the room, the prefix the rest; both keep what is
    # nearest the cursor.
    room_left = max(room - fixed, 0)
    suffix = suffix[: min(len(suffix), max(room_left // 4, room_left - len(prefix)))]
    prefix = prefix[max(len(prefix) - (room_left - len(suffix)), 0) :]
    context: list[int] = []
    if infill.extra and fim.file_separator is not None:
        files = [[fim.file_separator, *tokenize(f"{name}\n{text}")] for name, text in infill.extra]
        left = room_left - len(prefix) - len(suffix)
        kept: list[list[int]] = []
        for file in reversed(files):  # the newest (last) files are kept first
            if len(file) > left:
                break
            kept.insert(0, file)
            left -= len(file)
        for file in kept:
            context += file
    return [
        *head,
        *context,
        fim.prefix,
        *prefix,
        fim.suffix,
        *suffix,
        fim.middle,
    ]
