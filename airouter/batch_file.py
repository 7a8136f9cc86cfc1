"""The OpenAI batch file format: one JSON request per input line ({custom_id, method, url,
body}), one result per output line ({id, custom_id, response, error})."""

import json
from pathlib import Path
from typing import Any

from airouter.errors import InvalidArgument, not_text, shown
from airouter.openai_api import (
    FINISH_REASON_NAMES,
    ChatCompletionRequest,
    ChoiceJson,
    CompletionRequest,
    completion_json,
    error_json,
    parse_request,
)
from airouter.output import PLAIN
from airouter.output_wire import fill_infill, fill_output, fill_turn, logprob_from_pb
from airouter.v1 import gateway_pb2

# The endpoints a batch line may name, and whether each is a chat.
BATCH_URLS = {"/v1/chat/completions": True, "/v1/completions": False}


def read_batch_file(path: Path) -> list[gateway_pb2.BatchItem]:
    """Every request of the file; InvalidArgument names the first bad line and its field."""
    items = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(
                    f"line {number}: not UTF-8 (byte {exc.start}); save the file as UTF-8"
                ) from None
            if line.strip():
                items.append(batch_item(line, number))
    if not items:
        raise InvalidArgument("the file holds no requests")
    return items


def batch_item(line: str, number: int, endpoint: str | None = None) -> gateway_pb2.BatchItem:
    """One line of a batch input file as a batch item; InvalidArgument names the line and the
    field. With `endpoint`, every line's url must be that one (an OpenAI batch runs one)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"line {number}: not JSON ({exc.msg})") from None
    if not isinstance(entry, dict):
        raise InvalidArgument(f"line {number}: must be a JSON object")
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidArgument(f"line {number}: custom_id: required, a non-empty string")
    if entry.get("method", "POST") != "POST":
        raise InvalidArgument(f"line {number}: method: only POST is supported")
    url = entry.get("url")
    if endpoint is not None and url != endpoint:
        raise InvalidArgument(
            f"line {number}: url {shown(str(url))} differs from the batch's endpoint "
            f"{endpoint}; a batch runs one endpoint"
        )
    if url not in BATCH_URLS:
        raise InvalidArgument(f"line {number}: url {url!r}: use {' or '.join(BATCH_URLS)}")
    try:
        parsed = parse_request(entry.get("body"), chat=BATCH_URLS[url])
    except InvalidArgument as exc:
        raise InvalidArgument(f"line {number}: body: {exc}") from None
    try:
        request = generate_request(parsed)
    except UnicodeEncodeError as exc:
        raise not_text(exc, f"line {number}: body: the body") from None
    try:
        return gateway_pb2.BatchItem(custom_id=custom_id, request=request)
    except UnicodeEncodeError as exc:
        raise not_text(exc, f"line {number}: custom_id") from None


def generate_request(
    parsed: ChatCompletionRequest | CompletionRequest,
) -> gateway_pb2.GatewayGenerateRequest:
    """The gateway's gRPC request for an OpenAI body; UnicodeEncodeError for a lone
    surrogate in its text."""
    request = gateway_pb2.GatewayGenerateRequest(model=parsed.model)
    if isinstance(parsed, ChatCompletionRequest):
        request.chat.SetInParent()
        for message in parsed.messages:
            fill_turn(request.chat.messages.add(), message.turn())
    elif (infill := parsed.infill()) is not None:
        fill_infill(request.infill, infill)
    else:
        request.prompt = parsed.text
    for name, value in parsed.sampling().items():
        setattr(request.sampling, name, value)
    if parsed.token_limit is not None:
        request.stopping.max_tokens = parsed.token_limit
    request.stopping.stop.extend(parsed.stops)
    request.stopping.ignore_eos = parsed.ignore_eos
    if parsed.user:
        request.conversation_id = parsed.user
    output = parsed.output()
    if output is not PLAIN:
        fill_output(request.output, output)
    return request


def batch_output(
    result: gateway_pb2.BatchItemResult, batch_id: str, created: int
) -> dict[str, Any]:
    """One line of a batch output file for an item's result."""
    line: dict[str, Any] = {
        "id": f"batch_req_{batch_id}_{result.index}",
        "custom_id": result.custom_id,
        "response": None,
        "error": None,
    }
    request_id = f"{batch_id}-{result.index}-{result.attempts}"
    if result.state == gateway_pb2.BATCH_ITEM_STATE_SUCCEEDED:
        body = completion_json(
            chat=result.chat,
            id=request_id,
            created=created,
            model=result.finished.model,
            choices=_choices(result),
            usage=result.finished.usage,
            logprobs=any(c.logprobs for c in result.choices),
        )
        line["response"] = {"status_code": 200, "request_id": request_id, "body": body}
    elif result.state == gateway_pb2.BATCH_ITEM_STATE_CANCELLED:
        line["error"] = {"code": "batch_cancelled", "message": result.error_message}
    else:
        status, body = error_json(result.error_code, result.error_message)
        line["response"] = {"status_code": status, "request_id": request_id, "body": body}
    return line


def _choices(result: gateway_pb2.BatchItemResult) -> list[ChoiceJson]:
    if not result.choices:
        reason = FINISH_REASON_NAMES.get(result.finished.reason, "stop")
        return [ChoiceJson(0, result.text, reason)]
    return [
        ChoiceJson(
            c.index,
            c.text,
            FINISH_REASON_NAMES.get(c.reason, "stop"),
            tuple((t.id, t.name, t.arguments) for t in c.tool_calls),
            tuple(logprob_from_pb(lp) for lp in c.logprobs),
        )
        for c in result.choices
    ]
