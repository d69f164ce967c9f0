"""The service's one configuration object, read from `BITPLAN_*` environment variables.

Every knob an operator can turn (database, broker, executor, limits, webhook secret, which local
paths a job may name) lives here, with its default next to it, so the API, `bitplan serve` and
`bitplan worker` read one definition. The names match the variables the database layer already
reads (`BITPLAN_DATABASE_URL`, `BITPLAN_HOME`), and the executor's settings are the workers' own
`WorkerSettings` (read from the same environment), so a deployment sets each value once.

Never imports FastAPI, SQLAlchemy, Celery or torch: the CLI and the workers read settings too.
"""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from db.home import bitplan_home
from db.store import ArtifactStore, StoreConfig, open_store
from workers.settings import WorkerSettings

MIB = 1 << 20


class Settings(BaseSettings):
    """Defaults describe the embedded deployment: SQLite and inline workers in one process."""

    model_config = SettingsConfigDict(env_prefix="BITPLAN_", extra="ignore")

    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; unset means the SQLite file under `home`."
    )
    home: Path = Field(
        default_factory=bitplan_home,
        description="Folder of the embedded database and the artifact store.",
    )
    store: StoreConfig = Field(
        default_factory=StoreConfig.from_env,
        description="Where artifacts live: `BITPLAN_STORE_URL` (unset: the folder under `home`; "
        "`s3://bucket/prefix`: a bucket) and `BITPLAN_S3_ENDPOINT_URL`, read by the store's rules.",
    )
    workers: WorkerSettings = Field(
        default_factory=WorkerSettings.from_env,
        description="Executor, broker and lease settings, read by the workers' own rules.",
    )

    max_upload_bytes: int = Field(default=2048 * MIB, ge=1)
    max_request_bytes: int = Field(
        default=1 * MIB, ge=1, description="Limit for every body that is not an upload."
    )

    webhook_secret: SecretStr = SecretStr("")
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names a callback URL may name; empty allows any name. Every address "
        "a name resolves to must still be public or inside `webhook_allowed_networks`.",
    )
    webhook_allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDR networks a callback may reach besides public addresses (e.g. "
        '["10.20.0.0/16"] for receivers on an internal network); empty allows public only.',
    )
    webhook_attempts: int = Field(default=5, ge=1)
    webhook_backoff_seconds: float = Field(default=1.0, ge=0)
    webhook_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Total deadline of one attempt: resolving, connecting, sending and the "
        "receiver's answer, however slowly it trickles in.",
    )
    webhook_concurrency_per_tenant: int = Field(
        default=2,
        ge=1,
        description="Attempts in flight at once per tenant, so that one tenant's slow "
        "receivers only ever delay that tenant's own callbacks.",
    )

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        """Refuse a malformed CIDR at start-up, naming it, rather than at the first callback."""
        try:
            return [str(ip_network(network)) for network in networks]
        except ValueError as error:
            raise ValueError(
                f"BITPLAN_WEBHOOK_ALLOWED_NETWORKS: {error} (give networks such as 10.0.0.0/8)"
            ) from error

    key_cache_seconds: float = Field(
        default=10.0,
        ge=0,
        description="How long an API process trusts a verified key without asking the database; "
        "a revoked key stops working within this time. 0 turns the cache off.",
    )

    solve_time_limit: float = Field(
        default=10.0, gt=0, description="Upper bound on a profile re-solve's solver time."
    )

    # --- quotas and rate limits (service.quotas): what one key, address or tenant may take ---
    rate_limit_per_second: float = Field(
        default=50.0,
        gt=0,
        description="Requests per second one API key may send to one API process (429 above).",
    )
    rate_limit_burst: int = Field(
        default=100,
        ge=1,
        description="Requests one API key may send at once before the rate holds.",
    )
    auth_failures_per_minute: int = Field(
        default=20,
        ge=1,
        description="Failed keys one client address may present per minute; then its unknown "
        "keys are refused (429) without asking the database until the minute has passed.",
    )
    max_active_jobs_per_tenant: int = Field(
        default=1000, ge=1, description="Queued plus running jobs per tenant (429 above)."
    )
    max_stored_bytes_per_tenant: int = Field(
        default=50 * 1024 * MIB,
        ge=1,
        description="Upload plus artifact bytes per tenant; uploads are refused (413) above it.",
    )
    metrics_token: SecretStr = Field(
        default=SecretStr(""),
        description="The bearer token /metrics asks for instead of an API key; empty means any "
        "valid API key opens it.",
    )

    def open_store(self) -> ArtifactStore:
        """The artifact store these settings name, built the way every worker builds its own."""
        return open_store(self.store, self.home)

    @property
    def allowed_input_roots(self) -> tuple[Path, ...]:
        """`BITPLAN_ALLOWED_INPUT_ROOTS`, read by the workers' rules: the API refuses at submit
        what a worker would refuse where it opens the file."""
        return self.workers.allowed_input_roots
