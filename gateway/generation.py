"""The gateway's own generate request, the events of its stream and its outcome.

Every front door (gRPC, the OpenAI HTTP edge, batch files) turns its transport's request into a
GenerateRequest, and the events back; the host link builds the host's own request from one,
field by field, and the upstream link an OpenAI body. Nothing below the doors and the links
sees a wire message. A request says what to generate (input, sampling, stopping) and how to
route it (Routing): the routing half stays in the gateway.
"""

import enum
from dataclasses import dataclass, field, fields, replace
from typing import Any

from airouter import tracing
from airouter.errors import InvalidArgument, not_text
from airouter.infill import MAX_INFILL_FILES, Infill
from airouter.output import (
    PLAIN,
    Call,
    OutputOptions,
    TokenLogprob,
    ToolCallDelta,
    Turn,
    turn_parts,
    validate_output,
)
from airouter.prefix import Prefix, prefix_of, routing_blocks

# The longest conversation id kept for routing affinity.
MAX_CONVERSATION_ID = 256


class Policy(enum.Enum):
    """Where a request may run."""

    LOCAL_ONLY = "local_only"
    LOCAL_FIRST = "local_first"  # the model's cloud model when no host can serve it
    CLOUD_ONLY = "cloud_only"


# A chat turn (airouter.output.Turn), rendered by the host with the model's chat template.
Message = Turn


@dataclass(frozen=True, slots=True)
class Sampling:
    """How tokens are chosen; None leaves a parameter to the host's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


# Its fields, as the protocol's SamplingParameters and OpenAI's bodies name them too.
SAMPLING_FIELDS = tuple(f.name for f in fields(Sampling))


@dataclass(frozen=True, slots=True)
class Stopping:
    """When generation stops; max_tokens None: the context left after the prompt."""

    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate past end-of-generation tokens (benchmarks)


@dataclass(frozen=True, slots=True)
class Routing:
    """How the gateway places the request; never sent to a host."""

    policy: Policy | None = None  # None: the operator's policy for the model
    min_context_length: int = 0  # only models with at least this context per request
    # The conversation (or end user) the request belongs to, for affinity; often an e-mail
    # address (OpenAI's `user`), so it stays in the gateway.
    conversation_id: str = ""
    # The prompt's prefix as routing looks at it (request_prefix), when a door has hashed it
    # already (off the event loop, for a large request); else the service hashes it.
    prefix: Prefix | None = field(default=None, compare=False)
    # The API key the request came with (its name), whose limits and usage it counts
    # toward; "" for the client or admin token.
    key: str = ""


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """What to generate for whom: a raw prompt, chat messages or an infill (exactly one), and
    how."""

    model: str  # a name, an alias, "capability:<tag>" or "openrouter/<vendor>/<model>"
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stopping: Stopping = field(default_factory=Stopping)
    routing: Routing = field(default_factory=Routing)
    request_id: str = ""
    output: OutputOptions = PLAIN  # constrained output, tools, logprobs, n
    infill: Infill | None = None  # fill-in-the-middle, in place of a prompt or messages

    @property
    def chat(self) -> bool:
        return self.messages is not None

    def with_model(self, model: str) -> "GenerateRequest":
        return replace(self, model=model)

    def size(self) -> int:
        """The bytes of text the request carries (what a host must receive); raises
        UnicodeEncodeError for a lone surrogate, which no host can receive."""
        texts = [self.model, self.prompt or "", *self.stopping.stop, self.routing.conversation_id]
        for turn in self.messages or ():
            role, content, call_id, calls = turn_parts(turn)
            texts += (role, content, call_id)
            for call in calls:
                texts += call
        if self.infill is not None:
            texts += self.infill.texts()
        size = sum(len(t) if t.isascii() else len(t.encode()) for t in texts)
        return size + (self.output.size() if self.output is not PLAIN else 0)


class FinishReason(enum.Enum):
    STOP = "stop"  # the model ended its turn or produced a stop string
    LENGTH = "length"  # max_tokens was reached
    CANCELLED = "cancelled"  # the client or a shutdown stopped it
    ERROR = "error"  # it failed after it had started; Finished.error_message says why
    TOOL_CALLS = "tool_calls"  # the model called tools


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV cells a host still held
    cost_usd: float = 0.0  # what the upstream charged; 0 for local models


@dataclass(slots=True)
class Timings:
    """Milliseconds spent in each phase."""

    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(slots=True)
class Token:
    """Newly decoded text and how many tokens produced it."""

    text: str
    token_count: int = 1
    choice: int = 0  # which of the request's n choices
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked


@dataclass(frozen=True, slots=True)
class ChoiceEnd:
    """How one of several choices ended."""

    index: int
    reason: "FinishReason"
    completion_tokens: int = 0


@dataclass(slots=True)
class Finished:
    """The outcome: the last event of every stream."""

    reason: FinishReason
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    error_message: str = ""
    model: str = ""  # the configured name of the model that served it
    host: str = ""  # the host (or "openrouter") that served it
    choices: tuple[ChoiceEnd, ...] = ()  # with n > 1: how each choice ended
    stop_sequence: str = ""  # the stop string that ended it, when one did


Event = Token | ToolCallDelta | Finished


@dataclass(frozen=True, slots=True)
class ChoiceOutput:
    """What one choice produced, gathered from its stream."""

    index: int
    text: str = ""
    tool_calls: tuple[Call, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    reason: FinishReason = FinishReason.STOP


class Outputs:
    """A stream's text, tool calls and log probabilities gathered choice by choice (for an
    answer that is not streamed: a whole completion, a batch item's result)."""

    def __init__(self) -> None:
        self._texts: dict[int, list[str]] = {}
        self._calls: dict[int, list[list[str]]] = {}
        self._logprobs: dict[int, list[TokenLogprob]] = {}

    def add(self, event: Token | ToolCallDelta) -> None:
        if isinstance(event, Token):
            self._texts.setdefault(event.choice, []).append(event.text)
            if event.logprobs:
                self._logprobs.setdefault(event.choice, []).extend(event.logprobs)
            return
        calls = self._calls.setdefault(event.choice, [])
        if event.call_index < len(calls):  # more of a call's arguments
            calls[event.call_index][2] += event.arguments
        else:
            calls.append([event.id, event.name, event.arguments])

    def text(self, choice: int = 0) -> str:
        return "".join(self._texts.get(choice, ()))

    def choices(self, finished: Finished) -> tuple[ChoiceOutput, ...]:
        """Every choice's output; how each ended comes from `finished`."""
        reasons = {c.index: c.reason for c in finished.choices} or {0: finished.reason}
        return tuple(
            ChoiceOutput(
                index,
                self.text(index),
                tuple((c[0], c[1], c[2]) for c in self._calls.get(index, ())),
                tuple(self._logprobs.get(index, ())),
                reason,
            )
            for index, reason in sorted(reasons.items())
        )


def request_prefix(request: GenerateRequest) -> Prefix:
    """The prompt's prefix as routing looks at it: its blocks hashed as the hosts hash them,
    sampled (airouter.prefix.routing_blocks), and its size."""
    prompt = request.infill.routing_text() if request.infill is not None else request.prompt
    whole = prefix_of(prompt, request.messages or None)
    return Prefix(routing_blocks(whole.blocks), whole.size)


def request_attributes(request: GenerateRequest) -> dict[str, Any]:
    """The request's GenAI span attributes."""
    return tracing.request_attributes(
        chat=request.chat,
        model=request.model,
        max_tokens=request.stopping.max_tokens,
        temperature=request.sampling.temperature,
        request_id=request.request_id,
    )


def finish_attributes(finished: Finished) -> dict[str, Any]:
    """The outcome's GenAI span attributes."""
    return tracing.finish_attributes(
        model=finished.model,
        input_tokens=finished.usage.prompt_tokens,
        output_tokens=finished.usage.completion_tokens,
        reason=finished.reason.value,
        host=finished.host,
    )


def error_finish(host: str, why: str) -> Finished:
    return Finished(FinishReason.ERROR, error_message=f"host {host} {why}", host=host)


# The largest request the gateway relays: a host accepts 4 MiB messages (gRPC's default).
MAX_GENERATE_BYTES = 4 << 20


def validate(request: GenerateRequest) -> None:
    """Refuses what no host could serve, cheaply and before any routing."""
    if not request.model:
        raise InvalidArgument("model is empty; name a model (`airouter models` lists them)")
    if not request.prompt and not request.messages and request.infill is None:
        raise InvalidArgument("the request has neither a prompt nor chat messages")
    if request.infill is not None and len(request.infill.extra) > MAX_INFILL_FILES:
        raise InvalidArgument(
            f"infill.extra holds {len(request.infill.extra)} files; at most {MAX_INFILL_FILES}"
        )
    conversation = request.routing.conversation_id
    if len(conversation) > MAX_CONVERSATION_ID:
        raise InvalidArgument(
            f"conversation_id (OpenAI's `user`, or X-Conversation-Id) is "
            f"{len(conversation)} characters; at most {MAX_CONVERSATION_ID}"
        )
    try:
        size = request.size()
    except UnicodeEncodeError as exc:
        raise not_text(exc, "the request") from None
    if size > MAX_GENERATE_BYTES:
        raise InvalidArgument(
            f"the request is {size / (1 << 20):.1f} MiB; a generate request may be at most "
            f"{MAX_GENERATE_BYTES >> 20} MiB"
        )
    if request.output is not PLAIN:
        validate_output(request.output)
