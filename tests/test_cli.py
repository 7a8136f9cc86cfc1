"""The three commands as a user runs them: separate processes, real ports, real signals."""

import argparse
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from airouter.cli import build_parser as airouter_parser
from airouter.v1 import gateway_pb2_grpc, generate_pb2
from gateway.cli import build_parser as gateway_parser
from modelhost.cli import build_parser as modelhost_parser
from modelhost.device import cuda_devices
from tests.conftest import wait_for_health
from tests.processes import BIN, ServerProcess, free_port_address
from tests.scratch import scratch_dir
from tests.streaming import collect, gateway_request


class Server(ServerProcess):
    """A server process that answers health before the test uses it."""

    def __init__(self, *args: str) -> None:
        super().__init__(*args)
        wait_for_health(self.address)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Server, Server]]:
    host = Server("modelhost", "serve", "--device", "cpu")
    gateway = Server("gateway", "serve", "--modelhost", host.address)
    yield host, gateway
    for server in (gateway, host):
        if server.process.poll() is None:
            server.stop()


def airouter(gateway: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "airouter"), "--gateway", gateway.address, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_airouter_generate_prints_the_tokens(servers) -> None:  # type: ignore[no-untyped-def]
    _, gateway = servers
    done = airouter(gateway, "generate", "--raw", "--max-tokens", "8", "Once upon a time")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_airouter_generate_json_ends_with_the_finish_event(servers) -> None:  # type: ignore[no-untyped-def]
    _, gateway = servers
    done = airouter(gateway, "generate", "--json", "--max-tokens", "6", "Say hello")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert all("token" in e for e in events[:-1]) and len(events) >= 2
    finished = events[-1]["finished"]
    assert finished["reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")
    assert 0 < finished["usage"]["completionTokens"] <= 6
    assert finished["model"] == "smollm2-135m-instruct"  # a chat turn goes to the chat model


def test_airouter_models_lists_the_default_model(servers) -> None:  # type: ignore[no-untyped-def]
    host, gateway = servers
    done = airouter(gateway, "models")
    assert done.returncode == 0, done.stderr
    assert "gemma-3-270m" in done.stdout and host.address in done.stdout


def test_airouter_reports_errors_with_their_code(servers) -> None:  # type: ignore[no-untyped-def]
    _, gateway = servers
    done = airouter(gateway, "generate", "--model", "missing-model", "hi")
    assert done.returncode == 1
    assert "NOT_FOUND" in done.stderr and "gemma-3-270m" in done.stderr


def test_airouter_status_shows_the_host_table(servers) -> None:  # type: ignore[no-untyped-def]
    host, gateway = servers
    wait_until_ready = time.monotonic() + 60
    while True:
        done = airouter(gateway, "status", "--modelhost", host.address)
        assert done.returncode == 0, done.stderr
        if "ready" in done.stdout or time.monotonic() > wait_until_ready:
            break
        time.sleep(0.2)
    assert "device cpu" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("gemma-3-270m"))
    assert "ready" in row and "934 MiB" in row and "0/8" in row  # the lean SWA cache
    as_json = json.loads(airouter(gateway, "status", "--json", "--modelhost", host.address).stdout)
    assert as_json["device"] == "cpu" and as_json["models"][0]["name"] == "gemma-3-270m"
    # The protocol's JSON names, every field present even at zero: the same keys always.
    model = as_json["models"][0]
    assert model["slotsBusy"] == 0 and model["queueDepth"] == 0 and "state_detail" not in model


def test_every_command_says_its_version_and_explains_its_flags() -> None:
    for command in ("airouter", "modelhost", "gateway"):
        done = subprocess.run(
            [str(BIN / command), "--version"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and done.stdout.startswith(f"{command} "), done
        assert done.stdout.split()[1][0].isdigit()
    parsers = [airouter_parser(), gateway_parser(), modelhost_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
            else:
                assert action.help, (parser.prog, action.option_strings or action.dest)
    assert (
        "{auto,cpu,cuda,metal}"
        in subprocess.run(
            [str(BIN / "airouter"), "up", "--help"], capture_output=True, text=True, timeout=60
        ).stdout
    )


def test_airouter_status_of_an_unreachable_host_fails_clearly(servers) -> None:  # type: ignore[no-untyped-def]
    _, gateway = servers
    done = airouter(gateway, "status", "--modelhost", "127.0.0.1:1")
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr


def test_airouter_hosts_lists_the_gateways_hosts(servers) -> None:  # type: ignore[no-untyped-def]
    host, gateway = servers
    done = airouter(gateway, "hosts")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith(host.address))
    assert " up " in row and "cpu" in row and "gemma-3-270m" in row
    # Gemma's 8 slots, and SmolLM2's 4 once it has loaded too.
    assert "/8 " in row or "/12 " in row


def test_airouter_hosts_asks_modelhosts_directly_and_shows_down_ones(servers) -> None:  # type: ignore[no-untyped-def]
    host, gateway = servers
    done = airouter(gateway, "hosts", "--modelhost", host.address, "--modelhost", "127.0.0.1:1")
    assert done.returncode == 1  # one host is down
    up = next(line for line in done.stdout.splitlines() if line.startswith(host.address))
    assert " up " in up and "gemma-3-270m" in up
    down = next(line for line in done.stdout.splitlines() if line.startswith("127.0.0.1:1 "))
    assert "down" in down and "UNAVAILABLE" in down


def test_sigterm_lets_in_flight_streams_finish_and_refuses_new_ones() -> None:
    host = Server("modelhost", "serve", "--device", "cpu")
    gateway = Server("gateway", "serve", "--modelhost", host.address)
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            stream = stub.Generate(gateway_request(prompt="Once upon a time", max_tokens=40))
            assert next(stream).HasField("token")
            gateway.process.send_signal(signal.SIGTERM)
            host.process.send_signal(signal.SIGTERM)
            rest = collect(stream)
            with pytest.raises(grpc.RpcError) as refused:
                collect(stub.Generate(gateway_request(prompt="hi", max_tokens=1), timeout=10))
        assert rest.finished.reason == generate_pb2.FINISH_REASON_LENGTH
        assert rest.finished.usage.completion_tokens == 40
        # Once its last stream has ended the gateway stops its server; a request racing that
        # stop is turned away by grpc itself, usually UNAVAILABLE, CANCELLED when it reached the
        # server in the same instant. Refusals during the drain: tests/test_gateway.py.
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert gateway.process.wait(timeout=60) == 0
        assert host.process.wait(timeout=60) == 0
    finally:
        for server in (gateway, host):
            if server.process.poll() is None:
                server.process.kill()


@pytest.mark.skipif(bool(cuda_devices()[0]), reason="this machine has a CUDA device")
def test_device_cuda_without_a_cuda_device_exits_at_once_with_a_clear_message() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "modelhost"), "serve", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 2
    assert "no CUDA device found" in done.stderr and "--device cpu" in done.stderr
    assert time.monotonic() - started < 30


def serve_with_config(tmp_path: Path, text: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    config = tmp_path / "models.toml"
    config.write_text(text)
    done = subprocess.run(
        [str(BIN / "modelhost"), "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return config, done


def test_a_config_naming_a_missing_file_is_rejected_with_the_key(tmp_path: Path) -> None:
    _, done = serve_with_config(tmp_path, '[[models]]\nname = "big"\npath = "nowhere.gguf"\n')
    assert done.returncode == 2
    assert "models[0].path" in done.stderr and "nowhere.gguf does not exist" in done.stderr


def test_a_config_with_an_unknown_key_names_it(tmp_path: Path) -> None:
    config, done = serve_with_config(tmp_path, '[[models]]\nname = "big"\nslotz = 4\n')
    assert done.returncode == 2
    assert "models[0].slotz" in done.stderr and str(config) in done.stderr


def test_a_config_that_is_not_toml_says_so(tmp_path: Path) -> None:
    config, done = serve_with_config(tmp_path, "[[models]\n")
    assert done.returncode == 2
    assert f"{config}: not valid TOML" in done.stderr


def test_a_taken_grpc_port_is_one_line_naming_the_address_and_the_flag(servers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    host, gateway = servers
    gateway_flags = ["--http-listen", "127.0.0.1:0", "--batch-db", str(tmp_path / "b.sqlite3")]
    for program, address, extra in [
        ("modelhost", host.address, []),
        ("gateway", gateway.address, gateway_flags),
    ]:
        done = subprocess.run(
            [str(BIN / program), "serve", "--listen", address, *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1
        assert f"{program}: cannot listen on {address}" in done.stderr
        assert "pick another with --listen" in done.stderr
        assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr


def test_a_second_airouter_up_says_in_one_line_what_is_taken(tmp_path: Path) -> None:
    free = [free_port_address() for _ in range(3)]

    def up(*extra: str) -> subprocess.CompletedProcess[str]:
        command = [str(BIN / "airouter"), "up", "--listen", free[0], "--http-listen", free[1]]
        command += ["--modelhost-listen", free[2], *extra]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    with socket.socket() as holder:  # another program listens where the gateway would
        host, _, port = free[1].rpartition(":")
        holder.bind((host, int(port)))
        holder.listen()
        refused = up("--batch-db", str(tmp_path / "a.sqlite3"))
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"airouter up: {free[1]} (the gateway's HTTP address) is taken; pass --http-listen "
        "HOST:PORT to use another"
    ]
    # The batch database another gateway holds: named, with the option that moves it.
    database = tmp_path / "b.sqlite3"
    with open(f"{database}.lock", "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = up("--batch-db", str(database))
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert f"{database} is in use by another gateway; pass --store" in refused.stderr


def test_airouter_up_then_generate_answers_from_the_instruct_model_and_ctrl_c_stops_both() -> None:
    """The README's first hour: `airouter up`, then `airouter generate "..."` gets a short
    answer from the chat model, and Ctrl-C (SIGINT to the terminal's process group) stops
    the modelhost and the gateway cleanly."""
    gateway, host, http = free_port_address(), free_port_address(), free_port_address()
    up = subprocess.Popen(
        [
            str(BIN / "airouter"),
            "up",
            "--listen",
            gateway,
            "--modelhost-listen",
            host,
            "--http-listen",
            http,
            "--device",
            "cpu",
        ],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # Its default batch store, but not the one of whoever runs the tests (nor one that
        # an `airouter up` of theirs holds).
        env={**os.environ, "XDG_STATE_HOME": str(scratch_dir())},
    )
    try:
        _wait_for_health_while_running(gateway, up)
        started = time.monotonic()
        done = subprocess.run(
            [str(BIN / "airouter"), "--gateway", gateway, "generate", "Say hello in one word."],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip()
        assert time.monotonic() - started < 30  # the default max_tokens keeps it short
        listed = subprocess.run(
            [str(BIN / "airouter"), "--gateway", gateway, "models"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "smollm2-135m-instruct" in listed.stdout and "smollm2" in listed.stdout
        assert "gemma-3-270m" in listed.stdout and "gemma3-270m" in listed.stdout
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(timeout=60) == 0
        _, log = up.communicate(timeout=10)
        assert log.count('"shutdown_finished"') == 2
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def _wait_for_health_while_running(
    address: str, process: "subprocess.Popen[str]", timeout: float = 60
) -> None:
    """wait_for_health, failing with the process's own words as soon as it has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            wait_for_health(address, timeout=1)
            return
        except grpc.FutureTimeoutError:
            if process.poll() is not None:
                assert process.stderr is not None
                pytest.fail(f"exited with {process.returncode}: {process.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise


def test_the_modelhost_logs_what_its_llama_cpp_was_built_for(servers) -> None:  # type: ignore[no-untyped-def]
    host, _ = servers
    builds = [r for r in host.log if r["event"] == "engine_build"]
    [build] = [r for r in builds if r["engine"] == "llama.cpp"]
    assert "AVX2" in build["features"]["CPU"]  # CI's build names its instruction sets
    assert build["gpu_offload"] is False


def test_status_watch_into_a_pipe_writes_no_terminal_escapes(servers) -> None:  # type: ignore[no-untyped-def]
    host, _ = servers
    watch = subprocess.Popen(
        [str(BIN / "airouter"), "status", "--modelhost", host.address, "--watch"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        lines = [watch.stdout.readline() for _ in range(12)]
    finally:
        watch.kill()
        watch.wait()
    assert any("gemma-3-270m" in line for line in lines)
    assert not any("\x1b" in line for line in lines)


def test_batch_submit_prints_the_batch_id_once(servers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, gateway = servers
    requests = tmp_path / "requests.jsonl"
    line = {"custom_id": "a", "url": "/v1/completions", "body": {"model": "gemma-3-270m"}}
    line["body"] |= {"prompt": "Hi", "max_tokens": 1}
    requests.write_text(json.dumps(line) + "\n")
    done = airouter(gateway, "batch", "submit", str(requests))
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip()
    assert batch_id.startswith("batch_") and "\n" not in batch_id
    assert batch_id not in done.stderr and "1 items stored" in done.stderr
