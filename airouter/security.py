"""TLS, bearer tokens and the loopback rule, shared by the modelhost and the gateway.

- TLS: a server certificate and key; with `tls_client_ca`, clients must present a certificate
  signed by that CA (mutual TLS).
- Tokens: clients send `authorization: Bearer <token>`. The client token opens the serving
  RPCs, the admin token opens everything, including the admin RPCs (LoadModel, UnloadModel).
  Tokens come from files or environment variables and are never logged. Health and reflection
  stay open, so probes work.
- Exposure: without TLS and a token a server listens on loopback only, unless the operator
  says --insecure.
"""

import argparse
import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import grpc
from pydantic import BaseModel, ConfigDict

from airouter import errors

TOKEN_ENV = "AIROUTER_TOKEN"
ADMIN_TOKEN_ENV = "AIROUTER_ADMIN_TOKEN"
_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class SecurityError(Exception):
    """A security setting cannot be used; the message says which and what to do."""


class ServerSecurity(BaseModel):
    """How a server proves itself and whom it lets in."""

    model_config = ConfigDict(extra="forbid")

    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Require clients to present a certificate signed by this CA (mutual TLS).
    tls_client_ca: Path | None = None
    # Files holding the client and admin tokens; else $AIROUTER_TOKEN, $AIROUTER_ADMIN_TOKEN.
    token_file: Path | None = None
    admin_token_file: Path | None = None
    # Listen beyond loopback without TLS and a token.
    insecure: bool = False


class Credentials:
    """What a ServerSecurity resolves to once its files are read."""

    def __init__(self, security: ServerSecurity) -> None:
        self.tls: grpc.ServerCredentials | None = None
        if (security.tls_cert is None) != (security.tls_key is None):
            raise SecurityError("set both tls_cert and tls_key, or neither")
        if security.tls_client_ca is not None and security.tls_cert is None:
            raise SecurityError("tls_client_ca (mutual TLS) needs tls_cert and tls_key too")
        if security.tls_cert is not None and security.tls_key is not None:
            client_ca = _read(security.tls_client_ca) if security.tls_client_ca else None
            self.tls = grpc.ssl_server_credentials(
                [(_read(security.tls_key), _read(security.tls_cert))],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
        self.token = read_secret(security.token_file, TOKEN_ENV)
        self.admin_token = read_secret(security.admin_token_file, ADMIN_TOKEN_ENV)
        self.insecure = security.insecure

    @property
    def authenticates(self) -> bool:
        return bool(self.token or self.admin_token)

    def check_exposure(self, listen: str, server: str) -> str | None:
        """Raises SecurityError for a non-loopback address without TLS and a token (unless
        insecure); returns a warning to log when the server runs without them."""
        missing = [
            what
            for what, present in [("TLS", self.tls), ("a token", self.authenticates)]
            if not present
        ]
        if not missing:
            return None
        host = listen.rpartition(":")[0].strip("[]")
        if not _is_loopback(host) and not self.insecure:
            raise SecurityError(
                f"refusing to listen on {listen} without {' and '.join(missing)}: anyone who "
                "can reach it could use it. Set tls_cert/tls_key and token_file (or "
                f"${TOKEN_ENV}), listen on 127.0.0.1, or pass --insecure to accept the risk"
            )
        where = "on loopback only" if _is_loopback(host) else "beyond loopback (--insecure)"
        return f"{server} serves {where} without {' and '.join(missing)}"


def check_unprotected_listener(listen: str, what: str, insecure: bool) -> None:
    """Raises SecurityError for a listener that has no TLS or token of its own (/metrics) on
    a non-loopback address, unless insecure."""
    host = listen.rpartition(":")[0].strip("[]")
    if not _is_loopback(host) and not insecure:
        raise SecurityError(
            f"refusing to serve {what} on {listen}: it has no TLS or token, so anyone who can "
            "reach it could read it. Listen on 127.0.0.1 (and scrape through a proxy), or pass "
            "--insecure to accept the risk"
        )


def read_secret(path: Path | None, env: str) -> str | None:
    """A token from its file (stripped) or else from the environment variable."""
    if path is not None:
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise SecurityError(f"cannot read the token file {path}: {exc.strerror}") from exc
        if not text:
            raise SecurityError(f"the token file {path} is empty")
        return text
    return os.environ.get(env) or None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read {path}: {exc.strerror}") from exc


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS for a client: trust `ca` (the system's roots when None), and present cert/key for
    mutual TLS when given."""
    if (cert is None) != (key is None):
        raise SecurityError("set both the client certificate and its key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca) if ca else None,
        private_key=_read(key) if key else None,
        certificate_chain=_read(cert) if cert else None,
    )


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a token (none when there is no token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class KeyValidator(Protocol):
    """The API keys a server knows besides its tokens (the gateway's KeyRing)."""

    def validate(self, presented: str) -> bool:
        """True for a valid key, False for a string that is no key; raises
        errors.Unauthenticated, saying why, for a revoked or expired one."""


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with a valid token (the admin token for admin methods) or,
    for the other methods, a valid API key."""

    def __init__(
        self, credentials: Credentials, admin_methods: set[str], keys: KeyValidator | None = None
    ) -> None:
        self._token = credentials.token
        self._admin_token = credentials.admin_token
        self._admin_methods = admin_methods
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if method.startswith(_OPEN_SERVICES):
            return await continuation(details)
        presented = presented_token(details.invocation_metadata)
        is_admin = self._admin_token is not None and _equal(presented, self._admin_token)
        is_client = self._token is not None and _equal(presented, self._token)
        if not (is_admin or is_client) and presented and self._keys is not None:
            try:
                is_client = self._keys.validate(presented)
            except errors.AirouterError as exc:
                return _deny(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if method in self._admin_methods:
            if is_admin:
                return await continuation(details)
            if is_client:
                return _deny(grpc.StatusCode.PERMISSION_DENIED, f"{method} needs the admin token")
        elif is_admin or is_client:
            return await continuation(details)
        if presented is None:
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "this server needs a bearer token: send `authorization: Bearer <token>` "
                f"(the airouter CLI reads ${TOKEN_ENV})",
            )
        return _deny(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid")


def accepts_token(credentials: Credentials, presented: str) -> bool:
    """Whether a presented token is the client or the admin token (compared in constant
    time)."""
    return any(
        expected is not None and _equal(presented, expected)
        for expected in (credentials.token, credentials.admin_token)
    )


def is_admin_token(credentials: Credentials, presented: str | None) -> bool:
    admin = credentials.admin_token
    return admin is not None and _equal(presented, admin)


def presented_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ").strip()
    return None


def _equal(presented: str | None, expected: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    # One handler shape serves every RPC kind: the call is aborted before any message.
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ServerSecurity, shared by `modelhost serve` and `gateway serve`."""
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA"
    )
    parser.add_argument("--token-file", type=Path, help=f"client token (else ${TOKEN_ENV})")
    parser.add_argument(
        "--admin-token-file", type=Path, help=f"admin token (else ${ADMIN_TOKEN_ENV})"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening beyond loopback without TLS and a token",
    )


def security_flags(args: argparse.Namespace) -> dict[str, object]:
    """The flags add_security_flags defined, as config overrides (None: not given)."""
    return {
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "token_file": args.token_file,
        "admin_token_file": args.admin_token_file,
        "insecure": args.insecure or None,
    }
