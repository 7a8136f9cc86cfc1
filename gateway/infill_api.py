"""llama-server's `POST /infill`, as editor plugins (llama.vscode, llama.vim) send it: the text
before and after the cursor (`input_prefix`, `input_suffix`), other files (`input_extra`) and
what was typed at the cursor (`prompt`), answered in llama-server's own shape (`content`,
`stop`, `tokens_predicted`, ...), whole or streamed. A translation onto the gateway's request
path like the other doors; the layout of the prompt is the host's (airouter.infill). Unlike
llama-server, which serves one model, the gateway needs `model`. Fields llama-server's
plugins send that tune its own server (`cache_prompt`, `samplers`, `t_max_prompt_ms`, ...)
are accepted and change nothing: hosts reuse cached prompts unasked.
"""

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from airouter.infill import MAX_INFILL_FILES, Infill
from airouter.openai_api import validated
from gateway.generation import (
    Finished,
    FinishReason,
    GenerateRequest,
    Routing,
    Sampling,
    Stopping,
)

_Text = Annotated[str, Field(strict=True)]
_Probability = Annotated[float, Field(strict=True, ge=0, le=1)]


class ExtraFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    filename: _Text = "tmp"
    text: _Text = ""


class InfillRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(strict=True, min_length=1)]
    input_prefix: _Text = ""
    input_suffix: _Text = ""
    input_extra: Annotated[list[ExtraFile], Field(max_length=MAX_INFILL_FILES)] = []
    prompt: _Text = ""  # typed at the cursor: continues the prefix
    n_predict: Annotated[int, Field(strict=True, ge=-1, le=(1 << 32) - 1)] = -1
    temperature: Annotated[float, Field(strict=True, ge=0)] | None = None
    top_k: Annotated[int, Field(strict=True, ge=0)] | None = None
    top_p: _Probability | None = None
    min_p: _Probability | None = None
    repeat_penalty: Annotated[float, Field(strict=True, gt=0)] | None = None
    seed: Annotated[int, Field(strict=True, ge=-1)] | None = None
    stop: list[_Text] = []
    stream: Annotated[bool, Field(strict=True)] = False


def parse(body: Any) -> InfillRequest:
    return validated(InfillRequest, body)


def generate_request(parsed: InfillRequest) -> GenerateRequest:
    infill = Infill(
        parsed.input_prefix + parsed.prompt,
        parsed.input_suffix,
        tuple((f.filename, f.text) for f in parsed.input_extra),
    )
    seed = parsed.seed if parsed.seed is not None and parsed.seed >= 0 else None
    return GenerateRequest(
        model=parsed.model,
        infill=infill,
        sampling=Sampling(
            temperature=parsed.temperature,
            top_p=parsed.top_p,
            top_k=parsed.top_k,
            min_p=parsed.min_p,
            repetition_penalty=parsed.repeat_penalty,
            seed=seed,
        ),
        stopping=Stopping(parsed.n_predict if parsed.n_predict > 0 else None, tuple(parsed.stop)),
        routing=Routing(),
    )


def final_json(text: str, finished: Finished, stream: bool) -> dict[str, Any]:
    """The answer, or a stream's last message, as llama-server's /infill gives it."""
    usage, timings = finished.usage, finished.timings
    stop_type = {FinishReason.LENGTH: "limit"}.get(finished.reason, "eos")
    if finished.stop_sequence:
        stop_type = "word"
    return {
        "index": 0,
        "content": "" if stream else text,
        "stop": True,
        "model": finished.model,
        "tokens_predicted": usage.completion_tokens,
        "tokens_evaluated": usage.prompt_tokens,
        "tokens_cached": usage.cached_prompt_tokens,
        "truncated": False,
        "stop_type": stop_type,
        "stopping_word": finished.stop_sequence,
        "has_new_line": "\n" in text,
        "timings": {
            "prompt_n": usage.prompt_tokens - usage.cached_prompt_tokens,
            "prompt_ms": timings.prefill_ms,
            "predicted_n": usage.completion_tokens,
            "predicted_ms": timings.decode_ms,
        },
    }


def chunk(text: str) -> bytes:
    data = json.dumps({"index": 0, "content": text, "stop": False}, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
