"""Generation as the host offers it: validate, render, tokenize, hand to the engine, relay.

Nothing here touches grpc; the servicer translates wire messages to and from these types.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, replace
from functools import partial

import structlog

from airouter.errors import AirouterError, FailedPrecondition, InvalidArgument
from airouter.output import ToolCallDelta, grammar_of, validate_output
from airouter.prefix import prefix_of
from modelhost.constraints import TokenConstraint
from modelhost.engines import Engine
from modelhost.generation import (
    Delta,
    EngineRequest,
    Event,
    Finish,
    FinishReason,
    GenerationSpec,
    Rejected,
    Sampling,
    Timings,
    merge_deltas,
    resolve_max_tokens,
    validate_messages,
    validate_stop,
)
from modelhost.metrics import RequestMetrics
from modelhost.residency import Residency, ResidentModel
from modelhost.tools import (
    CallFormat,
    ToolCallParser,
    call_format,
    call_grammar,
    check_tool_turns,
    fallback_turns,
    has_tool_turns,
    knows_tools,
    render_with_template,
)

_log = structlog.get_logger()


class GenerationService:
    """Runs generation requests against the host's resident models."""

    def __init__(self, residency: Residency, metrics: RequestMetrics) -> None:
        self.residency = residency
        self.metrics = metrics

    def models(self) -> list[ResidentModel]:
        return self.residency.models

    async def generate(
        self, spec: GenerationSpec, time_left_s: float | None
    ) -> AsyncGenerator[Delta | ToolCallDelta | Finish, None]:
        """Yields the request's events, the last one a Finish. Raises a domain error before
        the first event when the request cannot be served, including when its deadline
        passes in the queue. Leaving the iteration early cancels the request in the engine."""
        arrived = time.perf_counter()
        if not spec.prompt and not spec.messages and spec.infill is None:
            raise InvalidArgument("the request has neither a prompt nor chat messages; send one")
        spec.sampling.validate()
        validate_stop(spec.stop)
        validate_output(spec.output, compile=False)  # the host compiles for its vocabulary
        if spec.ignore_eos and (spec.output.constraint or spec.output.calls_tools):
            raise InvalidArgument(
                "stopping.ignore_eos cannot be combined with an output constraint or tools: a "
                "constrained answer ends where its grammar does"
            )
        if spec.messages:
            validate_messages(spec.messages)
        resident = self.residency.resolve(spec.model)
        refuse_embedding_model(resident)
        try:
            async with self.residency.use(resident, time_left_s) as engine:
                # Closed explicitly so a client leaving cancels the engine request at once.
                events = self._run(spec, resident, engine, arrived, time_left_s)
                async with aclosing(events):
                    async for event in events:
                        if isinstance(event, Finish):
                            self.metrics.finished(event)
                        yield event
        except AirouterError as exc:
            self.metrics.refused(resident.name, exc)
            raise

    async def count_tokens(
        self, spec: GenerationSpec, time_left_s: float | None
    ) -> tuple[int, str]:
        """The prompt tokens Generate would count for the request (the chat template applied,
        with the tools offered), and the configured name of the model that counted them."""
        if not spec.prompt and not spec.messages and spec.infill is None:
            raise InvalidArgument("the request has neither a prompt nor chat messages; send one")
        validate_output(spec.output, compile=False)
        if spec.messages:
            validate_messages(spec.messages)
        resident = self.residency.resolve(spec.model)
        refuse_embedding_model(resident)
        name = resident.config.name
        async with self.residency.use(resident, time_left_s) as engine:
            refuse_what_cannot_fit(spec, engine, name)
            prepared = await asyncio.to_thread(prepare, spec, engine, name, grammar=False)
            return len(await asyncio.to_thread(prompt_tokens, spec, prepared, engine, name)), name

    async def _run(
        self,
        spec: GenerationSpec,
        resident: ResidentModel,
        engine: Engine,
        arrived: float,
        time_left_s: float | None,
    ) -> AsyncGenerator[Delta | ToolCallDelta | Finish, None]:
        name = resident.config.name
        output = spec.output
        refuse_what_cannot_fit(spec, engine, name)
        prepared = await asyncio.to_thread(prepare, spec, engine, name)
        prompt = await asyncio.to_thread(prompt_tokens, spec, prepared, engine, name)
        max_tokens = resolve_max_tokens(
            spec.max_tokens, len(prompt), engine.context_per_request, name
        )
        constraints: list[TokenConstraint | None] = [None] * output.n
        if prepared.grammar is not None:
            grammar, where = prepared.grammar, prepared.grammar_source
            compiler = engine.constraints()
            constraints = await asyncio.to_thread(
                lambda: [compiler.constraint(grammar, where) for _ in range(output.n)]
            )

        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[int, list[Event]]] = asyncio.Queue()
        request_id = spec.request_id or uuid.uuid4().hex
        blocks = tuple(prefix_of(spec.prompt, spec.messages).token_ends(len(prompt)).items())
        siblings = object() if output.n > 1 else None
        requests = [
            EngineRequest(
                id=request_id if output.n == 1 else f"{request_id}/{choice}",
                prompt=prompt,
                sampling=_choice_sampling(spec.sampling, choice),
                max_tokens=max_tokens,
                stop=spec.stop,
                on_events=partial(_received, inbox, choice),
                loop=loop,
                arrived=arrived,
                deadline=None if time_left_s is None else arrived + time_left_s,
                ignore_eos=spec.ignore_eos,
                blocks=blocks,
                constraint=constraints[choice],
                top_logprobs=output.top_logprobs if output.logprobs else None,
                siblings=siblings,
            )
            for choice in range(output.n)
        ]
        log = _log.bind(request_id=request_id, model=name)
        parsers = [
            ToolCallParser(prepared.call_format) if prepared.call_format else None for _ in requests
        ]
        finishes: dict[int, Finish] = {}
        sent = False
        try:
            for request in requests:
                engine.submit(request)  # a full queue refuses the rest: all are cancelled
            while len(finishes) < len(requests):
                arrivals = [await inbox.get()]
                while not inbox.empty():  # the client is behind: what waits goes as one delta
                    arrivals.append(inbox.get_nowait())
                for choice, events in arrivals:
                    parser = parsers[choice]
                    for event in merge_deltas(events):
                        if isinstance(event, Rejected):
                            if not sent:
                                raise event.error
                            # Another choice has streamed already: this one ends in error.
                            event = _error_finish(event, name, len(prompt))
                        if isinstance(event, Finish):
                            tail = parser.finish() if parser else []
                            if parser and parser.calls and event.reason is FinishReason.STOP:
                                event = replace(event, reason=FinishReason.TOOL_CALLS)
                            finishes[choice] = event
                            for piece in tail:
                                sent = True
                                yield replace(piece, choice=choice)
                            continue
                        assert isinstance(event, Delta)
                        for piece in parser.feed(event) if parser else [event]:
                            if isinstance(piece, Delta) and not piece.text:
                                continue  # tokens of a call being written: no text to send
                            sent = True
                            yield replace(piece, choice=choice) if choice else piece
            finish = _combined(finishes)
            if finish.completion_tokens:
                self.residency.record_ttft(resident, finish.timings.time_to_first_token_ms)
            log.info(
                "generation_finished",
                reason=finish.reason.value,
                prompt_tokens=finish.prompt_tokens,
                completion_tokens=finish.completion_tokens,
                cached_prompt_tokens=finish.cached_prompt_tokens,
                ttft_ms=round(finish.timings.time_to_first_token_ms, 1),
                engine=finish.engine,
                total_ms=round(finish.timings.total_ms, 1),
                choices=len(requests),
            )
            # Every choice is done before the last message goes out: a client that closes as
            # soon as it has it cancelled nothing, and the request is logged as finished.
            yield finish
        finally:
            if len(finishes) < len(requests):
                for choice, request in enumerate(requests):
                    if choice not in finishes:
                        engine.cancel(request)
                log.info("generation_cancelled")


@dataclass(frozen=True)
class Prepared:
    """A request made ready for tokenizing: its prompt text and what constrains the output."""

    text: str
    grammar: str | None = None  # llguidance's grammar for the output
    grammar_source: str = ""  # which field it came from, for errors
    call_format: CallFormat | None = None  # set when the output may hold tool calls


def prepare(spec: GenerationSpec, engine: Engine, name: str, *, grammar: bool = True) -> Prepared:
    """The prompt text (the chat template applied, with the tools offered) and, unless not
    `grammar`, the output's grammar. Blocking: templates and grammars cost milliseconds."""
    output = spec.output
    calls = output.calls_tools
    form = None
    if spec.messages:
        messages = spec.messages
        check_tool_turns(messages)
        template = engine.chat_template_source()
        if (calls or has_tool_turns(messages)) and knows_tools(template):
            assert template is not None
            text: str | None = render_with_template(
                template, messages, output.tools if calls else ()
            )
            form = call_format(template)
        elif calls or has_tool_turns(messages):
            text = engine.apply_chat_template(fallback_turns(messages, output.tools, calls))
            form = CallFormat.HERMES
        else:
            text = engine.apply_chat_template(messages)  # type: ignore[arg-type]
        if text is None:
            raise FailedPrecondition(
                f"model {name!r} has no chat template its {engine.kind} engine can render; "
                "set chat_template in its config (llama.cpp) or send a raw prompt"
            )
    else:
        text = spec.prompt or ""  # an infill's tokens are laid out apart (prompt_tokens)
    if not grammar:
        return Prepared(text)
    if calls:
        form = form or CallFormat.HERMES
        return Prepared(text, call_grammar(output, form), "tools", form)
    if output.constraint is not None:
        return Prepared(text, grammar_of(output.constraint, "response_format"), "response_format")
    return Prepared(text)


def prompt_tokens(spec: GenerationSpec, prepared: Prepared, engine: Engine, name: str) -> list[int]:
    """The prompt's tokens: its text tokenized, or a fill-in-the-middle prompt laid out with
    the model's FIM tokens in the room its max_tokens (else a quarter of the context) leaves.
    Blocking."""
    if spec.infill is None:
        return engine.tokenize(prepared.text)
    context = engine.context_per_request
    reserve = spec.max_tokens if spec.max_tokens is not None else context // 4
    tokens = engine.infill(spec.infill, max(context - reserve, 1))
    if tokens is None:
        raise FailedPrecondition(
            f"model {name!r} cannot fill in the middle: its vocabulary has no FIM tokens "
            "(tokenizer.ggml.fim_pre_token_id and its siblings) or its engine cannot use them; "
            "use a code model that has them (Qwen2.5-Coder, StarCoder 2, CodeLlama)"
        )
    return tokens


def _choice_sampling(sampling: Sampling, choice: int) -> Sampling:
    """Choice i's sampling: a seeded request's choices draw from seeds seed, seed+1, ..."""
    if choice == 0 or sampling.seed is None:
        return sampling
    return replace(sampling, seed=sampling.seed + choice)


def _received(
    inbox: "asyncio.Queue[tuple[int, list[Event]]]", choice: int, events: list[Event]
) -> None:
    inbox.put_nowait((choice, events))


def _error_finish(rejected: Rejected, model: str, prompt_tokens: int) -> Finish:
    return Finish(FinishReason.ERROR, prompt_tokens, 0, Timings(), str(rejected.error), model)


def _combined(finishes: dict[int, Finish]) -> Finish:
    """One Finish for the request: the first choice's, with the usage of all (the prompt
    counted once, as OpenAI does) and how each choice ended."""
    first = finishes[0]
    if len(finishes) == 1:
        return first
    ordered = [finishes[i] for i in sorted(finishes)]
    timings = replace(first.timings, total_ms=max(f.timings.total_ms for f in ordered))
    return replace(
        first,
        completion_tokens=sum(f.completion_tokens for f in ordered),
        timings=timings,
        error=next((f.error for f in ordered if f.error), ""),
        choices=tuple((i, f.reason, f.completion_tokens) for i, f in enumerate(ordered)),
    )


def refuse_embedding_model(resident: ResidentModel) -> None:
    if resident.config.kind == "embedding":
        raise FailedPrecondition(
            f"model {resident.config.name!r} makes embeddings and generates no text; send it "
            "to Embed (/v1/embeddings), or name a generation model"
        )


def refuse_what_cannot_fit(spec: GenerationSpec, engine: Engine, name: str) -> None:
    """Refuses, before templating and tokenizing (which cost seconds for megabytes), a request
    whose prompt cannot fit the context whatever its tokens: each message takes at least one
    token, and no token stands for more bytes than the vocabulary's longest."""
    messages = spec.messages or []
    context = engine.context_per_request
    if len(messages) > context:
        raise InvalidArgument(
            f"{len(messages)} messages cannot fit model {name!r}'s context of {context} "
            "tokens (each takes at least one); send fewer"
        )
    longest = engine.longest_token_bytes
    if longest is None:
        return  # the vocabulary scan after the load is still running
    size = len((spec.prompt or "").encode()) + sum(len(turn[1].encode()) for turn in messages)
    if size > context * longest:
        raise InvalidArgument(
            f"the prompt is {size} bytes, more than model {name!r}'s context of {context} "
            f"tokens can hold (its longest token is {longest} bytes); "
            "send less"
        )
