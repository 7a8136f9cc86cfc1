"""A local server that speaks OpenRouter's chat and text completion API, failure modes
included, for the tests of the upstream client. The model name picks the behaviour:

    vendor/ok             streams "Hello", " world" after a keep-alive comment, with usage
    vendor/429-once       429 with Retry-After the first time, then ok
    vendor/500-once       500 the first time, then ok
    vendor/reset-once     closes the connection before answering the first time, then ok
    vendor/error-mid      one chunk, then an error event
    vendor/reset-mid      one chunk, then the connection drops
    vendor/truncated      one chunk, then the response ends: no finish reason, no [DONE]
    vendor/no-finish      the whole text and [DONE], but no chunk with a finish reason
    vendor/garbled        one chunk, then an event that is not JSON
    vendor/null-choice    one chunk, then {"choices": [null]}
    vendor/usage-number   one chunk, then "usage": 5
    vendor/content-number one chunk, then a delta whose content is a number
    vendor/long-line      one chunk, then a 200 KB line (past the client's line limit)
    vendor/slow           waits 5 s before the first byte
    vendor/401, /402, /403, /400   that status with an OpenRouter-style error body
"""

import asyncio
import json
from collections import Counter
from typing import Any

from aiohttp import web

API_KEY = "sk-or-test-5e1f0c"
COST_USD = 0.00012  # what each successful completion costs, with usage accounting asked for
# Events of the wrong shape that some upstream may send after its first chunk.
MALFORMED = {
    "null-choice": b'data: {"choices": [null]}\n\n',
    "usage-number": b'data: {"choices": [], "usage": 5}\n\n',
    "content-number": b'data: {"choices": [{"delta": {"content": 7}}]}\n\n',
    "long-line": b"data: " + b"x" * 200_000 + b"\n\n",
}


class FakeOpenRouter:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.connections: set[object] = set()  # the client address of each connection
        self.app = web.Application()
        self.app.router.add_post("/api/v1/chat/completions", self.completions)
        self.app.router.add_post("/api/v1/completions", self.completions)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, ssl_context: Any = None) -> None:
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    async def completions(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        self.connections.add(request.transport.get_extra_info("peername"))
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return _error(401, "No auth credentials found")
        body = await request.json()
        model = body["model"]
        behaviour = model.split("/", 1)[1]
        self.calls[behaviour] += 1
        first = self.calls[behaviour] == 1
        if behaviour in ("400", "401", "402", "403"):
            messages = {
                "400": "messages: must not be empty",
                "401": "Invalid API key",
                "402": "Insufficient credits: add more at https://openrouter.ai/credits",
                "403": "Input was flagged by moderation",
            }
            return _error(int(behaviour), messages[behaviour])
        if behaviour == "429-once" and first:
            return _error(429, "Rate limit exceeded", headers={"Retry-After": "0.2"})
        if behaviour == "500-once" and first:
            return _error(500, "Internal Server Error")
        if behaviour == "reset-once" and first:
            request.transport.close()
            return web.Response(status=500)  # never reaches the client
        if behaviour == "slow":
            await asyncio.sleep(5)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": OPENROUTER PROCESSING\n\n")
        await _event(response, _delta(model, "Hello"))
        if behaviour == "error-mid":
            await _event(response, {"error": {"code": 502, "message": "provider crashed"}})
            return response
        if behaviour == "reset-mid":
            request.transport.close()
            return response
        if behaviour == "truncated":
            return response
        if behaviour == "garbled":
            await response.write(b'data: {"choices": [{"delta\n\n')
            return response
        if behaviour in MALFORMED:
            await response.write(MALFORMED[behaviour])
            await _event(response, _delta(model, "", finish_reason="stop"))
            await response.write(b"data: [DONE]\n\n")
            return response
        if behaviour == "no-finish":
            await _event(response, _delta(model, " world"))
            await response.write(b"data: [DONE]\n\n")
            return response
        await response.write(b": OPENROUTER PROCESSING\n\n")
        await _event(response, _delta(model, " world"))
        await _event(response, _delta(model, "", finish_reason="stop"))
        usage: dict[str, Any] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if (body.get("usage") or {}).get("include"):  # usage accounting, as asked for
            usage["cost"] = COST_USD
        await _event(response, {"model": model, "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        return response


def _delta(model: str, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "gen-1",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
    }


async def _event(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(data)}\n\n".encode())


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": status, "message": message}}
    return web.json_response(body, status=status, headers=headers)
