"""OpenAI's `POST /v1/embeddings`: `input` as a string, a list of strings, a list of token ids
or a list of such lists; `encoding_format` float or base64 (little-endian float32, what the
`openai` SDK asks for by default and decodes itself); `dimensions` where the model allows.
A translation onto the gateway's embedding path (gateway.embeddings)."""

import base64
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from airouter.errors import InvalidArgument
from airouter.openai_api import validated
from gateway.embeddings import MAX_INPUTS, Embeddings, EmbedRequest

_INPUT_FORMS = (
    "a text, a list of texts, a list of token ids (integers from 0), or a list of such lists"
)


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(strict=True, min_length=1)]
    input: Any  # checked by _inputs, whose messages name the item
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(strict=True, ge=1, lt=1 << 32)] | None = None
    user: Annotated[str, Field(strict=True)] | None = None  # accepted, as OpenAI's


def parse(body: Any) -> tuple[EmbedRequest, bool]:
    """The gateway's request, and whether vectors go as base64."""
    parsed = validated(EmbeddingsRequest, body)
    request = EmbedRequest(
        model=parsed.model, inputs=_inputs(parsed.input), dimensions=parsed.dimensions
    )
    request.validate()
    return request, parsed.encoding_format == "base64"


def _inputs(raw: Any) -> list[str | list[int]]:
    """The inputs of OpenAI's `input`, each checked; InvalidArgument names the first bad one."""
    if isinstance(raw, str):
        raw = [raw]
    elif isinstance(raw, list) and raw and _is_token(raw[0]):
        raw = [raw]  # one list of token ids
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument(f"input must be {_INPUT_FORMS}")
    if len(raw) > MAX_INPUTS:  # before looking at each
        raise InvalidArgument(
            f"input has {len(raw)} items; at most {MAX_INPUTS} are allowed, send the rest in "
            "further requests"
        )
    for i, item in enumerate(raw):
        if isinstance(item, str):
            if not item:
                raise InvalidArgument(f"input[{i}] is empty; every input needs text")
        elif isinstance(item, list) and item and all(_is_token(t) for t in item):
            continue
        elif isinstance(item, list) and not item:
            raise InvalidArgument(f"input[{i}] is an empty list of token ids")
        else:
            raise InvalidArgument(
                f"input[{i}] is not a text or a list of token ids; send {_INPUT_FORMS}"
            )
    return raw


def _is_token(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 32  # bool is no token


def response_body(made: Embeddings, as_base64: bool) -> bytes:
    """OpenAI's list of embeddings, in input order, with usage, as JSON."""
    vectors = made.vectors.astype("<f4", copy=False)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(row.tobytes()).decode() if as_base64 else row.tolist(),
        }
        for i, row in enumerate(vectors)
    ]
    usage = {"prompt_tokens": made.prompt_tokens, "total_tokens": made.prompt_tokens}
    body = {"object": "list", "data": data, "model": made.model, "usage": usage}
    return json.dumps(body, separators=(",", ":")).encode()
