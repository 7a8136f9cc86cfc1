"""OpenAI's Files and Batches APIs on the gateway's HTTP edge, with the official `openai` SDK:
upload, batch, poll, download; bad files refused naming the line with nothing created;
cancellation; and a gateway killed mid-batch that loses and repeats nothing."""

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.server import start_gateway
from tests.conftest import Stack, gateway_config, wait_until
from tests.processes import ServerProcess

MODEL = "gemma-3-270m"


def line(custom_id: str, prompt: str, url: str = "/v1/completions", **body: Any) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def jsonl(lines: list[str]) -> io.BytesIO:
    return io.BytesIO(("\n".join(lines) + "\n").encode())


@pytest.fixture(scope="module")
def client(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    directory = tmp_path_factory.mktemp("openai-batches")
    config = gateway_config(
        [stack.host_address],
        http_listen="127.0.0.1:0",
        batch_db=directory / "batches.sqlite3",
        max_upload_bytes=64 << 10,
    )
    gateway = stack.loop.run(start_gateway(config))
    assert gateway.http is not None
    base_url = f"http://127.0.0.1:{gateway.http.port}/v1"
    yield openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)
    stack.loop.run(gateway.stop(0))


def finished(client: openai.OpenAI, batch_id: str, status: str = "completed") -> Any:
    batch: Any = None

    def done() -> bool:
        nonlocal batch
        batch = client.batches.retrieve(batch_id)
        return bool(batch.status == status)

    wait_until(done, timeout=180)
    return batch


def test_upload_batch_poll_and_download(client: openai.OpenAI) -> None:
    lines = [line(f"req-{i}", f"Item {i}:") for i in range(5)]
    lines.insert(2, "")  # blank lines are skipped, as OpenAI does
    uploaded = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines).getvalue())
    assert client.files.retrieve(uploaded.id).filename == "in.jsonl"
    assert uploaded.id in {f.id for f in client.files.list()}
    assert client.files.content(uploaded.id).read() == jsonl(lines).getvalue()
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/completions",
        completion_window="24h",
        metadata={"job": "labels"},
    )
    assert batch.status in ("in_progress", "completed") and batch.metadata == {"job": "labels"}
    done = finished(client, batch.id)
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (5, 5)
    assert done.error_file_id is None and done.output_file_id and done.completed_at
    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in output) == [f"req-{i}" for i in range(5)]
    for result in output:
        assert result["response"]["status_code"] == 200 and result["error"] is None
        body = result["response"]["body"]
        assert body["object"] == "text_completion" and body["choices"][0]["text"]
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    with pytest.raises(openai.BadRequestError, match="result file"):
        client.files.delete(done.output_file_id)  # it is the batch's results, not an upload
    assert batch.id in {b.id for b in client.batches.list()}
    # The input file can go; the batch keeps its results.
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    assert client.batches.retrieve(batch.id).status == "completed"


def test_failures_go_to_the_error_file(client: openai.OpenAI) -> None:
    # A model no host serves fails its item alone; the others succeed.
    lines = [line("ok", "A:"), line("missing", "B:", model="no-such-model"), line("ok2", "C:")]
    uploaded = client.files.create(file=("mixed.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    done = finished(client, batch.id)
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    assert done.error_file_id is not None
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["missing"]
    assert errors[0]["response"]["status_code"] == 404
    assert "no-such-model" in errors[0]["response"]["body"]["error"]["message"]
    output = client.files.content(done.output_file_id).text.splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in output) == ["ok", "ok2"]


@pytest.mark.parametrize(
    ("lines", "named"),
    [
        ([line("a", "x"), "{not json", line("b", "y")], "line 2: not JSON"),
        ([line("a", "x"), line("b", "y", temperature="hot")], "line 2: body: temperature"),
        ([line("a", "x"), line("a", "y")], "line 2: custom_id 'a' is used on line 1"),
        ([line("a", "x", url="/v1/chat/completions")], "line 1: url"),
        ([""], "no requests"),
    ],
)
def test_bad_batch_files_are_refused_naming_the_line_and_nothing_is_created(
    client: openai.OpenAI, lines: list[str], named: str
) -> None:
    uploaded = client.files.create(file=("bad.jsonl", jsonl(lines)), purpose="batch")
    before = [b.id for b in client.batches.list()]
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
        )
    assert named in refused.value.message, refused.value.message
    assert [b.id for b in client.batches.list()] == before


def test_bad_requests_get_openai_shaped_errors(client: openai.OpenAI) -> None:
    uploaded = client.files.create(file=("ok.jsonl", jsonl([line("a", "x")])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/completions",
            completion_window="1h",  # type: ignore[arg-type]
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", jsonl([line("a", "x")])), purpose="nonsense")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="purpose"):  # read 64 bytes of it, no more
        client.files.create(file=("x.jsonl", jsonl([line("a", "x")])), purpose="p" * (1 << 20))  # type: ignore[arg-type]
    latin1 = client.files.create(file=("l.jsonl", io.BytesIO(b"\xff\n")), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="line 1: not UTF-8"):
        client.batches.create(
            input_file_id=latin1.id, endpoint="/v1/completions", completion_window="24h"
        )
    # Not a multipart upload, or one without its file: refused, saying how to send it.
    with pytest.raises(openai.BadRequestError, match="multipart/form-data"):
        client.post("/files", body={"purpose": "batch"}, cast_to=object)
    with pytest.raises(openai.BadRequestError, match="file: required"):
        client.post(
            "/files",
            body={"purpose": "batch"},
            files=[("other", ("x.txt", b"x"))],  # type: ignore[arg-type]
            cast_to=object,
            options={"headers": {"Content-Type": "multipart/form-data"}},
        )
    # Larger than max_upload_bytes (64 KiB here): refused, and nothing is kept.
    before = len(list(client.files.list()))
    big = [line(f"r{i}", "x" * 200) for i in range(400)]
    with pytest.raises(openai.BadRequestError, match="larger than"):
        client.files.create(file=("big.jsonl", jsonl(big)), purpose="batch")
    assert len(list(client.files.list())) == before


def test_cancel_settles_every_item(client: openai.OpenAI) -> None:
    lines = [line(f"long-{i}", "Count:", max_tokens=200, ignore_eos=True) for i in range(12)]
    uploaded = client.files.create(file=("long.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = finished(client, batch.id, "cancelled")
    assert done.request_counts is not None and done.request_counts.total == 12
    assert done.error_file_id is not None and done.cancelled_at
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert {e["error"]["code"] for e in errors if e["error"]} <= {"batch_cancelled"}
    assert len(errors) + done.request_counts.completed == 12


def test_a_gateway_killed_mid_batch_loses_and_repeats_nothing(stack: Stack, tmp_path: Path) -> None:
    database = str(tmp_path / "batches.sqlite3")
    args = ("gateway", "serve", "--modelhost", stack.host_address, "--batch-db", database)

    def connect(gateway: ServerProcess) -> openai.OpenAI:
        serving = next(r for r in gateway.log if r["event"] == "gateway_serving")
        base_url = f"http://127.0.0.1:{serving['http_port']}/v1"
        return openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)

    gateway = ServerProcess(*args)
    try:
        client = connect(gateway)
        lines = [line(f"item-{i}", f"Item {i}:", max_tokens=16, ignore_eos=True) for i in range(16)]
        uploaded = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
        )

        def some_done() -> bool:
            counts = client.batches.retrieve(batch.id).request_counts
            return counts is not None and counts.completed >= 3

        wait_until(some_done, timeout=180)
        before = client.files.content(f"file-{batch.id}-output").text.splitlines()
    finally:
        gateway.kill()
    restarted = ServerProcess(*args)
    try:
        client = connect(restarted)
        done = finished(client, batch.id)
        assert done.output_file_id is not None
        output = client.files.content(done.output_file_id).text.splitlines()
        assert client.files.retrieve(uploaded.id).bytes == uploaded.bytes
    finally:
        restarted.stop()
    ids = [json.loads(x)["custom_id"] for x in output]
    assert sorted(ids) == sorted(f"item-{i}" for i in range(16))  # each once
    assert output[: len(before)] == before  # what was read before the kill is what is kept
