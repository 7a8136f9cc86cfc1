"""TLS, mutual TLS, bearer tokens and the loopback rule, on real servers with real
certificates made for the test (a CA, server and client certificates, and a stranger CA)."""

import asyncio
import datetime
import ipaddress
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import structlog.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airouter.security import SecurityError, bearer
from airouter.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2, model_host_pb2
from airouter.v1.model_host_pb2_grpc import ModelHostStub
from gateway.hosts import Host
from gateway.server import start_gateway
from gateway.upstream import UpstreamSettings
from modelhost.config import HostConfig, embedded_model_config
from modelhost.server import start_host
from tests.conftest import LoopThread, gateway_config
from tests.processes import BIN
from tests.streaming import collect, gateway_request, host_request

TOKEN = "client-secret-7f3a"
ADMIN_TOKEN = "admin-secret-91bc"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):  # type: ignore[no-untyped-def]
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _certificate(subject: str, issuer_key, issuer: x509.Name, key, *, ca: bool, sans=None):  # type: ignore[no-untyped-def]
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class PKI:
    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """ca.pem signs server.pem (127.0.0.1, localhost) and client.pem; stranger.pem signs
    stranger-client.pem."""
    directory = tmp_path_factory.mktemp("pki")
    for ca_name, issued in [("ca", ["server", "client"]), ("stranger", ["stranger-client"])]:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _certificate(ca_name, ca_key, _name(ca_name), ca_key, ca=True)
        _write(directory, ca_name, ca_key, ca_cert)
        for name in issued:
            key = ec.generate_private_key(ec.SECP256R1())
            sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            cert = _certificate(name, ca_key, ca_cert.subject, key, ca=False, sans=sans)
            _write(directory, name, key, cert)
    (directory / "token").write_text(TOKEN + "\n")
    (directory / "admin-token").write_text(ADMIN_TOKEN + "\n")
    return PKI(directory)


def small_host_config(**settings: object) -> HostConfig:
    model = embedded_model_config().model_copy(
        update={"context_length": 256, "slots": 2, "batch_tokens": 64}
    )
    fields: dict[str, object] = {"listen": "127.0.0.1:0", "device": "cpu", "models": [model]}
    return HostConfig.model_validate(fields | settings)


@dataclass
class Servers:
    loop: LoopThread
    host_address: str
    mtls_host_address: str
    gateway_address: str


@pytest.fixture(scope="module")
def servers(pki: PKI) -> Iterator[Servers]:
    """A host with TLS and tokens; a host that also demands client certificates; a gateway
    with TLS and a token that reaches the second host over mutual TLS with its token."""
    loop = LoopThread()
    tls = {"tls_cert": pki.path("server.pem"), "tls_key": pki.path("server.key")}
    tokens = {"token_file": pki.path("token"), "admin_token_file": pki.path("admin-token")}
    host = loop.run(start_host(small_host_config(**tls, **tokens), "cpu"))
    mtls_host = loop.run(
        start_host(small_host_config(**tls, **tokens, tls_client_ca=pki.path("ca.pem")), "cpu")
    )
    gateway = loop.run(
        start_gateway(
            gateway_config(
                [f"127.0.0.1:{mtls_host.port}"],
                modelhost_ca=pki.path("ca.pem"),
                modelhost_cert=pki.path("client.pem"),
                modelhost_key=pki.path("client.key"),
                modelhost_token_file=pki.path("token"),
                token_file=pki.path("token"),
                **tls,
            )
        )
    )
    yield Servers(
        loop,
        f"127.0.0.1:{host.port}",
        f"127.0.0.1:{mtls_host.port}",
        f"127.0.0.1:{gateway.port}",
    )
    for server in (gateway, host, mtls_host):
        loop.run(server.stop(0))
    loop.close()


def channel(pki: PKI, address: str, ca: str = "ca.pem", cert: str | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.read(ca),
        private_key=pki.read(f"{cert}.key") if cert else None,
        certificate_chain=pki.read(f"{cert}.pem") if cert else None,
    )
    return grpc.secure_channel(address, credentials)


def auth(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if not hasattr(result, "SerializeToString"):
            collect(result)
    return info.value


def test_a_client_with_the_ca_and_the_token_is_served(pki: PKI, servers: Servers) -> None:
    with channel(pki, servers.host_address) as ch:
        stub = ModelHostStub(ch)
        request = host_request(prompt="Hello", max_tokens=2)
        result = collect(stub.Generate(request, metadata=auth(TOKEN), timeout=60))
        assert result.finished.usage.completion_tokens == 2
        # The admin token opens the serving RPCs too.
        models = stub.ListModels(model_host_pb2.ListModelsRequest(), metadata=auth(ADMIN_TOKEN))
        assert models.models[0].name == "gemma-3-270m"


def test_missing_and_wrong_tokens_are_unauthenticated(pki: PKI, servers: Servers) -> None:
    with channel(pki, servers.host_address) as ch:
        stub = ModelHostStub(ch)
        request = host_request(prompt="Hello", max_tokens=2)
        missing = rpc_error(stub.Generate, request, timeout=10)
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "needs a bearer token" in missing.details()
        wrong = rpc_error(stub.Generate, request, metadata=auth("guess"), timeout=10)
        assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
        assert wrong.details() == "the bearer token is not valid"
        unary = rpc_error(stub.GetStatus, model_host_pb2.GetStatusRequest(), timeout=10)
        assert unary.code() == grpc.StatusCode.UNAUTHENTICATED


def test_only_the_admin_token_loads_and_unloads(pki: PKI, servers: Servers) -> None:
    with channel(pki, servers.host_address) as ch:
        stub = ModelHostStub(ch)
        unload = model_host_pb2.UnloadModelRequest(model="gemma-3-270m")
        denied = rpc_error(stub.UnloadModel, unload, metadata=auth(TOKEN), timeout=10)
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "UnloadModel needs the admin token" in denied.details()
        stub.UnloadModel(unload, metadata=auth(ADMIN_TOKEN), timeout=60)
        load = model_host_pb2.LoadModelRequest(model="gemma-3-270m")
        loaded = stub.LoadModel(load, metadata=auth(ADMIN_TOKEN), timeout=60)
        assert loaded.model.state == generate_pb2.MODEL_STATE_READY


def test_health_answers_without_a_token(pki: PKI, servers: Servers) -> None:
    with channel(pki, servers.host_address) as ch:
        response = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_a_client_that_does_not_trust_the_certificate_cannot_connect(
    pki: PKI, servers: Servers
) -> None:
    with channel(pki, servers.host_address, ca="stranger.pem") as ch:
        error = rpc_error(ModelHostStub(ch).GetStatus, model_host_pb2.GetStatusRequest(), timeout=5)
        assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_wants_a_client_certificate_from_its_ca(pki: PKI, servers: Servers) -> None:
    request = model_host_pb2.GetStatusRequest()
    for cert in (None, "stranger-client"):
        with channel(pki, servers.mtls_host_address, cert=cert) as ch:
            error = rpc_error(ModelHostStub(ch).GetStatus, request, metadata=auth(TOKEN), timeout=5)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
    with channel(pki, servers.mtls_host_address, cert="client") as ch:
        status = ModelHostStub(ch).GetStatus(request, metadata=auth(TOKEN), timeout=5).status
        assert status.device == "cpu"


def test_the_gateway_relays_over_mutual_tls_with_tokens(pki: PKI, servers: Servers) -> None:
    with channel(pki, servers.gateway_address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        request = gateway_request(prompt="Hello", max_tokens=2)
        result = collect(stub.Generate(request, metadata=auth(TOKEN), timeout=60))
        assert result.finished.host == servers.mtls_host_address
        missing = rpc_error(stub.Generate, request, timeout=10)
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_gateway_with_a_wrong_host_token_shows_the_host_down_and_why(
    pki: PKI, servers: Servers, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    config = gateway_config(
        [servers.host_address],
        modelhost_ca=pki.path("ca.pem"),
        modelhost_token_file=wrong,
    )
    gateway = servers.loop.run(start_gateway(config))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            [host] = stub.ListHosts(gateway_pb2.ListHostsRequest(), timeout=10).hosts
            assert host.state == gateway_pb2.HOST_STATE_DOWN
            assert "UNAUTHENTICATED" in host.state_detail
            error = rpc_error(stub.Generate, gateway_request(prompt="Hello"), timeout=10)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "UNAUTHENTICATED" in error.details()
    finally:
        servers.loop.run(gateway.stop(0))


def test_listening_beyond_loopback_unprotected_is_refused(servers: Servers) -> None:
    with pytest.raises(SecurityError) as info:
        servers.loop.run(start_host(small_host_config(listen="0.0.0.0:0"), "cpu"))
    message = str(info.value)
    assert "refusing to listen on 0.0.0.0:0 without TLS and a token" in message
    assert "--insecure" in message
    done = subprocess.run(
        [str(BIN / "gateway"), "serve", "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "refusing to listen on 0.0.0.0:0" in done.stderr
    # The HTTP edge the same way: one line, nothing left running, no traceback.
    done = subprocess.run(
        [str(BIN / "gateway"), "serve", "--listen", "127.0.0.1:0", "--http-listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "refusing to listen on 0.0.0.0:0" in done.stderr
    assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr


def test_insecure_allows_it_and_says_so(servers: Servers) -> None:
    config = small_host_config(listen="0.0.0.0:0", insecure=True)
    config.models[0].preload = False
    with structlog.testing.capture_logs() as logs:
        host = servers.loop.run(start_host(config, "cpu"))
    servers.loop.run(host.stop(0))
    [warning] = [e for e in logs if e["event"] == "serving_without_protection"]
    assert "beyond loopback (--insecure) without TLS and a token" in warning["detail"]


def test_tokens_never_reach_the_logs(pki: PKI, servers: Servers) -> None:
    with structlog.testing.capture_logs() as logs, channel(pki, servers.host_address) as ch:
        stub = ModelHostStub(ch)
        request = host_request(prompt="Hello", max_tokens=2)
        collect(stub.Generate(request, metadata=auth(TOKEN), timeout=60))
        rpc_error(stub.Generate, request, metadata=auth(ADMIN_TOKEN + "x"), timeout=10)
    assert logs, "the requests were logged"
    text = repr(logs)
    assert TOKEN not in text and ADMIN_TOKEN not in text


def test_the_cli_speaks_tls_and_sends_the_token(pki: PKI, servers: Servers) -> None:
    def airouter(*args: str, token: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "AIROUTER_TOKEN"}
        if token:
            env["AIROUTER_TOKEN"] = token
        command = [str(BIN / "airouter"), "--gateway", servers.gateway_address]
        command += ["--ca", str(pki.path("ca.pem")), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)

    done = airouter("generate", "--raw", "--max-tokens", "2", "Hello", token=TOKEN)
    assert done.returncode == 0, done.stderr
    refused = airouter("models", token=None)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    hosts = airouter("hosts", token=TOKEN)
    assert hosts.returncode == 0 and servers.mtls_host_address in hosts.stdout


def test_metrics_beyond_loopback_need_insecure(servers: Servers) -> None:
    """/metrics has no TLS or token of its own."""
    with pytest.raises(SecurityError) as info:
        servers.loop.run(start_host(small_host_config(metrics_listen="0.0.0.0:0"), "cpu"))
    assert "refusing to serve /metrics on 0.0.0.0:0" in str(info.value)
    assert "--insecure" in str(info.value)
    config = small_host_config(metrics_listen="0.0.0.0:0", listen="127.0.0.1:0", insecure=True)
    config.models[0].preload = False
    host = servers.loop.run(start_host(config, "cpu"))
    assert host.metrics is not None and host.metrics.port
    servers.loop.run(host.stop(0))


def test_secrets_stay_out_of_reprs() -> None:
    settings = UpstreamSettings(api_key="sk-or-secret-1")
    assert "sk-or-secret-1" not in repr(settings)

    async def host_repr() -> str:
        async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
            return repr(Host("h:1", channel, metadata=bearer("host-secret-2")))

    assert "host-secret-2" not in asyncio.run(host_repr())
