"""Work too heavy for the event loop: parsing, validating, translating and hashing large
requests (a chat of 20,000 messages, a 50,000-item batch).

Threads share the GIL: the loop thread waits its turn behind a thread parsing a large body,
each time it wakes (up to a switch interval, and for the whole of a long C call such as
json.loads or pydantic's validation). So a large body is parsed, validated and hashed for
routing in a process of its own (`off_process`: one, started on first use), and what is left
(translating it for the host, checking its size again) runs on one worker thread
(`off_loop`), so that at most one thread competes with the loop and a burst queues there.
"""

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import TypeVar

from gateway.generation import GenerateRequest

T = TypeVar("T")

_thread = ThreadPoolExecutor(1, thread_name_prefix="heavy-work")
_process: ProcessPoolExecutor | None = None

# A request is heavy past this many chat messages, or past this much text: characters of a
# parsed request, bytes of a body or message not parsed yet.
HEAVY_MESSAGES = 256
HEAVY_SIZE = 64 << 10


async def off_loop(work: Callable[..., T], *args: object) -> T:
    """work(*args) on the heavy-work thread."""
    return await asyncio.get_running_loop().run_in_executor(_thread, work, *args)


async def off_process(work: Callable[..., T], *args: object) -> T:
    """work(*args) in the heavy-work process: `work` and its arguments and result must
    pickle, and `work` must be a module's top-level function."""
    global _process
    if _process is None:
        # spawn, never fork: grpc's threads do not survive a fork. It lives as long as the
        # gateway's process (concurrent.futures joins it at exit).
        _process = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    return await asyncio.get_running_loop().run_in_executor(_process, work, *args)


def heavy(request: GenerateRequest) -> bool:
    """Whether handling the request's text would cost the loop more than a millisecond or so
    (decided in a few microseconds)."""
    messages = request.messages or ()
    if len(messages) > HEAVY_MESSAGES:
        return True
    output = request.output
    if output.constraint is not None or output.tools:
        return True  # compiling a schema or grammar the first time costs milliseconds
    chars = len(request.prompt or "") + sum(len(turn[1]) for turn in messages)
    return chars > HEAVY_SIZE
