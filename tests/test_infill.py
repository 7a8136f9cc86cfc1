"""Fill-in-the-middle for code editors: `suffix` on /v1/completions and llama-server's /infill,
laid out with the model's FIM tokens (a tiny Llama written with the `gguf` package that has
them), refused for a model without them, and cached for the next keystroke."""

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from airouter.errors import FailedPrecondition
from airouter.infill import FimTokens, Infill, infill_tokens
from gateway.generation import GenerateRequest
from gateway.upstream import openai_body
from gateway.wire import request_from_pb, request_pb
from modelhost.config import ModelConfig, embedded_chat_model_config
from tests.conftest import http_stack
from tests.tiny_models import tiny_llama_fim

FIM = FimTokens(prefix=-1, suffix=-2, middle=-3, file_separator=-4)


def letters(text: str) -> list[int]:
    """A tokenizer of one token per character (its code point)."""
    return [ord(c) for c in text]


def test_the_layout_is_files_then_prefix_suffix_middle() -> None:
    infill = Infill("ab", "cd", (("x.py", "1"), ("y.py", "2")))
    tokens = infill_tokens(infill, FIM, letters, room=100, bos=0)
    assert tokens == [
        0,
        *[-4, *letters("x.py\n1")],
        *[-4, *letters("y.py\n2")],
        *[-1, *letters("ab")],
        *[-2, *letters("cd")],
        -3,
    ]
    # Without a file separator the files are left out.
    no_separator = FimTokens(-1, -2, -3)
    assert infill_tokens(infill, no_separator, letters, room=100) == [-1, 97, 98, -2, 99, 100, -3]


def test_what_does_not_fit_is_cut_far_from_the_cursor() -> None:
    infill = Infill("p" * 50 + "NEAR", "near" + "s" * 50, (("old.py", "o" * 20), ("new.py", "n")))
    tokens = infill_tokens(infill, FIM, letters, room=43)
    assert len(tokens) == 43
    # The files went first (the newest would fit, but not in this room), then the prefix's
    # start and the suffix's end: what is next to the cursor stays.
    middle = tokens.index(-2)
    prefix, suffix = tokens[1:middle], tokens[middle + 1 : -1]
    assert tokens[0] == -1 and -4 not in tokens
    assert "".join(map(chr, prefix)).endswith("NEAR")
    assert "".join(map(chr, suffix)) == "near" + "s" * 6
    assert len(suffix) == (43 - 3) // 4
    # With room to spare, the newest file is kept before an older one that does not fit.
    roomy = infill_tokens(infill, FIM, letters, room=3 + 54 + 54 + 20)
    assert roomy.count(-4) == 1 and roomy[:8] == [-4, *letters("new.py\n")]


@dataclass
class Editor:
    client: openai.OpenAI
    base_url: str


@pytest.fixture(scope="module")
def editor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Editor]:
    path = tiny_llama_fim(tmp_path_factory.mktemp("fim") / "coder.gguf")
    chat = embedded_chat_model_config()
    assert chat is not None
    models = [
        ModelConfig(name="coder", path=path, context_length=2048, slots=2, preload=True),
        chat.model_copy(update={"context_length": 512, "slots": 1}),
    ]
    with http_stack(models) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=60)
        yield Editor(client, base_url)


FILE = "def add(a, b):\n    return a + b\n\n" * 40


def test_suffix_on_completions_fills_the_middle_and_the_next_keystroke_is_cached(
    editor: Editor,
) -> None:
    fields: dict[str, Any] = dict(
        model="coder", prompt=FILE + "def mul(a, b):\n    ", max_tokens=8, temperature=0
    )
    first = editor.client.completions.create(suffix="\n\nprint(mul(2, 3))\n", **fields)
    assert first.choices[0].finish_reason == "length" and first.usage is not None
    assert first.usage.prompt_tokens > 300 and first.usage.completion_tokens == 8
    # The suffix is part of the prompt: a different one reads differently.
    other = editor.client.completions.create(suffix="\n\nprint(mul(4, 5))\n", **fields)
    assert other.usage is not None and other.usage.prompt_tokens == first.usage.prompt_tokens
    # One more character typed: everything before it comes from the cache.
    fields["prompt"] += "r"
    typed = editor.client.completions.create(suffix="\n\nprint(mul(4, 5))\n", **fields)
    assert typed.usage is not None and typed.usage.prompt_tokens_details is not None
    cached = typed.usage.prompt_tokens_details.cached_tokens or 0
    assert cached > typed.usage.prompt_tokens - 20
    # Streamed, the same text.
    stream = editor.client.completions.create(
        suffix="\n\nprint(mul(4, 5))\n", stream=True, **fields
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == typed.choices[0].text


def post(editor: Editor, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    request = urllib.request.Request(
        editor.base_url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_llama_servers_infill_answers_in_its_own_shape(editor: Editor) -> None:
    body = {
        "model": "coder",
        "input_prefix": FILE + "def sub(a, b):\n",
        "input_suffix": "\n",
        "input_extra": [{"filename": "util.py", "text": "import math\n"}],
        "prompt": "    ",
        "n_predict": 6,
        "temperature": 0,
        "cache_prompt": True,  # llama-server's own knobs are accepted
        "samplers": ["top_k", "temperature"],
    }
    status, raw = post(editor, "/infill", body)
    answer = json.loads(raw)
    assert status == 200 and answer["stop"] is True and answer["stop_type"] == "limit"
    assert answer["tokens_predicted"] == 6 and answer["tokens_evaluated"] > 300
    assert isinstance(answer["content"], str) and answer["model"] == "coder"
    again = json.loads(post(editor, "/infill", body)[1])
    assert again["content"] == answer["content"]
    assert again["tokens_cached"] >= again["tokens_evaluated"] - 1
    status, raw = post(editor, "/infill", {**body, "stream": True})
    events = [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line]
    assert status == 200 and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == answer["content"]


def test_a_model_without_fim_tokens_is_a_400_saying_so(editor: Editor) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        editor.client.completions.create(model="smollm2", prompt="def f(", suffix=")", max_tokens=4)
    assert "FIM tokens" in refused.value.message
    status, raw = post(editor, "/infill", {"model": "smollm2", "input_prefix": "x"})
    assert status == 400 and "FIM tokens" in json.loads(raw)["error"]["message"]
    # /infill names the model: the gateway serves several.
    status, raw = post(editor, "/infill", {"input_prefix": "x"})
    assert status == 400 and "model" in json.loads(raw)["error"]["message"]
    status, raw = post(editor, "/infill", {"model": "coder", "input_extra": "not a list"})
    assert status == 400 and "input_extra" in json.loads(raw)["error"]["message"]


def test_an_infill_crosses_the_wire_and_stays_off_the_cloud() -> None:
    request = GenerateRequest(model="m", infill=Infill("a", "b", (("f.py", "c"),)))
    assert request_from_pb(request_pb(request)) == request
    with pytest.raises(FailedPrecondition, match="local hosts only"):
        openai_body(request.with_model("openrouter/x/y"))
