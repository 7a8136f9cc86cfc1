"""What a response carries beyond free text, as the gateway and the hosts both see it: an
output constraint (JSON, a JSON Schema, a regex or a grammar), tools and how they may be
called, log probabilities and several choices; and the checks that refuse a bad one cheaply.

Constraints are compiled by llguidance (a Rust library: Earley parsing over the tokenizer's
trie, a token mask in tens of microseconds). The gateway compiles each one against a byte
tokenizer before routing, so a schema that cannot work is refused before any host is asked;
the host compiles it again against its model's vocabulary.
"""

import enum
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from airouter.errors import InvalidArgument
from airouter.termination import json_schema_ends, lark_ends

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

MAX_TOOLS = 256
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 16
# The most text one constraint or all of a request's tool schemas may hold: llguidance
# compiles ~1 MB of grammar in about a second, which a request must not be able to ask for.
MAX_CONSTRAINT_BYTES = 256 << 10
MAX_TOOLS_BYTES = 512 << 10
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ConstraintKind(enum.Enum):
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    LARK = "lark"  # llguidance's Lark dialect
    GBNF = "gbnf"  # llama.cpp's grammar format, converted to Lark


class ToolChoice(enum.Enum):
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    FUNCTION = "function"  # the tool named by OutputOptions.tool_function


@dataclass(frozen=True, slots=True)
class Constraint:
    kind: ConstraintKind
    text: str = ""  # the schema (JSON text), regex or grammar; empty for JSON_OBJECT


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = ""  # a JSON Schema of the arguments, as JSON text; "": none


@dataclass(frozen=True, slots=True)
class OutputOptions:
    constraint: Constraint | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice.AUTO
    tool_function: str = ""  # with ToolChoice.FUNCTION
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1

    @property
    def calls_tools(self) -> bool:
        """Whether the model may answer with tool calls."""
        return bool(self.tools) and self.tool_choice is not ToolChoice.NONE

    def size(self) -> int:
        texts = [self.constraint.text if self.constraint else ""]
        for tool in self.tools:
            texts += (tool.name, tool.description, tool.parameters)
        return sum(len(t.encode()) for t in texts)


PLAIN = OutputOptions()

# A call a model made, in a conversation: (id, name, arguments as JSON text).
Call = tuple[str, str, str]
# A chat turn as both services hold it: (role, content), or (role, content, tool_call_id,
# calls) for a tool's result or an assistant's calls. Plain tuples of strings, which Python's
# cycle collector stops tracking: a chat of 20,000 messages held by each of a hundred requests
# in flight would otherwise be millions of objects that every full collection walks.
Turn = tuple[str, str] | tuple[str, str, str, tuple[Call, ...]]


def turn_parts(turn: Turn) -> tuple[str, str, str, tuple[Call, ...]]:
    """(role, content, tool_call_id, calls) of any turn."""
    if len(turn) == 2:
        return turn[0], turn[1], "", ()
    return turn  # type: ignore[return-value]


def make_turn(role: str, content: str, call_id: str = "", calls: tuple[Call, ...] = ()) -> Turn:
    """The shortest tuple that holds a turn."""
    return (role, content, call_id, calls) if call_id or calls else (role, content)


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call in a stream: the first names it, the rest add argument text."""

    call_index: int
    id: str = ""
    name: str = ""
    arguments: str = ""
    choice: int = 0  # which of the request's n choices made it


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log probability at its step, with the most likely alternatives."""

    token: bytes
    logprob: float
    top: tuple["TokenLogprob", ...] = field(default=())

    @property
    def text(self) -> str:
        return self.token.decode("utf-8", "replace")


def validate_output(options: OutputOptions, *, compile: bool = True) -> None:
    """Refuses what cannot be served: counts and sizes first (free), then, with `compile`,
    each constraint and tool schema compiled (a few ms each, cached by content)."""
    if not 1 <= options.n <= MAX_CHOICES:
        raise InvalidArgument(f"n is {options.n}; it must be between 1 and {MAX_CHOICES}")
    if not 0 <= options.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(
            f"top_logprobs is {options.top_logprobs}; it must be between 0 and {MAX_TOP_LOGPROBS}"
        )
    if options.top_logprobs and not options.logprobs:
        raise InvalidArgument("top_logprobs: needs logprobs true as well")
    if len(options.tools) > MAX_TOOLS:
        raise InvalidArgument(
            f"tools: {len(options.tools)} tools; at most {MAX_TOOLS} are allowed in one request"
        )
    constraint = options.constraint
    size = len(constraint.text.encode()) if constraint is not None else 0
    if constraint is not None and size > MAX_CONSTRAINT_BYTES:
        raise InvalidArgument(
            f"response_format: the {constraint.kind.value} is {size >> 10} KiB; at most "
            f"{MAX_CONSTRAINT_BYTES >> 10} KiB are allowed"
        )
    tools_size = sum(
        len(t.parameters.encode()) + len(t.description.encode()) for t in options.tools
    )
    if tools_size > MAX_TOOLS_BYTES:
        raise InvalidArgument(
            f"tools: their descriptions and schemas are {tools_size >> 10} KiB; at most "
            f"{MAX_TOOLS_BYTES >> 10} KiB are allowed"
        )
    names = set()
    for i, tool in enumerate(options.tools):
        if not _TOOL_NAME.fullmatch(tool.name):
            raise InvalidArgument(
                f"tools[{i}].function.name is {tool.name[:80]!r}; a tool's name is 1 to 64 "
                "letters, digits, underscores, dots or dashes"
            )
        if tool.name in names:
            raise InvalidArgument(f"tools[{i}].function.name: {tool.name!r} is given twice")
        names.add(tool.name)
    if options.tool_choice is ToolChoice.FUNCTION and options.tool_function not in names:
        raise InvalidArgument(
            f"tool_choice: names the function {options.tool_function[:80]!r}, which is not "
            "among the tools"
        )
    if options.tool_choice in (ToolChoice.REQUIRED, ToolChoice.FUNCTION) and not options.tools:
        raise InvalidArgument(
            f"tool_choice: {options.tool_choice.value} needs tools, and none are given"
        )
    if constraint is not None and options.calls_tools:
        raise InvalidArgument(
            "response_format: cannot constrain an answer that may call tools; send tools with "
            "tool_choice none, or no response_format"
        )
    if not compile:
        return
    if constraint is not None:
        check_compiles(grammar_of(constraint, "response_format"), "response_format")
        check_ends(constraint, "response_format")
    for i, tool in enumerate(options.tools):
        if tool.parameters:
            where = f"tools[{i}].function.parameters"
            schema = Constraint(ConstraintKind.JSON_SCHEMA, tool.parameters)
            check_compiles(grammar_of(schema, where), where)
            check_ends(schema, where)


def check_ends(constraint: Constraint, where: str) -> None:
    """InvalidArgument when the constraint admits no finite output (airouter.termination)."""
    from llguidance.gbnf_to_lark import any_to_lark

    kind = constraint.kind
    if kind is ConstraintKind.JSON_SCHEMA:
        ends = json_schema_ends(schema_object(constraint.text, where))
        what = "a required field nests the schema in itself with no way out"
    elif kind in (ConstraintKind.LARK, ConstraintKind.GBNF):
        text = constraint.text if kind is ConstraintKind.LARK else any_to_lark(constraint.text)
        ends = lark_ends(text)
        what = "its start rule only ever derives more of itself"
    else:
        return
    if not ends:
        raise InvalidArgument(f"{where}: never ends: {what}; give it a way to finish")


def turn_json(turn: Turn, *, for_template: bool = False) -> dict[str, Any]:
    """A turn as an OpenAI chat message. For a chat template (`for_template`), a call's
    arguments are an object (templates index them, as transformers passes them) and content
    stays text; on the wire, arguments are the JSON text and a call's empty content is null."""
    role, content, call_id, calls = turn_parts(turn)
    message: dict[str, Any] = {"role": role, "content": content}
    if call_id:
        message["tool_call_id"] = call_id
    if calls:
        if not for_template:
            message["content"] = content or None
        message["tool_calls"] = [
            {
                "id": id_,
                "type": "function",
                "function": {
                    "name": name,
                    "arguments": _arguments_object(arguments) if for_template else arguments,
                },
            }
            for id_, name, arguments in calls
        ]
    return message


def _arguments_object(arguments: str) -> Any:
    """A call's arguments as an object; arguments that are not JSON stay text."""
    try:
        return json.loads(arguments) if arguments else {}
    except ValueError:
        return arguments


def openai_tool(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = tool_parameters(tool)
    return {"type": "function", "function": function}


def tool_parameters(tool: Tool) -> dict[str, Any]:
    if not tool.parameters:
        return {"type": "object", "properties": {}}
    return schema_object(tool.parameters, f"tools[{tool.name}].function.parameters")


def schema_object(text: str, where: str) -> dict[str, Any]:
    """A JSON Schema's text as the object it must be."""
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"{where} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidArgument(f"{where} must be a JSON Schema object, not {type(schema).__name__}")
    return schema


# Between JSON tokens: one space, or one newline and an indent (llama.cpp's JSON grammars allow
# the same): JSON may be pretty-printed, but a small model that would rather write newlines
# forever cannot stall a constrained answer. A schema's "x-guidance" options override it, as
# llguidance reads them.
JSON_DEFAULTS: "JsonCompileOptions" = {"whitespace_pattern": r"\x20|\x0A[\x20\x09]{0,20}"}


def grammar_of(constraint: Constraint, where: str) -> str:
    """llguidance's grammar for a constraint; InvalidArgument naming `where` when the text is
    not even of its kind (compiling it finds the rest)."""
    import llguidance

    kind, text = constraint.kind, constraint.text
    try:
        if kind is ConstraintKind.JSON_OBJECT:
            return llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, defaults=JSON_DEFAULTS
            )
        if kind is ConstraintKind.JSON_SCHEMA:
            return llguidance.LLMatcher.grammar_from_json_schema(
                schema_object(text, where), defaults=JSON_DEFAULTS
            )
        if kind is ConstraintKind.REGEX:
            return llguidance.LLMatcher.grammar_from_regex(text)
        if kind is ConstraintKind.LARK:
            return llguidance.LLMatcher.grammar_from_lark(text)
        return llguidance.grammar_from("gbnf", text)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: cannot be read: {_first_line(exc)}") from None


def check_compiles(grammar: str, where: str) -> None:
    """Compiles a grammar against a byte tokenizer and takes its first step: InvalidArgument
    naming `where` when it is invalid or admits no output at all. Cached by content."""
    error = _compile_error(hashlib.sha256(grammar.encode()).digest(), grammar)
    if error:
        raise InvalidArgument(f"{where}: cannot be used: {error}")


@functools.lru_cache(maxsize=512)
def _compile_error(_digest: bytes, grammar: str) -> str:
    import llguidance
    import numpy as np

    matcher = llguidance.LLMatcher(_byte_tokenizer(), grammar, log_level=0)
    mask = np.zeros(((_BYTE_VOCAB + 31) // 32,), dtype=np.int32)
    if not matcher.is_error():
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
    if matcher.is_error():
        error = _first_line(matcher.get_error())
        if error.startswith("NoExtensionBias"):
            return "it admits no output (a $ref or rule that only refers to itself?)"
        return error
    return ""


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "unknown error"


_BYTE_VOCAB = 257  # every byte, then an end-of-sequence token


class _ByteTokens:
    """A tokenizer whose tokens are single bytes: enough to compile a grammar and check it
    admits some output, without any model's vocabulary."""

    tokens: ClassVar = [bytes([b]) for b in range(256)] + [b"\xff<eos>"]
    eos_token_id = 256
    bos_token_id = None
    special_token_ids: ClassVar = [256]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


@functools.cache
def _byte_tokenizer() -> Any:
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokens()))
