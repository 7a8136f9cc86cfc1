"""Generation as the host offers it: validate, render, tokenize, hand to the engine, relay.

Nothing here touches grpc; the servicer translates wire messages to and from these types.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing

import structlog

from airouter.errors import AirouterError, FailedPrecondition, InvalidArgument
from airouter.prefix import prefix_of
from modelhost.engines import Engine
from modelhost.generation import (
    Delta,
    EngineRequest,
    Event,
    Finish,
    GenerationSpec,
    Rejected,
    merge_deltas,
    resolve_max_tokens,
    validate_messages,
    validate_stop,
)
from modelhost.metrics import RequestMetrics
from modelhost.residency import Residency, ResidentModel

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
    ) -> AsyncGenerator[Delta | Finish, None]:
        """Yields the request's events, the last one a Finish. Raises a domain error before
        the first event when the request cannot be served, including when its deadline
        passes in the queue. Leaving the iteration early cancels the request in the engine."""
        arrived = time.perf_counter()
        if not spec.prompt and not spec.messages:
            raise InvalidArgument("the request has neither a prompt nor chat messages; send one")
        spec.sampling.validate()
        validate_stop(spec.stop)
        if spec.messages:
            validate_messages(spec.messages)
        resident = self.residency.resolve(spec.model)
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

    async def _run(
        self,
        spec: GenerationSpec,
        resident: ResidentModel,
        engine: Engine,
        arrived: float,
        time_left_s: float | None,
    ) -> AsyncGenerator[Delta | Finish, None]:
        name = resident.config.name
        refuse_what_cannot_fit(spec, engine, name)
        text = spec.prompt
        if spec.messages:
            text = await asyncio.to_thread(engine.apply_chat_template, spec.messages)
            if text is None:
                raise FailedPrecondition(
                    f"model {name!r} has no chat template its {engine.kind} engine can render; "
                    "set chat_template in its config (llama.cpp) or send a raw prompt"
                )
        assert text is not None
        prompt = await asyncio.to_thread(engine.tokenize, text)
        max_tokens = resolve_max_tokens(
            spec.max_tokens, len(prompt), engine.context_per_request, name
        )

        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[list[Event]] = asyncio.Queue()
        request = EngineRequest(
            id=spec.request_id or uuid.uuid4().hex,
            prompt=prompt,
            sampling=spec.sampling,
            max_tokens=max_tokens,
            stop=spec.stop,
            on_events=lambda events: loop.call_soon_threadsafe(inbox.put_nowait, events),
            arrived=arrived,
            deadline=None if time_left_s is None else arrived + time_left_s,
            ignore_eos=spec.ignore_eos,
            blocks=tuple(prefix_of(spec.prompt, spec.messages).token_ends(len(prompt)).items()),
        )
        log = _log.bind(request_id=request.id, model=name)
        engine.submit(request)
        finished = False
        try:
            while not finished:
                events = await inbox.get()
                while not inbox.empty():  # the client is behind: what waits goes as one delta
                    events += inbox.get_nowait()
                for event in merge_deltas(events):
                    if isinstance(event, Rejected):
                        finished = True
                        raise event.error
                    if isinstance(event, Finish):
                        # Done before the last message goes out: a client that closes as soon
                        # as it has it cancelled nothing, and the request is logged as finished.
                        finished = True
                        if event.completion_tokens:
                            self.residency.record_ttft(
                                resident, event.timings.time_to_first_token_ms
                            )
                        log.info(
                            "generation_finished",
                            reason=event.reason.value,
                            prompt_tokens=event.prompt_tokens,
                            completion_tokens=event.completion_tokens,
                            cached_prompt_tokens=event.cached_prompt_tokens,
                            ttft_ms=round(event.timings.time_to_first_token_ms, 1),
                            engine=event.engine,
                            total_ms=round(event.timings.total_ms, 1),
                        )
                    yield event
        finally:
            if not finished:
                engine.cancel(request)
                log.info("generation_cancelled")


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
    size = len((spec.prompt or "").encode()) + sum(len(c.encode()) for _, c in messages)
    if size > context * longest:
        raise InvalidArgument(
            f"the prompt is {size} bytes, more than model {name!r}'s context of {context} "
            f"tokens can hold (its longest token is {longest} bytes); "
            "send less"
        )
