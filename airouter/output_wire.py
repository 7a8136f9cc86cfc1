"""airouter.output's types (and airouter.infill's) as airouter.v1 messages and back: shared by
the gateway's doors and host link and by the host's servicer, which speak the same
OutputOptions, ChatMessage, TokenLogprob and Infill messages."""

from airouter.errors import InvalidArgument
from airouter.infill import Infill
from airouter.output import (
    PLAIN,
    Constraint,
    ConstraintKind,
    OutputOptions,
    TokenLogprob,
    Tool,
    ToolCallDelta,
    ToolChoice,
    Turn,
    make_turn,
    turn_parts,
)
from airouter.v1 import generate_pb2

_CHOICE_FROM_PB = {
    generate_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: ToolChoice.AUTO,
    generate_pb2.TOOL_CHOICE_MODE_NONE: ToolChoice.NONE,
    generate_pb2.TOOL_CHOICE_MODE_AUTO: ToolChoice.AUTO,
    generate_pb2.TOOL_CHOICE_MODE_REQUIRED: ToolChoice.REQUIRED,
}
_CHOICE_TO_PB = {
    ToolChoice.NONE: generate_pb2.TOOL_CHOICE_MODE_NONE,
    ToolChoice.AUTO: generate_pb2.TOOL_CHOICE_MODE_AUTO,
    ToolChoice.REQUIRED: generate_pb2.TOOL_CHOICE_MODE_REQUIRED,
}


def output_from_pb(pb: generate_pb2.OutputOptions) -> OutputOptions:
    """The options a request carries; an unknown tool_choice mode is InvalidArgument."""
    if pb.ByteSize() == 0:
        return PLAIN
    kind = pb.constraint.WhichOneof("kind")
    constraint = None
    if kind == "json_object":
        constraint = Constraint(ConstraintKind.JSON_OBJECT) if pb.constraint.json_object else None
    elif kind is not None:
        constraint = Constraint(ConstraintKind(kind), getattr(pb.constraint, kind))
    choice = pb.tool_choice
    if choice.function:
        tool_choice = ToolChoice.FUNCTION
    else:
        mode = _CHOICE_FROM_PB.get(choice.mode)
        if mode is None:
            raise InvalidArgument(
                f"output.tool_choice.mode {choice.mode} is unknown; use one of "
                + ", ".join(generate_pb2.ToolChoiceMode.Name(m) for m in _CHOICE_TO_PB.values())
            )
        tool_choice = mode
    return OutputOptions(
        constraint=constraint,
        tools=tuple(Tool(t.name, t.description, t.parameters) for t in pb.tools),
        tool_choice=tool_choice,
        tool_function=choice.function,
        parallel_tool_calls=pb.parallel_tool_calls if pb.HasField("parallel_tool_calls") else True,
        logprobs=pb.logprobs,
        top_logprobs=pb.top_logprobs,
        n=pb.n or 1,
    )


def fill_output(pb: generate_pb2.OutputOptions, options: OutputOptions) -> None:
    if options == PLAIN:
        return
    constraint = options.constraint
    if constraint is not None:
        if constraint.kind is ConstraintKind.JSON_OBJECT:
            pb.constraint.json_object = True
        else:
            setattr(pb.constraint, constraint.kind.value, constraint.text)
    for tool in options.tools:
        pb.tools.add(name=tool.name, description=tool.description, parameters=tool.parameters)
    if options.tool_choice is ToolChoice.FUNCTION:
        pb.tool_choice.function = options.tool_function
    else:
        pb.tool_choice.mode = _CHOICE_TO_PB[options.tool_choice]
    if not options.parallel_tool_calls:
        pb.parallel_tool_calls = False
    pb.logprobs = options.logprobs
    pb.top_logprobs = options.top_logprobs
    if options.n != 1:
        pb.n = options.n


def turn_from_pb(pb: generate_pb2.ChatMessage) -> Turn:
    calls = tuple((c.id, c.name, c.arguments) for c in pb.tool_calls)
    return make_turn(pb.role, pb.content, pb.tool_call_id, calls)


def fill_turn(pb: generate_pb2.ChatMessage, turn: Turn) -> None:
    role, content, call_id, calls = turn_parts(turn)
    pb.role, pb.content = role, content
    if call_id:
        pb.tool_call_id = call_id
    for id_, name, arguments in calls:
        pb.tool_calls.add(id=id_, name=name, arguments=arguments)


def logprob_pb(logprob: TokenLogprob) -> generate_pb2.TokenLogprob:
    return generate_pb2.TokenLogprob(
        token=logprob.text,
        token_bytes=logprob.token,
        logprob=logprob.logprob,
        top_logprobs=[logprob_pb(t) for t in logprob.top],
    )


def logprob_from_pb(pb: generate_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        pb.token_bytes, pb.logprob, tuple(logprob_from_pb(t) for t in pb.top_logprobs)
    )


def tool_call_pb(delta: ToolCallDelta) -> generate_pb2.ToolCallDelta:
    return generate_pb2.ToolCallDelta(
        choice_index=delta.choice,
        call_index=delta.call_index,
        id=delta.id,
        name=delta.name,
        arguments=delta.arguments,
    )


def tool_call_from_pb(pb: generate_pb2.ToolCallDelta) -> ToolCallDelta:
    return ToolCallDelta(pb.call_index, pb.id, pb.name, pb.arguments, pb.choice_index)


def infill_from_pb(pb: generate_pb2.Infill) -> Infill:
    return Infill(pb.prefix, pb.suffix, tuple((f.filename, f.text) for f in pb.extra))


def fill_infill(pb: generate_pb2.Infill, infill: Infill) -> None:
    pb.prefix, pb.suffix = infill.prefix, infill.suffix
    for filename, text in infill.extra:
        pb.extra.add(filename=filename, text=text)
