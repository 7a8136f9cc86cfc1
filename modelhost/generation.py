"""What a generation request is once it reaches the host, what it produces, and the checks
that keep bad values away from llama.cpp."""

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from airouter.errors import AirouterError, InvalidArgument
from airouter.infill import Infill
from airouter.output import PLAIN, OutputOptions, TokenLogprob, Turn, turn_parts

if TYPE_CHECKING:
    import asyncio

    from modelhost.constraints import TokenConstraint

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (llama.cpp's defaults where the caller is silent)."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        """Raises InvalidArgument naming the first field outside its range."""
        _check_range("sampling.temperature", self.temperature, 0.0, 2.0)
        _check_range("sampling.top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_range("sampling.top_k", self.top_k, 0, 1000)
        _check_range("sampling.min_p", self.min_p, 0.0, 1.0)
        _check_range("sampling.repetition_penalty", self.repetition_penalty, 0.5, 2.0)


def _check_range(
    name: str, value: float, low: float, high: float, *, low_open: bool = False
) -> None:
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        left = "(" if low_open else "["
        raise InvalidArgument(f"{name} is {value}; it must be in {left}{low}, {high}]")


def validate_stop(stop: list[str]) -> None:
    """Raises InvalidArgument for too many, empty or overlong stop strings."""
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(
            f"stopping.stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed"
        )
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_LENGTH:
            raise InvalidArgument(
                f"stopping.stop[{i}] is {len(s)} characters long; "
                f"each stop string must be 1 to {MAX_STOP_LENGTH} characters"
            )


def validate_messages(messages: list[Turn]) -> None:
    """Raises InvalidArgument for a conversation no template can render."""
    for i, turn in enumerate(messages):
        role, _content, call_id, calls = turn_parts(turn)
        if role not in CHAT_ROLES:
            raise InvalidArgument(
                f"chat.messages[{i}].role is {role!r}; it must be one of {', '.join(CHAT_ROLES)}"
            )
        if role == "tool" and not call_id:
            raise InvalidArgument(
                f"chat.messages[{i}] is a tool result without tool_call_id; name the call it "
                "answers"
            )
        if calls and role != "assistant":
            raise InvalidArgument(f"chat.messages[{i}] has tool_calls but is not the assistant's")


def resolve_max_tokens(requested: int | None, prompt_tokens: int, context: int, model: str) -> int:
    """The token budget of a request whose prompt is prompt_tokens long, checked against the
    context each request may use."""
    if prompt_tokens >= context:
        raise InvalidArgument(
            f"the prompt is {prompt_tokens} tokens but model {model!r} has a context of "
            f"{context} tokens per request; shorten the prompt"
        )
    left = context - prompt_tokens
    if requested is None:
        return left
    if requested < 1 or requested > left:
        raise InvalidArgument(
            f"stopping.max_tokens is {requested}; it must be between 1 and {left} "
            f"(context {context} - prompt {prompt_tokens} tokens)"
        )
    return requested


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"
    TOOL_CALLS = "tool_calls"  # set by the host's tool-call parsing, never by an engine


@dataclass(frozen=True, slots=True)
class StepLogprobs:
    """What a sampler reports of one step: the chosen token's log probability and the most
    likely tokens' (id, log probability), most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Timings:
    """Milliseconds spent in each phase of one request."""

    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class Delta:
    """Text that became safe to send, and how many tokens produced it."""

    text: str
    token_count: int
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked
    choice: int = 0  # which of the request's n choices


@dataclass(frozen=True)
class Finish:
    """The end of a request."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    error: str = ""
    model: str = ""  # the configured name of the model that served the request
    cached_prompt_tokens: int = 0  # prompt tokens whose KV cells an earlier request left
    engine: str = ""  # the engine that ran it: "llama.cpp", "mlx"
    # With n > 1: (choice, why it ended, tokens it generated) for each.
    choices: tuple[tuple[int, FinishReason, int], ...] = ()
    stop_sequence: str = ""  # the stop string that ended it, if one did


@dataclass(frozen=True)
class Rejected:
    """The engine dropped a request before it started; the caller raises `error`."""

    error: AirouterError


Event = Delta | Finish | Rejected


@dataclass(frozen=True)
class GenerationSpec:
    """A generation request as the caller gave it, before the model is known."""

    request_id: str
    model: str
    prompt: str | None
    messages: list[Turn] | None
    sampling: Sampling
    max_tokens: int | None
    stop: list[str]
    ignore_eos: bool = False
    output: OutputOptions = PLAIN
    infill: Infill | None = None  # fill-in-the-middle, in place of a prompt or messages


@dataclass(eq=False)  # compared and hashed by identity: callers may reuse request ids
class EngineRequest:
    """A validated, tokenized request, ready for the engine thread."""

    id: str  # for logs
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stop: list[str]
    # Called with each step's events: on `loop` where one is given (the engine hands a
    # step's events for all of that loop's requests over in one call), else on the engine
    # thread, where it must hand them off, not block.
    on_events: Callable[[list[Event]], object]
    arrived: float  # time.perf_counter() when the request reached the host
    deadline: float | None = None  # time.perf_counter() past which the client has given up
    ignore_eos: bool = False  # generate past end-of-generation tokens until max_tokens
    # The prompt's prefix blocks (airouter.prefix) as (hash, tokens up to the block's end):
    # what the host reports holding once the slot's cells cover them.
    blocks: tuple[tuple[int, int], ...] = ()
    constraint: "TokenConstraint | None" = None  # what the output must be
    top_logprobs: int | None = None  # report logprobs with this many alternatives; None: none
    # The request's other choices (n > 1) share this object: a choice waits for the first
    # to compute the prompt, then copies its cells.
    siblings: object | None = None
    loop: "asyncio.AbstractEventLoop | None" = None


def merge_deltas(events: list[Event]) -> list[Event]:
    """The events with each run of consecutive Deltas joined into one."""
    merged: list[Event] = []
    for event in events:
        last = merged[-1] if merged else None
        if isinstance(event, Delta) and isinstance(last, Delta) and event.choice == last.choice:
            merged[-1] = Delta(
                last.text + event.text,
                last.token_count + event.token_count,
                last.logprobs + event.logprobs,
                last.choice,
            )
        else:
            merged.append(event)
    return merged
