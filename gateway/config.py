"""The gateway's config: gateway.toml, then command-line flags, checked at start.

On SIGHUP the gateway reads the file again and adds or retires hosts to match `modelhosts`;
other settings take effect at the next start.
"""

from pathlib import Path
from typing import Literal, TypeAlias

from pydantic import Field, field_validator, model_validator

from airouter.config_files import load_toml_config
from airouter.paths import default_batch_db
from airouter.security import ServerSecurity
from gateway.database import sqlite_path

DEFAULT_LISTEN = "127.0.0.1:50050"
DEFAULT_MODELHOST = "127.0.0.1:50051"
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"
MODELHOST_TOKEN_ENV = "AIROUTER_MODELHOST_TOKEN"
OPENROUTER_KEY_ENV = "OPENROUTER_API_KEY"
STORE_ENV = "AIROUTER_STORE"  # the store's URL, where it carries a password
# Models named openrouter/<vendor>/<model> go to the OpenAI-compatible upstream.
OPENROUTER_PREFIX = "openrouter/"
Policy: TypeAlias = Literal["local_only", "local_first", "cloud_only"]


class GatewayConfig(ServerSecurity):
    listen: str = DEFAULT_LISTEN
    # HOST:PORT of the OpenAI-compatible HTTP edge (/v1/...); None: no HTTP edge.
    http_listen: str | None = DEFAULT_HTTP_LISTEN
    # HOST:PORT of each modelhost; a name with several addresses (a Kubernetes headless
    # service) stands for one host per address.
    modelhosts: list[str] = Field(default_factory=lambda: [DEFAULT_MODELHOST], min_length=1)
    # Seconds between two resolutions of the host names.
    dns_refresh_s: float = Field(default=30.0, gt=0)
    # Seconds in-flight streams get to finish after SIGTERM/SIGINT.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # Seconds an attempt waits for a host's first message (a token, or the end) before the
    # request fails over to the next host, within the client's deadline. It covers a cold
    # model's load and a wait in the host's queue, so it is generous.
    first_message_timeout_s: float = Field(default=60.0, gt=0)
    # The deadline of an HTTP request (OpenAI clients send none), and the most seconds a new
    # HTTP connection may take to send its first request's headers.
    http_request_timeout_s: float = Field(default=600.0, gt=0)
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    # Origins (as "https://app.example.com", or "*") whose browser pages may call the HTTP
    # edge (CORS); none by default.
    cors_origins: list[str] = Field(default_factory=list)
    # TLS to the modelhosts: the CA that signed their certificates, and this gateway's own
    # certificate and key when they require mutual TLS.
    modelhost_ca: Path | None = None
    modelhost_cert: Path | None = None
    modelhost_key: Path | None = None
    # The modelhosts' client token; else $AIROUTER_MODELHOST_TOKEN.
    modelhost_token_file: Path | None = None
    # Models named openrouter/<vendor>/<model> go to this OpenAI-compatible API, with the key
    # from openrouter_api_key_file, else $OPENROUTER_API_KEY.
    openrouter_base_url: str = "https://openrouter.ai/api/v1"
    openrouter_api_key_file: Path | None = None
    # Where requests run when they do not say: local_only, local_first (cloud fallback when no
    # host can serve or all are saturated) or cloud_only; per requested model, else default.
    default_policy: Policy = "local_only"
    model_policies: dict[str, Policy] = Field(default_factory=dict)
    # The cloud model (openrouter/<vendor>/<model>) each requested model falls back to.
    cloud_models: dict[str, str] = Field(default_factory=dict)
    # Cloud spending is the operator's: under local_only, the openrouter/ models clients may
    # still name (shell-style patterns, e.g. "openrouter/meta-llama/*"); cloud_models are
    # always allowed.
    cloud_allowed_models: list[str] = Field(default_factory=list)
    # Whether a request's routing_policy may override the operator's (asking for local_only
    # is always honoured: it spends nothing).
    allow_policy_override: bool = False
    # Prefix-aware routing (gateway/prefixes.py): a request goes to the host expected to hold
    # the most of its prompt (at least prefix_min_tokens) unless it would wait there behind
    # more than prefix_max_queue_gap requests beyond what it would on the least loaded host.
    prefix_routing: bool = True
    prefix_min_tokens: int = Field(default=64, ge=1)
    prefix_max_queue_gap: int = Field(default=1, ge=0)
    # Where batches, uploaded files, stored responses, keys and usage live: an SQLite file
    # (a path or sqlite:///path; one gateway per file), or postgresql://user:password@host/db,
    # where any number of gateways are active at once. batch_db is its former name.
    store: str = Field(default_factory=lambda: str(default_batch_db()), min_length=1)
    batch_db: Path | None = None
    # Seconds a gateway's claim on a batch item lasts unless renewed (every third of it):
    # how long the items of a gateway that died wait before another takes them over.
    batch_lease_s: float = Field(default=30.0, ge=1.0)
    # Attempts per batch item, and the time one attempt may take.
    batch_max_attempts: int = Field(default=4, ge=1)
    batch_item_timeout_s: float = Field(default=600.0, gt=0)
    # Finished batches (and their results) are deleted after this many seconds.
    batch_retention_s: float = Field(default=7 * 86400.0, gt=0)
    # The largest file /v1/files takes (OpenAI's batch files may be 200 MB).
    max_upload_bytes: int = Field(default=200 << 20, ge=1)
    # Seconds a stored response (the Responses API's store) is kept in the store.
    response_retention_s: float = Field(default=30 * 86400.0, gt=0)

    @model_validator(mode="after")
    def _batch_db_is_the_store(self) -> "GatewayConfig":
        if self.batch_db is not None:
            if "store" in self.model_fields_set:
                raise ValueError("store and batch_db name the same thing; keep store")
            self.store = str(self.batch_db)
            self.batch_db = None
        return self

    @field_validator("store")
    @classmethod
    def _store_is_a_path_or_a_url_we_speak(cls, store: str) -> str:
        sqlite_path(store)  # raises saying what to write
        return store

    @property
    def sqlite_path(self) -> Path | None:
        """The store's file, where it is SQLite."""
        path = sqlite_path(self.store)
        return None if path is None else Path(path).expanduser()

    @model_validator(mode="after")
    def _cloud_models_are_openrouter_models(self) -> "GatewayConfig":
        for name, cloud in self.cloud_models.items():
            if not cloud.startswith(OPENROUTER_PREFIX):
                raise ValueError(
                    f"cloud_models[{name!r}] is {cloud!r}; name an openrouter/<vendor>/<model>"
                )
        return self


def load_gateway_config(path: Path | None, **overrides: object) -> GatewayConfig:
    """Reads the TOML file (if any), applies the flags that were given, and validates."""
    return load_toml_config(GatewayConfig, path, overrides)[0]
