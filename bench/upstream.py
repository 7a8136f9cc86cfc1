"""One pooled upstream session against a new connection per call (the seeds' setup).

    python -m bench.upstream [--calls 100] [--rounds 3]

A local OpenRouter-compatible server over HTTPS with a self-signed certificate, so every new
connection pays a real TCP and TLS handshake; 100 sequential streamed chat completions through
the gateway's upstream client, once over its pooled session and once with a fresh session
(and so a fresh connection) per call, interleaved round by round.
"""

import argparse
import asyncio
import datetime
import ipaddress
import ssl
import statistics
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.upstream import OpenAIUpstream, UpstreamSettings
from tests.fake_openrouter import API_KEY, FakeOpenRouter

BODY = {"model": "vendor/ok", "messages": [{"role": "user", "content": "Hi"}]}


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def one_call(upstream: OpenAIUpstream) -> None:
    text = "".join([c.text async for c in upstream.stream("/chat/completions", BODY, None)])
    assert text == "Hello world", text


async def run(calls: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = self_signed(Path(tmp))
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(cert, key)
        server = FakeOpenRouter()
        await server.start(ssl_context=server_tls)
        settings = UpstreamSettings(
            api_key=API_KEY,
            base_url=f"https://127.0.0.1:{server.port}/api/v1",
            ca_file=cert,
        )
        timings: dict[str, list[float]] = {"pooled": [], "new connection per call": []}
        connections: dict[str, int] = {}
        for _ in range(rounds):
            for setup in timings:
                before = len(server.connections)
                started = time.perf_counter()
                if setup == "pooled":
                    upstream = OpenAIUpstream(settings)
                    await upstream.start()
                    for _ in range(calls):
                        await one_call(upstream)
                    await upstream.close()
                else:
                    for _ in range(calls):
                        upstream = OpenAIUpstream(settings)
                        await upstream.start()
                        await one_call(upstream)
                        await upstream.close()
                timings[setup].append(time.perf_counter() - started)
                connections[setup] = len(server.connections) - before
        await server.stop()

    print(
        f"\n{calls} sequential streamed chat completions over HTTPS (self-signed, loopback), "
        f"{rounds} interleaved rounds (medians)\n"
    )
    print("| setup | total s | per call ms | connections opened (last round) |")
    print("|---|---|---|---|")
    medians = {setup: statistics.median(values) for setup, values in timings.items()}
    for setup, total in medians.items():
        print(f"| {setup} | {total:.2f} | {total / calls * 1e3:.1f} | {connections[setup]} |")
    ratio = medians["new connection per call"] / medians["pooled"]
    print(f"\nnew connection per call / pooled session: {ratio:.2f}x the time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.calls, args.rounds))


if __name__ == "__main__":
    main()
